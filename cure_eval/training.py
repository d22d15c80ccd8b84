"""The training loop shared by every method: batching, augmentation, checkpoints, resume.

Per epoch it appends one JSON line to ``metrics.jsonl`` and writes, atomically, ``train_state.pt``
(model, optimiser, scheduler and RNG state; loaded with ``weights_only=True``) and
``model.safetensors`` (the checkpoint). ``resume=True`` continues after the last completed epoch.

Optional, for every method: per-epoch WCI and train/test robust accuracy on fixed probes
(``wci=``, a :class:`~cure_eval.wci_tracking.WCITracker`) and the WCI learning-rate policy
(``lr_policy=``, a :class:`~cure_eval.wci_tracking.WCILRPolicy`); off by default, and then the
loop and its ``metrics.jsonl`` rows are exactly as without them.

Inside a process group (``torchrun``, see :mod:`cure_eval.distributed`) :func:`train` trains data
parallel with no change for the caller: every rank builds the same global batches (the same
permutation and augmentation as one process), keeps its ``batch_size / N`` share, and gradients are
averaged before each ``optimizer.step()``; rank 0 alone writes the files.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointInfo,
    load_train_state,
    save_checkpoint,
    save_train_state,
    unwrap,
)
from .data import DatasetSpec
from .errors import CureEvalError, NotApplicable, UsageError
from .io import append_jsonl, read_jsonl, write_text_atomic
from .methods import Method, config_dict
from .models import ModelConfig
from .modes import eval_mode  # noqa: F401  (re-exported: the name's old home)
from .wci_tracking import WCILRPolicy, WCITracker

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


def train(
    model: nn.Module,
    method: Method,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    model_config: ModelConfig,
    out_dir: str | Path,
    seed: int = 0,
    resume: bool = False,
    probe: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
    checkpoint_extra: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    sync_every: int = 50,
    wci: WCITracker | None = None,
    lr_policy: WCILRPolicy | None = None,
) -> TrainResult:
    """Train ``model`` in place with ``method`` on [0, 1] images ``x`` and labels ``y``.

    Args:
        model: the model (on ``method.ctx.device``).
        method: the configured method instance (owns the optimisation step).
        out_dir: folder for ``metrics.jsonl``, ``train_state.pt`` and ``model.safetensors``.
        seed: seeds batch order and augmentation.
        resume: continue after the last completed epoch in ``out_dir`` if there is one.
        probe: a fixed batch of test points: per-epoch clean accuracy and ``method.probe_metrics``.
        on_epoch: called with each epoch's metrics row (on every rank, with rank 0's row).
        sync_every: read the step metrics (summed on the device) every this many steps, for the
            progress bar and the divergence check; 1 reads them after every step, which makes a
            GPU wait for each step to finish.
        wci: per-epoch WCI, ``robust_train``/``robust_test``/``robust_gap`` and the clean ones on
            the tracker's fixed probes, added to each metrics row (rank 0 measures; see
            :mod:`cure_eval.wci_tracking`). ``None`` (default): nothing is measured or added.
        lr_policy: the WCI learning-rate policy, updated after every epoch with that epoch's WCI
            (it needs ``wci``); its state is saved in ``train_state.pt`` and restored on resume.
            Decays are logged in the row as ``wci_lr_decay`` (1 when the LR was cut after it).

    Distributed (a process group of ``N > 1`` ranks, e.g. under ``torchrun``):

    * batches: every rank draws the same global batch of ``batch_size`` indices (seeded by
      ``(seed, epoch)``) and augments the *whole* global batch with the same generator, then keeps
      its contiguous share ``[r·B/N, (r+1)·B/N)`` (as ``epoch_batches(..., rank=r, world=N)``);
      so the global batches and their augmentation are exactly those of one process.
      ``batch_size`` must be divisible by ``N``.
    * model: rank 0's weights are broadcast at the start (after a resume too); gradients and
      BatchNorm running statistics are averaged before every ``optimizer.step()``
      (:class:`~cure_eval.distributed.GradientAverager`, a step pre-hook on the optimizer: the
      method plugins are unchanged); the model state is synchronised from rank 0 at every epoch
      end, before the probe and the checkpoint.
    * other randomness (PGD random starts, TRADES noise: the global RNG) is per rank, reseeded at
      each epoch from ``(seed, epoch, rank)``, so resuming is exact under ``N`` ranks too (a
      one-process run draws from one continuing stream instead, restored from ``train_state.pt``).
    * files: only rank 0 writes ``metrics.jsonl``, ``train_state.pt`` and the checkpoint, and runs
      the probe; every rank reads ``train_state.pt`` on resume (a shared filesystem). Logged
      per-step statistics are means over the ranks; ``seconds`` is rank 0's.
    """
    if sync_every < 1:
        raise UsageError(f"sync_every must be at least 1, got {sync_every}")
    if lr_policy is not None and wci is None:
        raise UsageError("the WCI learning-rate policy needs per-epoch WCI: pass wci= (defend --track-wci)")
    out = Path(out_dir)
    world, rank = distributed.world_size(), distributed.rank()
    main = rank == 0
    ctx, cfg = method.ctx, method.config
    if cfg.batch_size % world:
        raise UsageError(f"batch size {cfg.batch_size} is not divisible by the {world} processes: "
                         f"use a multiple of {world}")
    local = slice(rank * (cfg.batch_size // world), (rank + 1) * (cfg.batch_size // world))
    if main:
        out.mkdir(parents=True, exist_ok=True)
    device = ctx.device
    optimizer, scheduler = method.make_optimizer(model)
    start = 0
    history: list[dict[str, Any]] = []
    state_path, metrics_path = out / STATE_NAME, out / METRICS_NAME
    has_state = distributed.broadcast_object(resume and state_path.is_file())  # rank 0 decides
    if has_state and not state_path.is_file():
        raise CureEvalError(f"rank {rank} cannot see {state_path}: the run folder must be on a "
                            "filesystem shared by every process")
    if has_state:
        state = load_train_state(state_path)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start = int(state["epoch"])
        history = json.loads(state["metrics"]) if "metrics" in state else []
        if lr_policy is not None:
            if "wci_policy" not in state:
                raise CureEvalError(f"{state_path} was written without the WCI learning-rate policy: "
                                    "resume it without --lr-policy wci, or start over")
            lr_policy.load_state_dict(state["wci_policy"])
        log.info("resuming %s from epoch %d/%d", ctx.model_name, start, cfg.epochs)
    elif not resume and main:
        for stale in (state_path, metrics_path, out / CHECKPOINT_NAME):
            stale.unlink(missing_ok=True)
    distributed.barrier()  # every rank has read the state before rank 0 rewrites metrics.jsonl
    if main:
        # The training state is the record of completed epochs: metrics.jsonl is rewritten from it,
        # so a run killed between the two writes never keeps or loses a line.
        if has_state and not history:  # a state written before metrics were kept in it
            history = [r for r in read_jsonl(metrics_path) if int(r.get("epoch", 0)) <= start]
        write_text_atomic(metrics_path, "".join(_jsonl(r) for r in history))
    averager = None
    if world > 1:
        # The optimizer is private to this call, so its hook goes with it even on an exception.
        distributed.broadcast_module_(unwrap(model))
        averager = distributed.GradientAverager(optimizer, unwrap(model))

    info = CheckpointInfo(model=model_config, dataset=ctx.spec.name, method=method.name,
                          method_config=config_dict(cfg), extra=dict(checkpoint_extra or {}))
    # On a GPU the training set lives there (CIFAR-10: 0.6 GB) and is gathered and augmented there;
    # the batch order is drawn on the host once per epoch and copied in one transfer.
    xs, ys = to_device(x, device), to_device(y, device)
    aug_device = device if device.type == "cuda" else torch.device("cpu")
    aug_gen = torch.Generator(device=aug_device).manual_seed(seed + 1)
    epoch_times = []
    for epoch in range(start, cfg.epochs):
        method.start_epoch(epoch)
        aug_gen.manual_seed(seed * 7919 + epoch)
        if world > 1:
            torch.manual_seed(distributed.rank_seed(seed, epoch, rank))
        batches = epoch_batches(len(x), cfg.batch_size, seed=seed, epoch=epoch)  # global batches
        order = to_device(torch.stack(batches), xs.device) if batches else torch.empty(0, dtype=torch.long)
        sums: dict[str, torch.Tensor | float] = {}
        t0 = time.perf_counter()
        model.train()
        bar = tqdm(total=len(batches), desc=f"{method.name} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (progress and main), leave=False)
        for i in range(len(batches)):
            idx = order[i]
            # The whole global batch is augmented (the draws of one process), then this rank keeps
            # its share; in a single process ``local`` is the whole batch.
            xb = to_device(augment(xs[idx], ctx.spec, aug_gen)[local], device)
            yb = to_device(ys[idx][local], device)
            stats = method.step(model, optimizer, xb, yb)
            scheduler.step()
            for k, v in stats.items():
                if isinstance(v, torch.Tensor):  # summed in float64 on the device, off the graph
                    v = v.detach().double()
                sums[k] = sums[k] + v if k in sums else v
            # Reading the sums makes the host wait for the device: every sync_every steps only.
            if (i + 1) % sync_every == 0 or i + 1 == len(batches):
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
        epoch_times.append(seconds)
        if world > 1:
            distributed.sync_module_state_(unwrap(model))
            totals = distributed.mean_dict(totals)
        row: dict[str, Any] = {"epoch": epoch + 1, "method": method.name, "seconds": round(seconds, 3),
                               "lr": optimizer.param_groups[0]["lr"]}
        row.update({k: v / max(1, len(batches)) for k, v in totals.items()})
        if main:
            if probe is not None:
                row.update(_probe(model, method, probe, device))
            if wci is not None:
                try:
                    row.update(wci.measure(unwrap(model), device))
                except NotApplicable as exc:  # no conv/linear weights: recorded, training goes on
                    row["wci_not_applicable"] = str(exc)
        if lr_policy is not None:  # every rank decides from rank 0's WCI, so the LRs stay equal
            decay = lr_policy.update(epoch + 1, float(distributed.broadcast_object(row.get("wci", math.nan))))
            if decay:
                lr_policy.apply(optimizer, scheduler)
                log.info("WCI rose for %d epochs: learning rate × %g from epoch %d", lr_policy.patience,
                         lr_policy.factor, epoch + 2)
            row["wci_lr_decay"] = int(decay)
        if main:
            history.append(row)
            state = {  # the epoch is complete once this file is in place
                "epoch": epoch + 1, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "metrics": json.dumps(history),
            }
            if lr_policy is not None:
                state["wci_policy"] = lr_policy.state_dict()
            save_train_state(state_path, state)
            append_jsonl(metrics_path, row)
            info.epoch = epoch + 1
            save_checkpoint(out / CHECKPOINT_NAME, model, info)
            log.info("%s epoch %d/%d: %s", method.name, epoch + 1, cfg.epochs,
                     ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
        row = distributed.broadcast_object(row)  # rank 0's row (with the probe) on every rank
        if on_epoch is not None:
            on_epoch(row)
    if averager is not None:
        averager.remove()
    distributed.barrier()  # rank 0's files are complete before any rank reads them
    model.eval()
    return TrainResult(model=model, metrics=read_jsonl(metrics_path),
                       seconds_per_epoch=(sum(epoch_times) / len(epoch_times)) if epoch_times else float("nan"),
                       resumed_from=start)


def is_complete(out_dir: str | Path, epochs: int) -> bool:
    """True when ``out_dir`` holds a finished training run of ``epochs`` epochs."""
    state_path = Path(out_dir) / STATE_NAME
    if not state_path.is_file() or not (Path(out_dir) / CHECKPOINT_NAME).is_file():
        return False
    try:
        return int(load_train_state(state_path)["epoch"]) >= epochs
    except (CureEvalError, KeyError, ValueError):
        return False


def _probe(model: nn.Module, method: Method, probe: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Per-epoch measurements on a fixed probe batch: clean and PGD(20) accuracy, method extras."""
    from .evaluation import pgd_accuracy

    px, py = probe[0].to(device), probe[1].to(device)
    ctx = method.ctx
    with eval_mode(model):
        with torch.no_grad():
            acc = float((model(px).argmax(1) == py).double().mean())
        robust = pgd_accuracy(model, px, py, eps=ctx.eps, device=device, steps=20,
                              alpha=ctx.spec.pgd_alpha / 255, progress=False)
        extra = method.probe_metrics(model, px, py)
    return {"probe_clean_acc": acc, "probe_pgd20_acc": robust, **extra}


def _read_means(sums: dict[str, torch.Tensor | float], steps: int) -> dict[str, float]:
    """Per-step means of the summed metrics, read from the device in one transfer."""
    tensors = {k: v for k, v in sums.items() if isinstance(v, torch.Tensor)}
    values = {k: float(v) for k, v in sums.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        flat = torch.stack([t.reshape(()) for t in tensors.values()]).cpu()
        values.update(zip(tensors, flat.tolist(), strict=True))
    return {k: values[k] / steps for k in sums}


def _jsonl(row: dict[str, Any]) -> str:
    import json

    return json.dumps(row) + "\n"
