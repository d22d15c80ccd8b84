"""Training: the loop, its epoch hooks, the Method API, CURE's terms, WCI tracking, the pipeline.

* :mod:`~cure_eval.training.loop` — :func:`train`: restore / run an epoch / end of epoch; it
  imports no analysis code (no attacks, geometry, evaluation);
* :mod:`~cure_eval.training.hooks` — the epoch-hook contract (:class:`EpochHook`,
  :class:`ResumableHook`, :class:`EpochEnd`);
* :mod:`~cure_eval.training.probes` — :class:`~cure_eval.training.probes.ProbeHook`;
* :mod:`~cure_eval.training.wci_tracking` — per-epoch WCI and the WCI learning-rate policy as hooks;
* :mod:`~cure_eval.training.methods` — the Method API and registry;
  :mod:`~cure_eval.training.method_helpers`; :mod:`~cure_eval.training.cure` (CURE's terms);
* :mod:`~cure_eval.training.pipeline` — :func:`run_defend`, :func:`standard_model`,
  :func:`train_method` (what ``defend`` and ``reproduce`` call).

This package keeps the names of the former module ``cure_eval.training`` (the loop's) importable
from ``cure_eval.training``; importing it loads the loop and the hook contract only.
"""

from __future__ import annotations

from ..core.modes import eval_mode
from .hooks import EpochEnd, EpochHook, ResumableHook
from .loop import (
    METRICS_NAME,
    STATE_NAME,
    TrainResult,
    augment,
    epoch_batches,
    is_complete,
    to_device,
    train,
)

__all__ = [
    "METRICS_NAME",
    "STATE_NAME",
    "EpochEnd",
    "EpochHook",
    "ResumableHook",
    "TrainResult",
    "augment",
    "epoch_batches",
    "eval_mode",
    "is_complete",
    "to_device",
    "train",
]
