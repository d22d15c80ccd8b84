"""The training loop's device-side bookkeeping: metrics summed on the device and read every N steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cure_eval.core.io import read_jsonl
from cure_eval.data import get_dataset_spec, load_dataset
from cure_eval.errors import CureEvalError
from cure_eval.models import create_model, model_config_for
from cure_eval.training import to_device, train
from cure_eval.training.methods import StepStats, TrainContext, get_method

SPEC = get_dataset_spec("digits")


def _setup(method: str = "standard", epochs: int = 2) -> tuple:
    ds = load_dataset("digits", "train")
    x, y = ds.tensors[0][:192], ds.tensors[1][:192]
    mcfg = model_config_for("wide_resnet", SPEC, depth=10, widen=1)
    cls = get_method(method)
    cfg = cls.make_config(SPEC, mcfg.name, overrides={"epochs": epochs, "batch_size": 32})
    ctx = TrainContext(spec=SPEC, eps=0.1, model_name=mcfg.name, device=torch.device("cpu"), epochs=epochs, steps_per_epoch=6)
    return x, y, mcfg, cls, cfg, ctx


@pytest.mark.parametrize("method", ["standard", "cure"])
def test_reading_metrics_every_step_or_every_n_steps_changes_nothing(tmp_path: Path, method: str) -> None:
    """sync_every only decides when the host reads the sums: same weights, same metrics (to float
    rounding of the mean), whether read after every step (the old loop) or once per epoch."""
    x, y, mcfg, cls, cfg, ctx = _setup(method)
    results = {}
    for sync_every in (1, 50):
        torch.manual_seed(0)
        model = create_model(mcfg)
        train(model, cls(cfg, ctx), x, y, model_config=mcfg, out_dir=tmp_path / str(sync_every), progress=False,
              sync_every=sync_every)
        results[sync_every] = (model.state_dict(), read_jsonl(tmp_path / str(sync_every) / "metrics.jsonl"))
    torch.testing.assert_close(results[1][0], results[50][0], rtol=0, atol=0)
    for a, b in zip(results[1][1], results[50][1], strict=True):
        assert a.keys() == b.keys()
        for k in ("loss", "train_acc"):
            assert a[k] == pytest.approx(b[k], rel=1e-12)
    assert results[1][1][0]["loss"] > 0 and 0 < results[1][1][-1]["train_acc"] <= 1


def test_step_metrics_are_means_over_the_epochs_steps(tmp_path: Path) -> None:
    """Floats and tensors alike: the row holds the mean of what the steps returned."""
    x, y, mcfg, cls, cfg, ctx = _setup(epochs=1)
    seen: list[tuple[float, float]] = []

    class Recording(cls):  # type: ignore[misc, valid-type]
        def step(self, model, optimizer, xb, yb) -> StepStats:  # type: ignore[no-untyped-def]
            stats = super().step(model, optimizer, xb, yb)
            seen.append((float(stats["loss"]), float(stats["train_acc"])))
            return {"loss": stats["loss"], "as_float": float(len(seen))}

    torch.manual_seed(0)
    train(create_model(mcfg), Recording(cfg, ctx), x, y, model_config=mcfg, out_dir=tmp_path, progress=False, sync_every=4)
    row = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert len(seen) == 6
    assert row["loss"] == pytest.approx(sum(s[0] for s in seen) / 6, rel=1e-9)
    assert row["as_float"] == pytest.approx(3.5)


def test_a_diverging_step_stops_training_with_a_clear_error(tmp_path: Path) -> None:
    x, y, mcfg, cls, cfg, ctx = _setup(epochs=2)
    calls = []

    class Diverging(cls):  # type: ignore[misc, valid-type]
        def step(self, model, optimizer, xb, yb) -> StepStats:  # type: ignore[no-untyped-def]
            stats = super().step(model, optimizer, xb, yb)
            calls.append(1)
            return {**stats, "loss": torch.tensor(float("nan")) if len(calls) == 2 else stats["loss"]}

    torch.manual_seed(0)
    with pytest.raises(CureEvalError, match="training diverged at epoch 1 before step 4.*lower the learning rate"):
        train(create_model(mcfg), Diverging(cfg, ctx), x, y, model_config=mcfg, out_dir=tmp_path, progress=False,
              sync_every=4)
    assert not (tmp_path / "model.safetensors").exists()  # no checkpoint of the diverged epoch
    with pytest.raises(Exception, match="sync_every"):
        train(create_model(mcfg), cls(cfg, ctx), x, y, model_config=mcfg, out_dir=tmp_path, progress=False, sync_every=0)


def test_to_device_is_a_no_op_on_the_same_device() -> None:
    t = torch.arange(4)
    assert to_device(t, torch.device("cpu")) is t
