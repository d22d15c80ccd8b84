"""Data-parallel training: 2 ``gloo`` processes on the CPU (``torchrun`` and ``mp.spawn``).

* ``torchrun -m cure_eval.defend`` completes for ``cure`` (with the normal model it starts from) and
  for ``standard``, writes the run folder from rank 0, and resumes after being killed;
* two processes on half batches give the weights of one process on the whole batch (float
  tolerance) when nothing depends on batch statistics: CURE with ``bn_mode=frozen`` on the
  Wide-ResNet (BatchNorm is then a fixed affine map), and a BatchNorm-free CNN with augmentation.
  With BatchNorm in train mode each rank normalises with its half batch, so the runs differ (a
  little) by design; see :mod:`cure_eval.core.distributed`. SGD rather than Adam: Adam's first steps
  are ``≈ lr·sign(g)``, which turns float round-off in near-zero gradients into ``lr``-sized jumps;
* an interrupted run resumes under 2 ranks to the same weights as an uninterrupted one, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from cure_eval.core.io import append_jsonl, read_jsonl
from cure_eval.data import get_dataset_spec, load_dataset
from cure_eval.defend import main
from cure_eval.models import NormalizedModel, create_model, model_config_for
from cure_eval.models.checkpoint import CheckpointInfo, load_train_state, save_checkpoint
from cure_eval.training import train
from cure_eval.training.methods import TrainContext, get_method
from cure_eval.training.wci_tracking import WCILRPolicy, WCITracker, wci_hooks

pytestmark = [pytest.mark.slow,  # torchrun, end to end
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")]

TINY = ["--depth", "10", "--widen", "1", "--eval-n", "30", "--train-n", "256", "--no-progress"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _torchrun_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
            "-m", "cure_eval.defend", *args]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(_torchrun_cmd(args), capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_torchrun_cure_with_its_normal_model_writes_the_run_folder(tmp_path: Path) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    res = _torchrun(TINY + ["--epochs", "1", "--pretrain-epochs", "1", "--out", str(out), "--cache-dir", str(cache)])
    for f in ["config.json", "results.json", "results.md", "standard/model.safetensors", "standard/metrics.jsonl",
              "cure/model.safetensors", "cure/metrics.jsonl", "cure/train_state.pt"]:
        assert (out / f).is_file(), f
    summary = json.loads((out / "results.json").read_text())
    assert summary["method"] == "cure" and summary["n_eval"] == 30
    for key in ("standard", "cure"):
        assert 0.0 <= summary[key]["clean_accuracy"] <= 1.0 and 0.0 <= summary[key]["pgd20_accuracy"] <= 1.0
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    rows = read_jsonl(out / "cure" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1] and rows[0]["regularizer"] > 0 and "probe_pgd20_acc" in rows[0]
    assert len(list(cache.iterdir())) == 1  # rank 0 alone filled the cache
    assert res.stdout.count("| model ") == 1  # one table (stdout): rank 0 alone evaluates and prints


def test_torchrun_standard_killed_then_resumed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = TINY + ["--method", "standard", "--pretrain-epochs", "8", "--out", str(out), "--no-cache"]
    proc = subprocess.Popen(_torchrun_cmd(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    metrics, state = out / "standard" / "metrics.jsonl", out / "standard" / "train_state.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not state.exists():
        time.sleep(0.02)
    # SIGTERM to torchrun, as a scheduler or Ctrl-C would: it stops both workers and waits for them
    # (SIGKILL would orphan them: torchrun starts each worker in a session of its own).
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    done = int(load_train_state(state)["epoch"])
    assert 1 <= done < 8, "the run should have been killed in the middle of training"
    assert not (out / "results.json").exists()
    res = _torchrun(args + ["--resume"])
    assert f"resuming cifar_wide_resnet from epoch {done}/8" in res.stderr
    assert [r["epoch"] for r in read_jsonl(metrics)] == list(range(1, 9))
    assert json.loads((out / "results.json").read_text())["standard"]["clean_accuracy"] > 0


def test_torchrun_cure_matches_one_process_without_batch_statistics(tmp_path: Path) -> None:
    spec = get_dataset_spec("digits")
    mcfg = model_config_for("wide_resnet", spec, depth=10, widen=1)
    torch.manual_seed(0)
    init = tmp_path / "init.safetensors"
    save_checkpoint(init, create_model(mcfg), CheckpointInfo(model=mcfg, dataset="digits", method="standard"))
    args = TINY + ["--method", "cure", "--init", str(init), "--epochs", "1", "--method-arg", "bn_mode=frozen",
                   "--method-arg", "optimizer=sgd", "--method-arg", "lr=0.05", "--method-arg", "lr_schedule=constant"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    _torchrun(args + ["--out", str(tmp_path / "two")])
    one = load_file(str(tmp_path / "one" / "cure" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "cure" / "model.safetensors"))
    start = load_file(str(init))
    moved = max(float((one[k] - start[k]).abs().max()) for k in one if one[k].is_floating_point())
    assert moved > 1e-2  # 4 real steps of double backprop happened
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    r1, r2 = read_jsonl(tmp_path / "one" / "cure" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "cure" / "metrics.jsonl")
    for key in ("loss", "regularizer", "train_acc"):
        assert r2[0][key] == pytest.approx(r1[0][key], rel=1e-4), key  # means over the ranks


# -- train() in a process group made by mp.spawn -----------------------------------------------
def _cnn() -> nn.Module:
    """BatchNorm-free, so that half batches on two ranks are exactly a whole batch on one."""
    spec = get_dataset_spec("digits")
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2),
                        nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 10))
    return NormalizedModel(net, spec.mean, spec.std)


def _run(out: Path, method: str, overrides: dict[str, object], *, stop_after: int | None = None,
         resume: bool = False, track: bool = False) -> nn.Module:
    # Augmentation on (digits has none): every rank must draw the one-process crops and flips.
    spec = dataclasses.replace(get_dataset_spec("digits"), crop_padding=1, hflip=True)
    x, y = load_dataset("digits", "train").tensors
    x, y = x[:256], y[:256]
    mcfg = model_config_for("wide_resnet", spec, depth=10, widen=1)  # checkpoint metadata only
    cls = get_method(method)
    cfg = cls.make_config(spec, mcfg.name, overrides={"epochs": 2, "batch_size": 64, "optimizer": "sgd",
                                                      "lr": 0.05, **overrides})
    ctx = TrainContext(spec=spec, eps=0.1, model_name=mcfg.name, device=torch.device("cpu"), epochs=2, steps_per_epoch=4)
    torch.manual_seed(0)
    model = _cnn()

    def on_epoch(row: dict[str, object]) -> None:
        if stop_after is not None and row["epoch"] == stop_after:
            raise KeyboardInterrupt  # a crash right after an epoch was saved

    # WCI tracking (rank 0 measures) and the WCI LR policy (every rank decides from rank 0's WCI)
    wci = WCITracker(train_probe=(x[:16], y[:16]), test_probe=(x[200:216], y[200:216]), eps=0.1, n_probes=2,
                     seed=1) if track else None
    train(model, cls(cfg, ctx), x, y, model_config=mcfg, out_dir=out, seed=3, resume=resume, progress=False,
          on_epoch=on_epoch, hooks=wci_hooks(wci, WCILRPolicy(patience=1) if track else None))
    return model


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        root = Path(out)
        model = _run(root / "standard", "standard", {"epochs": 3}, track=True)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        copies = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(copies, flat)
        assert all(torch.equal(c, flat) for c in copies), "ranks hold different weights"
        # PGD-AT draws random starts from the global RNG: resuming must redraw them exactly.
        pgd = {"steps": 2}
        _run(root / "pgd_straight", "pgd_at", pgd)
        try:
            _run(root / "pgd_resumed", "pgd_at", pgd, stop_after=1)
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("on_epoch should have interrupted the run")
        if rank == 0:  # killed between appending epoch 2's metrics and saving its state
            append_jsonl(root / "pgd_resumed" / "metrics.jsonl", {"epoch": 2, "loss": -1.0})
        dist.barrier()
        _run(root / "pgd_resumed", "pgd_at", pgd, resume=True)
    finally:
        dist.destroy_process_group()


def test_train_under_two_ranks_matches_one_process_and_resumes_exactly(tmp_path: Path) -> None:
    old = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    os.environ.update({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"})  # inherited by the workers
    try:
        mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two")), nprocs=2, join=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    one = _run(tmp_path / "one", "standard", {"epochs": 3}, track=True)
    two = load_file(str(tmp_path / "two" / "standard" / "model.safetensors"))
    rows_one = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    rows_two = read_jsonl(tmp_path / "two" / "standard" / "metrics.jsonl")
    # the policy cut the LR after epoch 2 on every rank (the ranks' weights are equal) as in one process
    assert [r["wci_lr_decay"] for r in rows_two] == [r["wci_lr_decay"] for r in rows_one] == [0, 1, 0]
    assert [r["lr"] for r in rows_two] == pytest.approx([r["lr"] for r in rows_one], rel=1e-9)
    for a, b in zip(rows_one, rows_two, strict=True):
        assert b["wci"] == pytest.approx(a["wci"], rel=1e-3) and b["robust_test"] == pytest.approx(a["robust_test"], abs=0.07)
    torch.manual_seed(0)
    start = _cnn().state_dict()
    assert max(float((v - start[k]).abs().max()) for k, v in one.state_dict().items() if "normalize" not in k) > 1e-2
    for k, v in one.state_dict().items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-5, msg=k)

    straight = load_file(str(tmp_path / "two" / "pgd_straight" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "two" / "pgd_resumed" / "model.safetensors"))
    for k, v in straight.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0, msg=k)
    rows = read_jsonl(tmp_path / "two" / "pgd_resumed" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["loss"] > 0  # the stale line was dropped
