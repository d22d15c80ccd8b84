"""The epoch-hook contract of the training loop (cure_eval.training.hooks; docs/ARCHITECTURE.md)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from cure_eval.core.io import read_jsonl
from cure_eval.data import get_dataset_spec, load_dataset
from cure_eval.errors import CureEvalError, UsageError
from cure_eval.models import create_model, model_config_for
from cure_eval.models.checkpoint import load_train_state
from cure_eval.training import EpochEnd, EpochHook, ResumableHook, train
from cure_eval.training.methods import TrainContext, get_method
from cure_eval.training.probes import ProbeHook
from cure_eval.training.wci_tracking import WCILRPolicy, WCILRPolicyHook

SPEC = get_dataset_spec("digits")
CPU = torch.device("cpu")


class Seen:
    """Records what it was shown; returns the row's keys so far and its call count."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool, bool]] = []

    def on_epoch_end(self, end: EpochEnd) -> Mapping[str, Any]:
        self.calls.append((end.epoch, end.main, end.model.training))
        return {"seen_keys": sorted(end.row), "seen_calls": len(self.calls)}


class Counter:
    """A resumable hook: a running sum of the epochs' losses, kept across a resume."""

    state_key = "counter"

    def __init__(self) -> None:
        self.total = 0.0

    def on_epoch_end(self, end: EpochEnd) -> Mapping[str, Any]:
        self.total += float(end.row["loss"])
        return {"loss_sum": self.total}

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = float(state["total"])


def _train(out: Path, hooks: list[EpochHook], *, epochs: int = 2, resume: bool = False,
           stop_after: int | None = None) -> torch.nn.Module:
    x, y = load_dataset("digits", "train").tensors
    mcfg = model_config_for("wide_resnet", SPEC, depth=10, widen=1)
    cls = get_method("standard")
    cfg = cls.make_config(SPEC, mcfg.name, overrides={"epochs": epochs, "batch_size": 64})
    ctx = TrainContext(spec=SPEC, eps=32 / 255, model_name=mcfg.name, device=CPU, epochs=epochs, steps_per_epoch=3)
    torch.manual_seed(0)
    model = create_model(mcfg)

    def on_epoch(row: dict[str, Any]) -> None:
        if stop_after is not None and row["epoch"] == stop_after:
            raise KeyboardInterrupt  # a crash right after an epoch was saved

    train(model, cls(cfg, ctx), x[:192], y[:192], model_config=mcfg, out_dir=out, progress=False, hooks=hooks,
          resume=resume, on_epoch=on_epoch)
    return model


def test_the_builtin_hooks_satisfy_the_protocols() -> None:
    probe = (torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))
    assert isinstance(ProbeHook(probe), EpochHook) and not isinstance(ProbeHook(probe), ResumableHook)
    policy_hook = WCILRPolicyHook(WCILRPolicy())
    assert isinstance(policy_hook, ResumableHook) and policy_hook.state_key == "wci_policy"


def test_hooks_run_in_order_see_the_row_so_far_and_change_no_training_number(tmp_path: Path) -> None:
    """Metrics merge into the row in hook order; a measuring hook (the probe: PGD(20) in eval
    mode) leaves the weights and the training metrics bit-identical and the model in train mode."""
    xt, yt = load_dataset("digits", "test").tensors
    plain = _train(tmp_path / "plain", [])
    first, second = Seen(), Seen()
    hooked = _train(tmp_path / "hooked", [first, ProbeHook((xt[:32], yt[:32])), second])
    torch.testing.assert_close(plain.state_dict(), hooked.state_dict(), rtol=0, atol=0)
    rows, base = read_jsonl(tmp_path / "hooked" / "metrics.jsonl"), read_jsonl(tmp_path / "plain" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert first.calls == second.calls == [(1, True, True), (2, True, True)]
    for row, ref in zip(rows, base, strict=True):
        assert row["loss"] == ref["loss"] and row["train_acc"] == ref["train_acc"] and row["lr"] == ref["lr"]
        # the second Seen ran after the first and the probe, and overwrote their shared keys
        assert {"probe_clean_acc", "probe_pgd20_acc", "seen_calls"} <= set(row["seen_keys"])
        assert "probe_clean_acc" not in ref and 0 <= row["probe_pgd20_acc"] <= row["probe_clean_acc"] <= 1


def test_a_resumable_hooks_state_is_saved_and_restored(tmp_path: Path) -> None:
    straight = Counter()
    _train(tmp_path / "a", [straight], epochs=3)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", [Counter()], epochs=3, stop_after=2)
    saved = load_train_state(tmp_path / "b" / "train_state.pt")
    assert saved["counter"]["total"] == pytest.approx(sum(r["loss"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")))
    resumed = Counter()
    _train(tmp_path / "b", [resumed], epochs=3, resume=True)
    a, b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["loss_sum"] for r in a] == [r["loss_sum"] for r in b] and resumed.total == straight.total


def test_a_resume_without_the_hooks_state_and_clashing_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, [], epochs=2, stop_after=1)
    with pytest.raises(CureEvalError, match="written without the 'counter' epoch hook"):
        _train(tmp_path, [Counter()], epochs=2, resume=True)
    with pytest.raises(UsageError, match="same key"):
        _train(tmp_path / "c", [Counter(), Counter()], epochs=1)


def test_the_policy_hook_alone_is_refused(tmp_path: Path) -> None:
    """The WCI policy reads the tracking hook's WCI: without it the loop stops after epoch 1."""
    with pytest.raises(UsageError, match="needs per-epoch WCI"):
        _train(tmp_path, [WCILRPolicyHook(WCILRPolicy())], epochs=1)
