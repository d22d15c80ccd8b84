"""``python -m cure_eval.audit`` end to end: inputs, outputs, and agreement with torchattacks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torchattacks

from cure_eval.attacks import ATTACKS
from cure_eval.audit import main
from cure_eval.data import get_dataset_spec, load_dataset, select_points
from cure_eval.models import create_model, model_config_for
from cure_eval.models.checkpoint import CheckpointInfo, save_checkpoint

from .conftest import train_plain


@pytest.fixture(scope="module")
def wrn_checkpoint(tmp_path_factory: pytest.TempPathFactory, digits_train: tuple[torch.Tensor, torch.Tensor]) -> Path:
    spec = get_dataset_spec("digits")
    cfg = model_config_for("wide_resnet", spec, depth=10, widen=1)
    torch.manual_seed(0)
    model = train_plain(create_model(cfg), *digits_train, epochs=3)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_checkpoint(path, model, CheckpointInfo(model=cfg, dataset="digits", method="standard", epoch=3))
    return path


def test_audit_factory_pgd20_equals_torchattacks(tmp_path: Path, factory_and_weights: tuple[Path, Path],
                                                 trained_digits_model: torch.nn.Module) -> None:
    factory, weights = factory_and_weights
    out = tmp_path / "audit"
    rc = main(["--model", f"{factory}:build", "--weights", str(weights), "--n", "80", "--seed", "5",
               "--attacks", "pgd20,fgsm", "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    # the same points, the same seed, torchattacks called directly
    test = load_dataset("digits", "test")
    idx = select_points(len(test), 80, 5)
    x, y = test.tensors[0][idx], test.tensors[1][idx]
    model = trained_digits_model.eval()
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    torch.manual_seed(5)
    adv = torchattacks.PGD(model, eps=32 / 255, alpha=4 / 255, steps=20, random_start=True)(x[correct], y[correct])
    with torch.no_grad():
        robust = int((model(adv).argmax(1) == y[correct]).sum())
    assert res["attacks"]["pgd20"]["robust_accuracy"] == pytest.approx(robust / 80)
    assert res["clean_accuracy"] == pytest.approx(float(correct.double().mean()))
    assert res["n"] == 80 and res["eps"] == pytest.approx(32 / 255) and res["seed"] == 5
    assert set(res["versions"]) >= {"torch", "torchattacks", "foolbox", "timm"}
    assert res["worst_case_accuracy"] <= min(a["robust_accuracy"] for a in res["attacks"].values())
    rows = list(csv.DictReader((out / "per_sample.csv").open()))
    assert len(rows) == 80 * 3  # clean + 2 attacks
    assert set(rows[0]) >= {"index", "label", "clean_pred", "adv_pred", "success", "adv_loss", "linf", "l2"}
    for r in rows:
        assert float(r["linf"]) <= 32 / 255 + 1e-5
        if r["attack"] != "clean" and r["success"] == "True":
            assert float(r["adv_loss"]) < 0  # misclassified: true logit below another
    assert "PGD(20)" in (out / "results.md").read_text()
    assert json.loads((out / "config.json").read_text())["attacks"] == ["pgd20", "fgsm"]


def test_audit_checkpoint_full_suite_and_sweep(tmp_path: Path, wrn_checkpoint: Path) -> None:
    out = tmp_path / "audit"
    rc = main(["--checkpoint", str(wrn_checkpoint), "--n", "40", "--spsa-iterations", "20",
               "--attacks", ",".join(ATTACKS), "--eps-sweep", "0,8,32", "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["attacks"]) == {"fgsm", "pgd7", "pgd20", "pgd40", "pgd100", "apgd-ce", "apgd-dlr", "deepfool_linf",
                                   "deepfool_l2", "spsa"}
    for a in res["attacks"].values():
        assert 0.0 <= a["robust_accuracy"] <= res["clean_accuracy"] and a["seconds"] >= 0
    pgd = [res["attacks"][k]["robust_accuracy"] for k in ("pgd7", "pgd20", "pgd40", "pgd100")]
    assert pgd == sorted(pgd, reverse=True)  # one trajectory: more steps never help the model
    sweep = json.loads((out / "eps_sweep.json").read_text())
    assert sweep["eps_255"] == [0.0, 8.0, 32.0] and sweep["robust_accuracy"][0] == pytest.approx(res["clean_accuracy"])
    assert (out / "eps_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert res["model"]["source"] == "checkpoint"


def test_cascade_reports_worst_case(tmp_path: Path, wrn_checkpoint: Path) -> None:
    out = tmp_path / "cascade"
    assert main(["--checkpoint", str(wrn_checkpoint), "--n", "40", "--attacks", "fgsm,pgd20,deepfool_linf",
                 "--cascade", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["cascade"] is True
    assert res["attacks"]["pgd20"]["robust_accuracy"] is None
    assert res["worst_case_accuracy"] == pytest.approx(min(a["cumulative_robust_accuracy"] for a in res["attacks"].values()))


@pytest.mark.parametrize(
    "extra,code,needle",
    [
        (["--model", "{factory}:nan_model"], 1, "NaN"),
        (["--model", "{factory}:raises"], 1, "weights server down"),
        (["--model", "{factory}:nothere"], 2, "no callable"),
        (["--model", "{factory}:build", "--n", "100000"], 2, "larger than the test set"),
        (["--model", "{factory}:build", "--attacks", "pgd20,cw"], 2, "unknown attack cw"),
        (["--model", "{factory}:build", "--eps", "-1"], 2, "outside [0, 255]"),
        (["--model", "{factory}:build", "--dataset", "cifar10", "--data-dir", "/nonexistent"], 1, "--download"),
        (["--checkpoint", "/nonexistent"], 1, "does not exist"),
        ([], 2, "run python -m cure_eval.defend first, or pass --checkpoint PATH or --model NAME"),
        (["--checkpoint", "/nonexistent", "--model", "{factory}:build"], 2, "exactly one of"),
    ],
)
def test_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], factory_and_weights: tuple[Path, Path],
                   monkeypatch: pytest.MonkeyPatch, extra: list[str], code: int, needle: str) -> None:
    monkeypatch.chdir(tmp_path)  # no runs/ folder: no model means no defend run to take
    factory, _ = factory_and_weights
    argv = [a.format(factory=factory) for a in extra] + ["--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1], err
    assert not (tmp_path / "o" / "results.json").exists()
