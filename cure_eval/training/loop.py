"""The training loop shared by every method: batching, augmentation, checkpoints, resume.

:func:`train` restores (``resume=True`` continues after the last completed epoch), then per epoch
runs the epoch's steps and ends the epoch: the epoch hooks' metrics (:mod:`cure_eval.training.hooks`)
join the row, and it appends one JSON line to ``metrics.jsonl`` and writes, atomically,
``train_state.pt`` (model, optimiser, scheduler and RNG state, the resumable hooks' state; loaded
with ``weights_only=True``) and ``model.safetensors`` (the checkpoint). Per-epoch measurements
(the probe, WCI tracking) and the WCI learning-rate policy are hooks that the caller passes in:
this module imports no analysis code.

Inside a process group (``torchrun``, see :mod:`cure_eval.core.distributed`) :func:`train` trains data
parallel with no change for the caller:

* batches: every rank draws the same global batch of ``batch_size`` indices (seeded by
  ``(seed, epoch)``) and augments the *whole* global batch with the same generator, then keeps
  its contiguous share ``[r·B/N, (r+1)·B/N)`` (as ``epoch_batches(..., rank=r, world=N)``);
  so the global batches and their augmentation are exactly those of one process.
  ``batch_size`` must be divisible by ``N``.
* model: rank 0's weights are broadcast at the start (after a resume too); gradients and
  BatchNorm running statistics are averaged before every ``optimizer.step()``
  (:class:`~cure_eval.core.distributed.GradientAverager`, a step pre-hook on the optimizer: the
  method plugins are unchanged); the model state is synchronised from rank 0 at every epoch
  end, before the hooks and the checkpoint.
* other randomness (PGD random starts, TRADES noise: the global RNG) is per rank, reseeded at
  each epoch from ``(seed, epoch, rank)``, so resuming is exact under ``N`` ranks too (a
  one-process run draws from one continuing stream instead, restored from ``train_state.pt``).
* hooks run on every rank (measuring hooks measure on rank 0; rank 0's row is broadcast).
* files: only rank 0 writes ``metrics.jsonl``, ``train_state.pt`` and the checkpoint; every
  rank reads ``train_state.pt`` on resume (a shared filesystem). Logged per-step statistics are
  means over the ranks; ``seconds`` is rank 0's.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core import distributed
from ..core.io import append_jsonl, read_jsonl, write_text_atomic
from ..core.modes import eval_mode  # noqa: F401  (re-exported: the name's old home)
from ..data import DatasetSpec
from ..errors import CureEvalError, UsageError
from ..models import ModelConfig
from ..models.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointInfo,
    load_train_state,
    save_checkpoint,
    save_train_state,
    unwrap,
)
from .hooks import EpochEnd, EpochHook, ResumableHook
from .methods import Method, config_dict

log = logging.getLogger(__name__)

STATE_NAME = "train_state.pt"
METRICS_NAME = "metrics.jsonl"


def augment(x: torch.Tensor, spec: DatasetSpec, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, per sample, vectorised (CIFAR style).

    The draws come from ``gen`` on ``gen``'s device; with ``x`` and ``gen`` on the GPU the whole
    augmentation runs there without a host round trip.
    """
    dev = gen.device
    if spec.crop_padding:
        p = spec.crop_padding
        b, c, hgt, wid = x.shape
        xp = F.pad(x, (p, p, p, p))
        di = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=dev).to(x.device)
        dj = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=dev).to(x.device)
        rows = (di[:, None] + torch.arange(hgt, device=x.device))[:, None, :, None]
        cols = (dj[:, None] + torch.arange(wid, device=x.device))[:, None, None, :]
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(c, device=x.device)[None, :, None, None]
        x = xp[bi, ci, rows, cols]
    if spec.hflip:
        flip = (torch.rand(x.shape[0], generator=gen, device=dev) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy ``t`` to ``device``: through pinned memory and asynchronously for a CUDA device."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """Index batches of one epoch: a permutation seeded by ``(seed, epoch)``, split across ranks.

    Each rank gets every ``world``-th index of the global permutation, so ``world`` ranks with
    per-rank batch ``batch_size // world`` see the same global batches as one process.
    Incomplete final batches are dropped (BatchNorm cannot train on a batch of one).
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    full = (n // batch_size) * batch_size
    if full == 0:
        raise CureEvalError(f"batch size {batch_size} is larger than the training set ({n}): lower batch_size")
    local = batch_size // world
    return [perm[i:i + batch_size][rank * local:(rank + 1) * local] for i in range(0, full, batch_size)]


@dataclass
class TrainResult:
    model: nn.Module
    metrics: list[dict[str, Any]]
    seconds_per_epoch: float
    resumed_from: int


@dataclass
class _Run:
    """One call of :func:`train`: what its phases (restore, epoch, end of epoch) share."""

    model: nn.Module
    method: Method[Any]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    out: Path
    seed: int
    hooks: tuple[EpochHook, ...]
    progress: bool
    sync_every: int
    world: int
    rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def state_path(self) -> Path:
        return self.out / STATE_NAME

    @property
    def metrics_path(self) -> Path:
        return self.out / METRICS_NAME

    @property
    def local(self) -> slice:
        """This rank's share of every global batch (the whole batch in a single process)."""
        share = self.method.config.batch_size // self.world
        return slice(self.rank * share, (self.rank + 1) * share)


def train(
    model: nn.Module,
    method: Method[Any],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    model_config: ModelConfig,
    out_dir: str | Path,
    seed: int = 0,
    resume: bool = False,
    hooks: Sequence[EpochHook] = (),
    progress: bool = True,
    checkpoint_extra: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    sync_every: int = 50,
) -> TrainResult:
    """Train ``model`` in place with ``method`` on [0, 1] images ``x`` and labels ``y``.

    Restore (``resume``), then per epoch: run the epoch's steps, end the epoch (the hooks' metrics,
    the saved state, the checkpoint). Distributed training: see the module docstring.

    Args:
        model: the model (on ``method.ctx.device``).
        method: the configured method instance (owns the optimisation step).
        out_dir: folder for ``metrics.jsonl``, ``train_state.pt`` and ``model.safetensors``.
        seed: seeds batch order and augmentation.
        resume: continue after the last completed epoch in ``out_dir`` if there is one.
        hooks: epoch hooks (:mod:`cure_eval.training.hooks`), called in this order at the end of
            every epoch; their metrics join the epoch's row, and the state of a
            :class:`~cure_eval.training.hooks.ResumableHook` is saved and restored. Empty (the
            default): the rows hold the training metrics only.
        on_epoch: called with each epoch's metrics row (on every rank, with rank 0's row).
        sync_every: read the step metrics (summed on the device) every this many steps, for the
            progress bar and the divergence check; 1 reads them after every step, which makes a
            GPU wait for each step to finish.
    """
    if sync_every < 1:
        raise UsageError(f"sync_every must be at least 1, got {sync_every}")
    keys = [h.state_key for h in hooks if isinstance(h, ResumableHook)]
    if len(set(keys)) != len(keys):
        raise UsageError(f"two epoch hooks save their state under the same key ({', '.join(keys)}): give each its own")
    world, rank = distributed.world_size(), distributed.rank()
    cfg = method.config
    if cfg.batch_size % world:
        raise UsageError(f"batch size {cfg.batch_size} is not divisible by the {world} processes: "
                         f"use a multiple of {world}")
    out = Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    optimizer, scheduler = method.make_optimizer(model)
    run = _Run(model=model, method=method, optimizer=optimizer, scheduler=scheduler, out=out, seed=seed,
               hooks=tuple(hooks), progress=progress, sync_every=sync_every, world=world, rank=rank)
    start, history = _restore(run, resume=resume)
    averager = None
    if world > 1:
        # The optimizer is private to this call, so its hook goes with it even on an exception.
        distributed.broadcast_module_(unwrap(model))
        averager = distributed.GradientAverager(optimizer, unwrap(model))

    info = CheckpointInfo(model=model_config, dataset=method.ctx.spec.name, method=method.name,
                          method_config=config_dict(cfg), extra=dict(checkpoint_extra or {}))
    # On a GPU the training set lives there (CIFAR-10: 0.6 GB) and is gathered and augmented there;
    # the batch order is drawn on the host once per epoch and copied in one transfer.
    device = method.ctx.device
    xs, ys = to_device(x, device), to_device(y, device)
    aug_gen = torch.Generator(device=device if device.type == "cuda" else torch.device("cpu")).manual_seed(seed + 1)
    epoch_times = []
    for epoch in range(start, cfg.epochs):
        means, seconds = _run_epoch(run, epoch, xs, ys, aug_gen)
        epoch_times.append(seconds)
        row = _end_epoch(run, epoch, means, seconds, history, info)
        if on_epoch is not None:
            on_epoch(row)
    if averager is not None:
        averager.remove()
    distributed.barrier()  # rank 0's files are complete before any rank reads them
    model.eval()
    return TrainResult(model=model, metrics=read_jsonl(run.metrics_path),
                       seconds_per_epoch=(sum(epoch_times) / len(epoch_times)) if epoch_times else float("nan"),
                       resumed_from=start)


def _restore(run: _Run, *, resume: bool) -> tuple[int, list[dict[str, Any]]]:
    """Restore the last completed epoch (``resume``) or clear the folder; rewrite ``metrics.jsonl``
    from the restored history. Returns the epoch to start from (0-based) and the history."""
    state_path, metrics_path = run.state_path, run.metrics_path
    start = 0
    history: list[dict[str, Any]] = []
    has_state = distributed.broadcast_object(resume and state_path.is_file())  # rank 0 decides
    if has_state and not state_path.is_file():
        raise CureEvalError(f"rank {run.rank} cannot see {state_path}: the run folder must be on a "
                            "filesystem shared by every process")
    if has_state:
        state = load_train_state(state_path)
        unwrap(run.model).load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start = int(state["epoch"])
        history = json.loads(state["metrics"]) if "metrics" in state else []
        for hook in run.hooks:
            if isinstance(hook, ResumableHook):
                if hook.state_key not in state:
                    raise CureEvalError(f"{state_path} was written without the {hook.state_key!r} epoch hook: "
                                        "resume it without that hook, or start over")
                hook.load_state_dict(state[hook.state_key])
        log.info("resuming %s from epoch %d/%d", run.method.ctx.model_name, start, run.method.config.epochs)
    elif not resume and run.main:
        for stale in (state_path, metrics_path, run.out / CHECKPOINT_NAME):
            stale.unlink(missing_ok=True)
    distributed.barrier()  # every rank has read the state before rank 0 rewrites metrics.jsonl
    if run.main:
        # The training state is the record of completed epochs: metrics.jsonl is rewritten from it,
        # so a run killed between the two writes never keeps or loses a line.
        if has_state and not history:  # a state written before metrics were kept in it
            history = [r for r in read_jsonl(metrics_path) if int(r.get("epoch", 0)) <= start]
        write_text_atomic(metrics_path, "".join(_jsonl(r) for r in history))
    return start, history


def _run_epoch(run: _Run, epoch: int, xs: torch.Tensor, ys: torch.Tensor,
               aug_gen: torch.Generator) -> tuple[dict[str, float], float]:
    """The steps of epoch ``epoch`` (0-based); returns the per-step means (averaged over the ranks)
    and the epoch's seconds. Raises ``CureEvalError`` when the running means stop being finite."""
    model, method, cfg = run.model, run.method, run.method.config
    device, local = method.ctx.device, run.local
    method.start_epoch(epoch)
    aug_gen.manual_seed(run.seed * 7919 + epoch)
    if run.world > 1:
        torch.manual_seed(distributed.rank_seed(run.seed, epoch, run.rank))
    batches = epoch_batches(len(xs), cfg.batch_size, seed=run.seed, epoch=epoch)  # global batches
    order = to_device(torch.stack(batches), xs.device) if batches else torch.empty(0, dtype=torch.long)
    sums: dict[str, torch.Tensor | float] = {}
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(total=len(batches), desc=f"{method.name} epoch {epoch + 1}/{cfg.epochs}",
               disable=not (run.progress and run.main), leave=False)
    for i in range(len(batches)):
        idx = order[i]
        # The whole global batch is augmented (the draws of one process), then this rank keeps
        # its share; in a single process ``local`` is the whole batch.
        xb = to_device(augment(xs[idx], method.ctx.spec, aug_gen)[local], device)
        yb = to_device(ys[idx][local], device)
        stats = method.step(model, run.optimizer, xb, yb)
        run.scheduler.step()
        for k, v in stats.items():
            if isinstance(v, torch.Tensor):  # summed in float64 on the device, off the graph
                v = v.detach().double()
            sums[k] = sums[k] + v if k in sums else v
        # Reading the sums makes the host wait for the device: every sync_every steps only.
        if (i + 1) % run.sync_every == 0 or i + 1 == len(batches):
            means = _read_means(sums, i + 1)
            if not distributed.all_true(all(math.isfinite(v) for v in means.values())):
                raise CureEvalError(  # every rank stops together; a NaN step makes its sum NaN
                    f"training diverged at epoch {epoch + 1} before step {i + 1} (means so far: "
                    f"{ {k: round(v, 4) for k, v in means.items()} }): lower the learning rate or γ"
                )
            bar.set_postfix({k: f"{v:.3g}" for k, v in means.items()}, refresh=False)
        bar.update(1)
    bar.close()
    totals = {k: float(v) for k, v in sums.items()}
    seconds = time.perf_counter() - t0
    if run.world > 1:
        distributed.sync_module_state_(unwrap(model))
        totals = distributed.mean_dict(totals)
    return {k: v / max(1, len(batches)) for k, v in totals.items()}, seconds


def _end_epoch(run: _Run, epoch: int, means: dict[str, float], seconds: float, history: list[dict[str, Any]],
               info: CheckpointInfo) -> dict[str, Any]:
    """The epoch's row (training means, then each hook's metrics), and on rank 0 the saved state,
    the metrics line and the checkpoint. Returns rank 0's row (on every rank)."""
    method, optimizer = run.method, run.optimizer
    row: dict[str, Any] = {"epoch": epoch + 1, "method": method.name, "seconds": round(seconds, 3),
                           "lr": optimizer.param_groups[0]["lr"]}
    row.update(means)
    for hook in run.hooks:
        end = EpochEnd(epoch=epoch + 1, model=run.model, method=method, optimizer=optimizer,
                       scheduler=run.scheduler, row=MappingProxyType(row), main=run.main)
        row.update(hook.on_epoch_end(end))
    if run.main:
        history.append(row)
        state = {  # the epoch is complete once this file is in place
            "epoch": epoch + 1, "model": unwrap(run.model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "rng": torch.get_rng_state(), "metrics": json.dumps(history),
        }
        for hook in run.hooks:
            if isinstance(hook, ResumableHook):
                state[hook.state_key] = hook.state_dict()
        save_train_state(run.state_path, state)
        append_jsonl(run.metrics_path, row)
        info.epoch = epoch + 1
        save_checkpoint(run.out / CHECKPOINT_NAME, run.model, info)
        log.info("%s epoch %d/%d: %s", method.name, epoch + 1, method.config.epochs,
                 ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
    shared: dict[str, Any] = distributed.broadcast_object(row)  # rank 0's row (with the hooks' metrics) on every rank
    return shared


def is_complete(out_dir: str | Path, epochs: int) -> bool:
    """True when ``out_dir`` holds a finished training run of ``epochs`` epochs."""
    state_path = Path(out_dir) / STATE_NAME
    if not state_path.is_file() or not (Path(out_dir) / CHECKPOINT_NAME).is_file():
        return False
    try:
        return int(load_train_state(state_path)["epoch"]) >= epochs
    except (CureEvalError, KeyError, ValueError):
        return False


def _read_means(sums: dict[str, torch.Tensor | float], steps: int) -> dict[str, float]:
    """Per-step means of the summed metrics, read from the device in one transfer."""
    tensors = {k: v for k, v in sums.items() if isinstance(v, torch.Tensor)}
    values = {k: float(v) for k, v in sums.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        flat = torch.stack([t.reshape(()) for t in tensors.values()]).cpu()
        values.update(zip(tensors, flat.tolist(), strict=True))
    return {k: values[k] / steps for k in sums}


def _jsonl(row: dict[str, Any]) -> str:
    return json.dumps(row) + "\n"
