"""The epoch-hook contract: per-epoch measurements and policies that the training loop calls.

The loop (:func:`cure_eval.training.loop.train`) trains; everything it is asked to measure or decide
at the end of an epoch — the probe accuracy (:class:`~cure_eval.training.probes.ProbeHook`), WCI
tracking (:class:`~cure_eval.training.wci_tracking.WCITrackingHook`), the WCI learning-rate policy
(:class:`~cure_eval.training.wci_tracking.WCILRPolicyHook`) — is an :class:`EpochHook` that the
caller (the pipeline, :func:`cure_eval.training.pipeline.train_method`) passes in. The loop thus
imports no analysis code (no attacks, geometry or evaluation; ``tests/test_architecture.py``).

Contract (also in ``docs/ARCHITECTURE.md``, Contracts):

* After an epoch's last step (model state synchronised across ranks, before anything is saved),
  the loop calls ``hook.on_epoch_end(end)`` for every hook, in the order given, **on every rank**.
  ``end.row`` is the epoch's metrics row so far (the earlier hooks' metrics merged in); the hook
  returns metrics (JSON-ready) that the loop merges into the row, which is then saved
  (``metrics.jsonl``, ``train_state.pt``) and passed to ``on_epoch``.
* A hook that measures runs on rank 0 only (``end.main``) and returns ``{}`` elsewhere: rank 0's
  row is the one that is written and broadcast. A hook that changes training (e.g. the learning
  rate) must decide the same on every rank (broadcast rank 0's numbers).
* A hook must not draw from the global RNG (use a forked, seeded one), so that training is
  bit-identical with and without it; it restores the model's train/eval mode.
* A :class:`ResumableHook` also has ``state_key``, ``state_dict()`` (plain values:
  ``train_state.pt`` is loaded with ``weights_only=True``) and ``load_state_dict(state)``: its
  state is saved in ``train_state.pt`` under ``state_key`` after every epoch and restored on resume
  (a resume whose state lacks the key is refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from .methods import Method


@dataclass(frozen=True)
class EpochEnd:
    """What an epoch hook sees at the end of an epoch.

    Attributes:
        epoch: the epoch just completed, 1-based (the row's ``epoch``).
        model: the model being trained (in train mode; a hook that evaluates restores it).
        method: the method instance (its ``ctx``: data set, ε, device; ``probe_metrics``).
        optimizer: the optimiser (a learning-rate policy may change its groups' LRs).
        scheduler: the learning-rate scheduler stepped after every step.
        row: the epoch's metrics row so far, read-only.
        main: True on rank 0 (the process that writes files), and in a single process.
    """

    epoch: int
    model: nn.Module
    method: Method[Any]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    row: Mapping[str, Any]
    main: bool

    @property
    def device(self) -> torch.device:
        """The training device (``method.ctx.device``)."""
        return self.method.ctx.device


@runtime_checkable
class EpochHook(Protocol):
    """Called at the end of every epoch; returns metrics to merge into the epoch's row."""

    def on_epoch_end(self, end: EpochEnd) -> Mapping[str, Any]: ...


@runtime_checkable
class ResumableHook(EpochHook, Protocol):
    """An epoch hook with state that must survive a resume (saved in ``train_state.pt``)."""

    @property
    def state_key(self) -> str:
        """The key of this hook's state in ``train_state.pt`` (unique among the run's hooks)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
