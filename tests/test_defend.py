"""End to end: ``defend`` on a tiny configuration, resume after interruption, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cure_eval.core.io import read_jsonl
from cure_eval.data import get_dataset_spec, load_dataset
from cure_eval.defend import main
from cure_eval.models import create_model, model_config_for
from cure_eval.models.checkpoint import load_checkpoint
from cure_eval.training import train
from cure_eval.training.methods import TrainContext, get_method

TINY = ["--depth", "10", "--widen", "1", "--eval-n", "30", "--train-n", "256", "--no-progress"]


def test_defend_writes_every_promised_file(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(TINY + ["--epochs", "2", "--pretrain-epochs", "2", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    for f in ["config.json", "results.json", "results.md", "standard/model.safetensors", "standard/metrics.jsonl",
              "cure/model.safetensors", "cure/metrics.jsonl", "cure/train_state.pt"]:
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "digits" and res["method"] == "cure" and res["seed"] == 0
    assert res["eps"] == pytest.approx(32 / 255)
    for key in ("standard", "cure"):
        assert 0.0 <= res[key]["clean_accuracy"] <= 1.0 and 0.0 <= res[key]["pgd20_accuracy"] <= 1.0
    rows = read_jsonl(out / "cure" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["regularizer"] > 0 for r in rows)  # the regulariser value is logged per epoch
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method_config"]["epochs"] == 2 and cfg["model_config"]["kwargs"] == {"depth": 10, "widen_factor": 1}
    model, info = load_checkpoint(out)  # the run folder resolves to the method's checkpoint
    assert info.method == "cure" and info.epoch == 2
    # the standard model was cached and is reused by a second run with the same settings
    assert any((tmp_path / "cache").iterdir())
    out2 = tmp_path / "run2"
    assert main(TINY + ["--epochs", "1", "--pretrain-epochs", "2", "--out", str(out2), "--cache-dir", str(tmp_path / "cache")]) == 0
    torch.testing.assert_close(
        load_checkpoint(out / "standard" / "model.safetensors")[0].state_dict(),
        load_checkpoint(out2 / "standard" / "model.safetensors")[0].state_dict(),
    )


@pytest.mark.slow
def test_interrupted_training_resumes_bit_identically(tmp_path: Path) -> None:
    spec = get_dataset_spec("digits")
    ds = load_dataset("digits", "train")
    x, y = ds.tensors[0][:256], ds.tensors[1][:256]
    mcfg = model_config_for("wide_resnet", spec, depth=10, widen=1)
    cls = get_method("cure")
    cfg = cls.make_config(spec, mcfg.name, overrides={"epochs": 3, "batch_size": 64})

    def run(out: Path, stop_after: int | None, resume: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = create_model(mcfg)
        ctx = TrainContext(spec=spec, eps=0.1, model_name=mcfg.name, device=torch.device("cpu"), epochs=3, steps_per_epoch=4)

        def on_epoch(row: dict) -> None:
            if stop_after is not None and row["epoch"] == stop_after:
                raise KeyboardInterrupt  # a crash right after an epoch was saved

        train(model, cls(cfg, ctx), x, y, model_config=mcfg, out_dir=out, resume=resume, progress=False, on_epoch=on_epoch)
        return model

    straight = run(tmp_path / "a", None, False)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", 1, False)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1]
    resumed = run(tmp_path / "b", None, True)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_cli_killed_with_sigkill_resumes_from_last_completed_epoch(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cure_eval.defend", *TINY, "--epochs", "4", "--pretrain-epochs", "1",
           "--out", str(out), "--no-cache"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "cure" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(read_jsonl(metrics)) >= 1:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(read_jsonl(metrics))
    assert 1 <= done < 4, "the run should have been killed in the middle of CURE training"
    assert not (out / "results.json").exists()  # nothing that looks like a finished result
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr
    assert f"resuming cifar_wide_resnet from epoch {done}/4" in res.stderr or f"from epoch {done + 1}" in res.stderr
    assert [r["epoch"] for r in read_jsonl(metrics)] == [1, 2, 3, 4]
    assert json.loads((out / "results.json").read_text())["cure"]["clean_accuracy"] > 0


@pytest.mark.parametrize(
    "argv,code,needle",
    [
        (["--method", "nope"], 2, "unknown method 'nope': choose one of"),
        (["--model", "nope"], 2, "unknown model 'nope'"),
        (["--dataset", "mnist"], 2, "unknown dataset"),
        (["--eps", "300"], 2, "outside [0, 255]"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent"], 1, "--download"),
        (["--init", "/nonexistent.safetensors"], 1, "does not exist"),
        (["--method-arg", "gamma=x"], 2, "expected a float"),
        (["--epochs", "0"], 2, "must be positive"),
    ],
)
def test_bad_input_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, needle: str) -> None:
    out = tmp_path / "run"
    assert main(argv + ["--out", str(out), "--no-progress"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (out / "results.json").exists()


@pytest.mark.slow
def test_default_command_shows_the_cure_effect(tmp_path: Path) -> None:
    """`python -m cure_eval.defend --model wide_resnet --method cure` with no other flags: CURE's
    PGD(20) accuracy at ε = 32/255 is ≥ 20 points above the normal model's, clean ≤ 10 points lower."""
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    # The suite's longest test. Alone, both cores (the README's setting); beside another xdist worker,
    # one thread: 2 + 1 threads on 2 cores slow both workers more than 1 thread slows this run
    # (2 + 2 epochs alone: 47.8 s on 2 threads, 60.2 s on 1).
    threads_here = 1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1)
    try:
        assert main(["--model", "wide_resnet", "--method", "cure", "--out", str(out), "--cache-dir",
                     str(tmp_path / "cache"), "--threads", str(threads_here), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == "wide_resnet16_4" and res["n_eval"] == 360
    std, cure = res["standard"], res["cure"]
    assert cure["pgd20_accuracy"] >= std["pgd20_accuracy"] + 0.20, res
    assert cure["clean_accuracy"] >= std["clean_accuracy"] - 0.10, res
    rows = read_jsonl(out / "cure" / "metrics.jsonl")
    assert rows[-1]["hz_norm"] < rows[0]["hz_norm"]  # curvature falls while robustness rises
    assert rows[-1]["probe_pgd20_acc"] > rows[0]["probe_pgd20_acc"]
    # Issue 5's qualitative claim on the embedded data: CURE lowers the input-space curvature of
    # the normal model it was fine-tuned from (top eigenvalue, ‖Hz‖, Frobenius estimate), measured
    # at the scale CURE regularises (the dataset's h = 1.0; at h = 0.5 the Frobenius estimate does
    # not fall: 6.10 → 6.36 on 20 points, while λ_max and ‖Hz‖ still do).
    from cure_eval.data import select_points
    from cure_eval.geometry import curvature_profile, curvature_summaries

    test = load_dataset("digits", "test")
    idx = select_points(len(test), 20, 0)
    x, y = test.tensors[0][idx], test.tensors[1][idx]
    geo = {}
    for name in ("standard", "cure"):
        model, _ = load_checkpoint(out / name / "model.safetensors")
        h = get_dataset_spec("digits").default_h
        prof = curvature_profile(model, x, y, h=h, k=5, device="cpu", progress=False)
        summ = curvature_summaries(model, x, y, h=h, device="cpu")
        geo[name] = (float(prof.top_eigenvalues[0]), float(summ["hz_norm"]), float(summ["frobenius"]))
    assert all(c < s for c, s in zip(geo["cure"], geo["standard"], strict=True)), geo
