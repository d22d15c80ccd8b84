"""Per-epoch WCI over training and the WCI learning-rate policy (Xu & Zhang, arXiv 2410.07719)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from cure_eval.core.io import read_jsonl
from cure_eval.data import get_dataset_spec, load_dataset
from cure_eval.defend import main
from cure_eval.errors import NotApplicable, UsageError
from cure_eval.geometry.weights import pgd_points, weight_curvature_index
from cure_eval.models import create_model, model_config_for
from cure_eval.models.checkpoint import load_checkpoint
from cure_eval.training import train
from cure_eval.training.methods import TrainContext, get_method
from cure_eval.training.wci_tracking import (
    TRACKING_KEYS,
    WCILRPolicy,
    WCITracker,
    spearman,
    tracking_summary,
    wci_hooks,
)

SPEC = get_dataset_spec("digits")
EPS = 32 / 255
CPU = torch.device("cpu")


def _data() -> tuple[torch.Tensor, torch.Tensor, WCITracker]:
    x, y = load_dataset("digits", "train").tensors
    xt, yt = load_dataset("digits", "test").tensors
    tracker = WCITracker(train_probe=(x[200:216], y[200:216]), test_probe=(xt[:16], yt[:16]), eps=EPS, n_probes=3,
                         seed=5)
    return x[:192], y[:192], tracker


def _run(out: Path, *, method: str = "standard", epochs: int = 2, tracker: WCITracker | None = None,
         policy: WCILRPolicy | None = None, stop_after: int | None = None, resume: bool = False,
         overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    x, y, _ = _data()
    mcfg = model_config_for("wide_resnet", SPEC, depth=10, widen=1)
    cls = get_method(method)
    cfg = cls.make_config(SPEC, mcfg.name, overrides={"epochs": epochs, "batch_size": 64, **(overrides or {})})
    ctx = TrainContext(spec=SPEC, eps=EPS, model_name=mcfg.name, device=CPU, epochs=epochs, steps_per_epoch=3)
    torch.manual_seed(0)
    model = create_model(mcfg)

    def on_epoch(row: dict[str, Any]) -> None:
        if stop_after is not None and row["epoch"] == stop_after:
            raise KeyboardInterrupt  # a crash right after an epoch was saved

    train(model, cls(cfg, ctx), x, y, model_config=mcfg, out_dir=out, progress=False, hooks=wci_hooks(tracker, policy),
          resume=resume, on_epoch=on_epoch)
    return read_jsonl(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same 2-epoch standard training, tracking off and on."""
    root = tmp_path_factory.mktemp("wci")
    tracker = _data()[2]
    return {"off": _run(root / "off"), "on": _run(root / "on", tracker=tracker), "dir": root / "on",
            "tracker": tracker}


def test_per_epoch_wci_is_the_audits_wci_on_the_saved_checkpoint(runs: dict[str, Any]) -> None:
    """The last row's WCI and robust accuracies are those of weight_curvature_index / pgd_points
    (the audit's estimator and PGD) run afresh on the saved checkpoint, same probe and seed."""
    tr: WCITracker = runs["tracker"]
    model, info = load_checkpoint(runs["dir"] / "model.safetensors", device=CPU)
    assert info.epoch == 2
    row = runs["on"][-1]
    (xtr, ytr), (xte, yte) = tr.train_probe, tr.test_probe
    ref = weight_curvature_index(model, xtr, ytr, eps=EPS, device=CPU, steps=10, n_probes=3, seed=5, chunk_size=512)
    assert ref["wci"] > 0
    assert row["wci"] == pytest.approx(ref["wci"], rel=1e-6)
    assert row["robust_train"] == pytest.approx(ref["adv_accuracy"], abs=1e-12)
    x_adv = pgd_points(model, xte, yte, eps=EPS, device=CPU, steps=10, seed=5)
    with torch.no_grad():
        robust_test = float((model(x_adv).argmax(1) == yte).double().mean())
        clean_test = float((model(xte).argmax(1) == yte).double().mean())
    assert row["robust_test"] == pytest.approx(robust_test, abs=1e-12)
    assert row["clean_test"] == pytest.approx(clean_test, abs=1e-12)
    assert row["robust_gap"] == pytest.approx(row["robust_train"] - row["robust_test"], abs=1e-12)


def test_tracking_off_adds_nothing_and_on_changes_no_training_number(runs: dict[str, Any]) -> None:
    off, on = runs["off"], runs["on"]
    assert len(off) == len(on) == 2
    for a, b in zip(off, on, strict=True):
        assert not set(a) & set(TRACKING_KEYS)
        assert set(b) == set(a) | set(TRACKING_KEYS)
        for k in ("loss", "train_acc", "probe_clean_acc", "lr"):  # the training RNG is untouched
            if k in a:
                assert a[k] == b[k], k


def test_policy_decays_exactly_when_its_rule_says() -> None:
    # rises at epochs 3, 4 -> cut after 4; 5 rises, 6 falls, 7, 8 rise -> cut after 8; 9, 10 rise: max reached
    wci = [5.0, 4.0, 4.5, 4.8, 5.0, 3.0, 3.1, 3.2, 3.3, 3.4]
    policy = WCILRPolicy(patience=2, factor=0.1, max_decays=2)
    fired = [e for e, w in enumerate(wci, start=1) if policy.update(e, w)]
    assert fired == [4, 8] and policy.decay_epochs == [4, 8]
    once = WCILRPolicy(patience=1, max_decays=5)
    assert [e for e, w in enumerate([1.0, 1.0, 2.0, 2.0, 3.0], start=1) if once.update(e, w)] == [3, 5]  # ties are no rise
    # its state survives a weights-only round trip and continues identically
    resumed = WCILRPolicy(patience=2, factor=0.1, max_decays=2)
    first = WCILRPolicy(patience=2, factor=0.1, max_decays=2)
    for e, w in enumerate(wci[:3], start=1):
        first.update(e, w)
    blob = io.BytesIO()
    torch.save({"wci_policy": first.state_dict()}, blob)
    blob.seek(0)
    resumed.load_state_dict(torch.load(blob, weights_only=True)["wci_policy"])
    assert [e for e, w in enumerate(wci[3:], start=4) if resumed.update(e, w)] == [4, 8]
    warm = WCILRPolicy(patience=2, warmup=3)  # the rises at epochs 2, 3 do not count; 4, 5 do
    assert [e for e, w in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=1) if warm.update(e, w)] == [5]
    with pytest.raises(UsageError, match="factor"):
        WCILRPolicy(factor=1.5)


@pytest.mark.parametrize("schedule", ["constant", "step"])
def test_a_cut_sticks_under_the_schedule(schedule: str) -> None:
    """The cut multiplies the LR on top of the schedule: constant (computed from base LRs) and
    step (computed from the current LR) both keep it."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.5)
    sched: torch.optim.lr_scheduler.LRScheduler = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0) if schedule == "constant"
        else torch.optim.lr_scheduler.MultiStepLR(opt, [4], gamma=0.1))
    policy = WCILRPolicy(factor=0.1)
    opt.step()
    sched.step()
    policy.apply(opt, sched)
    lrs = []
    for _ in range(5):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    expected = [0.05, 0.05, 0.005, 0.005, 0.005] if schedule == "step" else [0.05] * 5
    assert lrs == pytest.approx(expected, rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["standard", "pgd_at"])
def test_the_policy_cuts_the_lr_of_any_method_as_its_wci_says(tmp_path: Path, method: str) -> None:
    """End to end, constant schedule: epoch e's LR is lr0 · 0.1^(cuts after epochs < e), the cuts
    being those a fresh policy makes from the recorded WCI sequence."""
    tracker = _data()[2]
    rows = _run(tmp_path, method=method, epochs=3, tracker=tracker, policy=WCILRPolicy(patience=1, max_decays=2),
                overrides={"lr_schedule": "constant"})
    replay = WCILRPolicy(patience=1, max_decays=2)
    cuts = [int(replay.update(r["epoch"], r["wci"])) for r in rows]
    assert [r["wci_lr_decay"] for r in rows] == cuts
    lr0 = rows[0]["lr"]
    for i, r in enumerate(rows):
        assert r["lr"] == pytest.approx(lr0 * 0.1 ** sum(cuts[:i]), rel=1e-9)
    assert all(math.isfinite(r["wci"]) and 0 <= r["robust_test"] <= 1 for r in rows)


def test_the_policy_needs_tracking(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="needs per-epoch WCI"):
        _run(tmp_path, epochs=1, policy=WCILRPolicy())


@pytest.mark.slow
def test_resume_with_tracking_and_policy_gives_the_uninterrupted_metrics(tmp_path: Path) -> None:
    tracker = _data()[2]
    kw: dict[str, Any] = {"epochs": 3, "tracker": tracker, "overrides": {"lr_schedule": "constant"}}
    straight = _run(tmp_path / "a", policy=WCILRPolicy(patience=1), **kw)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", policy=WCILRPolicy(patience=1), stop_after=2, **kw)
    resumed = _run(tmp_path / "b", policy=WCILRPolicy(patience=1), resume=True, **kw)
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed, strict=True):
        a.pop("seconds")
        b.pop("seconds")
        assert a == b


def test_spearman_against_a_hand_computation() -> None:
    # no ties: 1 - 6 Σd² / (n(n²-1)) with ranks (1,2,3,4,5) vs (2,1,4,3,5): Σd² = 4 -> 1 - 24/120 = 0.8
    assert spearman([1.0, 2.0, 3.0, 4.0, 5.0], [0.2, 0.1, 0.4, 0.3, 0.9]) == pytest.approx(0.8, abs=1e-12)
    # ties get average ranks: (1,2,3,4,5) vs (1,2,3.5,5,3.5): Pearson of the ranks = 8 / sqrt(10 · 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    assert math.isnan(spearman([1, 2], [2, 1])) and math.isnan(spearman([1, 2, 3], [1, 1, 1]))


def test_tracking_summary_reads_final_best_and_correlation() -> None:
    rows = [{"epoch": e, "lr": 0.1, "wci": w, "robust_gap": g, "robust_train": 0.5 + g, "robust_test": 0.5 - g / 2 + d}
            for e, w, g, d in [(1, 1.0, 0.0, 0.0), (2, 2.0, 0.1, 0.2), (3, 3.0, 0.3, 0.0)]]
    s = tracking_summary([{"epoch": 0, "lr": 0.1}, *rows])  # an untracked row is skipped
    assert s["epochs"] == [1, 2, 3] and s["spearman"] == pytest.approx(1.0)
    assert s["best_epoch"] == 2 and s["best_robust_test"] == pytest.approx(0.65)
    assert s["final_robust_test"] == pytest.approx(0.35) and s["final_robust_gap"] == pytest.approx(0.3)


@pytest.mark.slow
def test_defend_track_wci_writes_results_and_figure(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["--method", "standard", "--depth", "10", "--widen", "1", "--pretrain-epochs", "3", "--train-n", "128",
                 "--eval-n", "64", "--pretrain-batch-size", "64", "--track-wci", "--wci-probe-n", "16", "--wci-probes", "2",
                 "--lr-policy", "wci", "--wci-patience", "1", "--out", str(out), "--no-cache", "--no-progress",
                 "--threads", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    w = res["wci_tracking"]["standard"]
    rows = read_jsonl(out / "standard" / "metrics.jsonl")
    assert w["epochs"] == [1, 2, 3] and w["wci"] == [r["wci"] for r in rows]
    assert w["spearman"] == pytest.approx(spearman(w["wci"], w["robust_gap"]), nan_ok=True)
    assert w["settings"]["train_probe_n"] == 16 and w["lr_policy"]["patience"] == 1
    assert w["decay_epochs"] == [r["epoch"] for r in rows if r["wci_lr_decay"]]
    png = out / w["figure"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["wci_tracking"]["probe_n"] == 16


def test_a_model_without_conv_linear_weights_is_recorded_not_applicable(tmp_path: Path) -> None:
    """WCI does not apply to RawParameterNet: each row says so, training and the other numbers go on."""
    from cure_eval.testing import RawParameterNet

    x, y, tracker = _data()
    mcfg = model_config_for("wide_resnet", SPEC, depth=10, widen=1)  # only recorded in the checkpoint
    cls = get_method("standard")
    cfg = cls.make_config(SPEC, mcfg.name, overrides={"epochs": 2, "batch_size": 64})
    ctx = TrainContext(spec=SPEC, eps=EPS, model_name=mcfg.name, device=CPU, epochs=2, steps_per_epoch=3)
    train(RawParameterNet(), cls(cfg, ctx), x, y, model_config=mcfg, out_dir=tmp_path, progress=False,
          hooks=wci_hooks(tracker, WCILRPolicy(patience=1)))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all("conv/linear" in r["wci_not_applicable"] and "wci" not in r and r["wci_lr_decay"] == 0 for r in rows)
    with pytest.raises(NotApplicable):
        tracking_summary(rows)
