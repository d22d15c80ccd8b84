"""The Weight-Curvature Index over training, and a learning-rate policy driven by it.

Xu & Zhang, "Understanding Adversarially Robust Generalization via Weight-Curvature Index"
(https://arxiv.org/abs/2410.07719, 2024; seed 004 — only the abstract and a summary are
available). Their claims are about training: WCI tracks the *robust generalisation gap* (robust
train accuracy − robust test accuracy) of adversarially trained models, and a learning-rate
adjustment driven by WCI reduces robust overfitting.

* :class:`WCITracker` — per-epoch measurements on *fixed* probes, for any method (run by the
  training loop as the epoch hook :class:`WCITrackingHook`, not in a plugin):

  - ``wci``: :func:`cure_eval.geometry.weights.weight_curvature_index` itself (the audit's
    estimator, the audit's settings: ℓ∞ PGD of ``steps = 10`` with α = 2.5·ε/steps, Hutchinson
    probes, ``chunk_size = 512``, seeded by ``seed``) on the fixed *train* probe — the bound is on
    the training loss's curvature;
  - ``robust_train`` / ``robust_test``: accuracy at :func:`~cure_eval.geometry.weights.pgd_points`
    (the same PGD, the same seed) on the fixed train probe (the very points WCI's loss uses) and
    on a fixed test probe; ``robust_gap = robust_train − robust_test``;
  - ``clean_train`` / ``clean_test`` / ``clean_gap`` likewise on clean inputs.

  The probes and every random draw are seeded, independent of the training RNG (PGD's start runs
  in a forked RNG), so tracking never changes the training trajectory, and a resumed run measures
  the same numbers as an uninterrupted one.
* :class:`WCILRPolicy` — our reading of the seed's "WCI-based learning rate adjustment" (the
  abstract gives no rule): after each epoch, if WCI has *risen* (``wci_t > wci_{t−1}``) for
  ``patience`` consecutive epochs, multiply the learning rate by ``factor``, at most
  ``max_decays`` times, rises in the first ``warmup`` epochs not counted; the count of rises
  restarts after a decay. Rising WCI is read as the onset
  of robust overfitting (the paper: WCI grows with the robust gap), and a lower learning rate as
  the remedy. The decay multiplies the optimiser's current LR on top of the method's own schedule
  (``--lr-policy wci`` with ``lr_schedule=constant`` is the pure policy). The loop runs it as the
  resumable epoch hook :class:`WCILRPolicyHook` (state key ``wci_policy`` in ``train_state.pt``).
* :func:`wci_hooks` — the two hooks, in the order the loop must call them.
* :func:`spearman` / :func:`tracking_summary` / :func:`plot_wci_tracking` — the rank correlation of
  WCI with the robust gap over epochs and its twin-axis figure.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import distributed
from ..core.io import new_figure, save_figure
from ..core.modes import eval_mode
from ..errors import NotApplicable, UsageError
from ..geometry.weights import pgd_points, weight_curvature_index
from ..models.checkpoint import unwrap
from .hooks import EpochEnd, EpochHook

log = logging.getLogger(__name__)

#: the metrics.jsonl keys that tracking adds (and nothing else adds)
TRACKING_KEYS = ("wci", "wci_adv_loss", "robust_train", "robust_test", "robust_gap",
                 "clean_train", "clean_test", "clean_gap")

#: defaults of ``defend --wci-probe-n`` / ``--wci-probes``: a PGD-AT digits epoch + ≤ 20 %
#: (benchmarks/bench_wci_tracking.py)
DEFAULT_PROBE_N = 32
DEFAULT_HUTCHINSON_PROBES = 4
#: the audit's PGD and batching for WCI (cure_eval.geometry.report.compute_geometry)
AUDIT_PGD_STEPS = 10
AUDIT_CHUNK_SIZE = 512


@dataclass
class WCITracker:
    """Per-epoch WCI and train/test robust accuracy on fixed probes (see the module docstring).

    Attributes:
        train_probe: fixed clean training points ``(x, y)`` (no augmentation): WCI and
            ``robust_train``/``clean_train``.
        test_probe: fixed test points ``(x, y)``: ``robust_test``/``clean_test``.
        eps: ℓ∞ radius in [0, 1] units (the run's ε, as the audit's).
        steps: PGD steps (default 10, the audit's); α = 2.5·eps/steps (``pgd_points``' default).
        n_probes: Hutchinson probes of WCI (default 4; the audit uses 50 on 20 points).
        seed: seeds PGD's random start and the Hutchinson probes (the audit's ``--seed``).
        chunk_size: samples per forward/double-backward (512, the audit's).
    """

    train_probe: tuple[torch.Tensor, torch.Tensor]
    test_probe: tuple[torch.Tensor, torch.Tensor]
    eps: float
    steps: int = AUDIT_PGD_STEPS
    n_probes: int = DEFAULT_HUTCHINSON_PROBES
    seed: int = 0
    chunk_size: int = AUDIT_CHUNK_SIZE

    def __post_init__(self) -> None:
        for name, (px, py) in (("train", self.train_probe), ("test", self.test_probe)):
            if len(px) < 1 or len(px) != len(py):
                raise UsageError(f"the WCI {name} probe needs at least one point and one label per point")
        if self.n_probes < 1 or self.steps < 1:
            raise UsageError(f"WCI tracking needs at least one Hutchinson probe and one PGD step "
                             f"(got {self.n_probes}, {self.steps})")
        if self.eps <= 0:
            raise UsageError(f"WCI tracking needs eps > 0, got {self.eps}: robust accuracy at ε = 0 is clean accuracy")

    def measure(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """The tracking metrics of ``model`` now (eval mode inside; the caller's mode restored).

        Raises:
            NotApplicable: the model has no conv/linear weights (WCI is undefined).
        """
        xtr, ytr = self.train_probe[0].to(device), self.train_probe[1].to(device)
        xte, yte = self.test_probe[0].to(device), self.test_probe[1].to(device)
        with eval_mode(model):
            x_adv = pgd_points(model, xtr, ytr, eps=self.eps, device=device, steps=self.steps, seed=self.seed)
            w = weight_curvature_index(model, xtr, ytr, eps=self.eps, device=device, steps=self.steps,
                                       n_probes=self.n_probes, seed=self.seed, chunk_size=self.chunk_size,
                                       x_adv=x_adv)
            x_adv_te = pgd_points(model, xte, yte, eps=self.eps, device=device, steps=self.steps, seed=self.seed)
            with torch.no_grad():
                clean_tr = _accuracy(model, xtr, ytr, self.chunk_size)
                clean_te = _accuracy(model, xte, yte, self.chunk_size)
                robust_te = _accuracy(model, x_adv_te, yte, self.chunk_size)
        robust_tr = float(w["adv_accuracy"])  # accuracy at x_adv, computed inside WCI
        return {"wci": float(w["wci"]), "wci_adv_loss": float(w["adv_loss"]),
                "robust_train": robust_tr, "robust_test": robust_te, "robust_gap": robust_tr - robust_te,
                "clean_train": clean_tr, "clean_test": clean_te, "clean_gap": clean_tr - clean_te}

    def describe(self) -> dict[str, Any]:
        """The settings, JSON-ready (``results.json``'s ``wci_tracking``)."""
        return {"train_probe_n": len(self.train_probe[0]), "test_probe_n": len(self.test_probe[0]),
                "eps": self.eps, "pgd_steps": self.steps, "pgd_alpha": 2.5 * self.eps / self.steps,
                "hutchinson_probes": self.n_probes, "seed": self.seed}


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int) -> float:
    logits = torch.cat([model(x[s:s + chunk]) for s in range(0, len(x), chunk)])
    return float((logits.argmax(1) == y).double().mean())


@dataclass
class WCILRPolicy:
    """Decay the learning rate when WCI has risen for ``patience`` consecutive epochs.

    The rule (our reading of the seed, module docstring): after epoch ``t`` with WCI ``w_t``, a
    *rise* is ``w_t > w_{t−1}``; ``rises`` counts consecutive rises (a fall or tie resets it to 0).
    When ``rises == patience`` and fewer than ``max_decays`` decays happened, every parameter
    group's LR (and the scheduler's base LRs) is multiplied by ``factor`` from the next epoch on,
    and ``rises`` restarts at 0. The first epoch has no predecessor and never counts as a rise.

    Attributes:
        patience: consecutive rises that trigger a decay (default 2).
        factor: the LR multiplier of a decay (default 0.1).
        max_decays: at most this many decays (default 2).
        warmup: epochs ``1..warmup`` never count as rises (default 0). From a random
            initialisation WCI rises for the first few epochs as the weights grow, which the plain
            rule reads as overfitting (on digits it cut the LR after epochs 3 and 5: docs/wci.md).
        last: the previous epoch's WCI (None before the first epoch).
        rises: current run of consecutive rises.
        decay_epochs: 1-based epochs after which the LR was decayed.
    """

    patience: int = 2
    factor: float = 0.1
    max_decays: int = 2
    warmup: int = 0
    last: float | None = None
    rises: int = 0
    decay_epochs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise UsageError(f"the WCI policy's patience must be at least 1 epoch, got {self.patience}")
        if not 0.0 < self.factor < 1.0:
            raise UsageError(f"the WCI policy's decay factor must be in (0, 1), got {self.factor}")
        if self.max_decays < 0 or self.warmup < 0:
            raise UsageError(f"the WCI policy's max_decays and warmup must be >= 0, got {self.max_decays}, {self.warmup}")

    def update(self, epoch: int, wci: float) -> bool:
        """Record epoch ``epoch``'s (1-based) WCI; True when the LR is to be decayed now."""
        rose = epoch > self.warmup and self.last is not None and math.isfinite(wci) and wci > self.last
        self.rises = self.rises + 1 if rose else 0
        self.last = wci
        if self.rises >= self.patience and len(self.decay_epochs) < self.max_decays:
            self.decay_epochs.append(epoch)
            self.rises = 0
            return True
        return False

    def apply(self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        """Multiply the LR by ``factor``: the optimiser's groups and the scheduler's base LRs (so
        that schedules computed from base LRs, e.g. ``constant``, keep the decay)."""
        for group in optimizer.param_groups:
            group["lr"] *= self.factor
        scheduler.base_lrs = [lr * self.factor for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (``train_state.pt`` is loaded with ``weights_only=True``)."""
        return {"last": float("nan") if self.last is None else float(self.last), "rises": int(self.rises),
                "decay_epochs": [int(e) for e in self.decay_epochs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        last = float(state["last"])
        self.last = None if math.isnan(last) else last
        self.rises = int(state["rises"])
        self.decay_epochs = [int(e) for e in state["decay_epochs"]]

    def describe(self) -> dict[str, Any]:
        return {"rule": "lr *= factor when WCI rose for `patience` consecutive epochs, at most max_decays times",
                "patience": self.patience, "factor": self.factor, "max_decays": self.max_decays, "warmup": self.warmup,
                "decay_epochs": list(self.decay_epochs)}


class WCITrackingHook:
    """The epoch hook of :class:`WCITracker`: rank 0 measures the tracking metrics after every epoch
    (on the unwrapped model); a model without conv/linear weights gets ``wci_not_applicable``
    instead, and training goes on."""

    def __init__(self, tracker: WCITracker) -> None:
        self.tracker = tracker

    def on_epoch_end(self, end: EpochEnd) -> Mapping[str, Any]:
        if not end.main:
            return {}
        try:
            return self.tracker.measure(unwrap(end.model), end.device)
        except NotApplicable as exc:  # no conv/linear weights: recorded, training goes on
            return {"wci_not_applicable": str(exc)}


class WCILRPolicyHook:
    """The epoch hook of :class:`WCILRPolicy`: after every epoch, every rank updates the policy with
    rank 0's WCI (so the learning rates stay equal) and applies a decay; the row gets
    ``wci_lr_decay`` (1 when the LR was cut after this epoch). Its state is saved in
    ``train_state.pt`` under ``wci_policy``. It must come after a :class:`WCITrackingHook`."""

    state_key = "wci_policy"

    def __init__(self, policy: WCILRPolicy) -> None:
        self.policy = policy

    def on_epoch_end(self, end: EpochEnd) -> Mapping[str, Any]:
        tracked = "wci" in end.row or "wci_not_applicable" in end.row
        wci = distributed.broadcast_object(float(end.row.get("wci", math.nan)) if tracked else None)
        if wci is None:  # decided on rank 0, so every rank raises
            raise UsageError("the WCI learning-rate policy needs per-epoch WCI: put a WCITrackingHook before "
                             "its hook (wci_hooks(tracker, policy))")
        decay = self.policy.update(end.epoch, float(wci))
        if decay:
            self.policy.apply(end.optimizer, end.scheduler)
            log.info("WCI rose for %d epochs: learning rate × %g from epoch %d", self.policy.patience,
                     self.policy.factor, end.epoch + 1)
        return {"wci_lr_decay": int(decay)}

    def state_dict(self) -> dict[str, Any]:
        return self.policy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state)


def wci_hooks(tracker: WCITracker | None, policy: WCILRPolicy | None = None) -> list[EpochHook]:
    """The epoch hooks of WCI tracking and of the WCI learning-rate policy, in the order the loop
    must call them (tracking first: the policy reads its WCI). ``None`` leaves a hook out.

    Raises:
        UsageError: a policy without a tracker (the policy needs per-epoch WCI).
    """
    if policy is not None and tracker is None:
        raise UsageError("the WCI learning-rate policy needs per-epoch WCI: pass a WCITracker as tracker "
                         "(`track_wci=True`)")
    hooks: list[EpochHook] = []
    if tracker is not None:
        hooks.append(WCITrackingHook(tracker))
    if policy is not None:
        hooks.append(WCILRPolicyHook(policy))
    return hooks


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation of two equally long series (ties get average ranks).

    ``scipy.stats.spearmanr``; NaN when fewer than 3 values or when a series is constant.
    """
    from scipy.stats import spearmanr

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise UsageError(f"spearman needs two 1-D series of equal length, got shapes {x.shape} and {y.shape}")
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def tracking_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """WCI vs the robust gap over the epochs of ``rows`` (metrics.jsonl rows with tracking).

    Returns ``epochs``, ``wci``, ``robust_gap``, ``robust_train``, ``robust_test``, ``lr``,
    ``spearman`` (WCI vs robust gap), ``final_robust_test``, ``best_robust_test`` and
    ``best_epoch``, ``final_robust_gap``.

    Raises:
        NotApplicable: no row carries WCI (tracking was off).
    """
    tracked = [r for r in rows if r.get("wci") is not None]
    if not tracked:
        raise NotApplicable("no epoch has WCI: train with tracking on (`track_wci=True`)")
    ep = [int(r["epoch"]) for r in tracked]
    rt = [float(r["robust_test"]) for r in tracked]
    best = int(np.argmax(rt))
    return {
        "epochs": ep, "wci": [float(r["wci"]) for r in tracked],
        "robust_gap": [float(r["robust_gap"]) for r in tracked],
        "robust_train": [float(r["robust_train"]) for r in tracked], "robust_test": rt,
        "lr": [float(r["lr"]) for r in tracked],
        "spearman": spearman([r["wci"] for r in tracked], [r["robust_gap"] for r in tracked]),
        "final_robust_test": rt[-1], "best_robust_test": rt[best], "best_epoch": ep[best],
        "final_robust_gap": float(tracked[-1]["robust_gap"]),
    }


def plot_wci_tracking(summary: dict[str, Any], path: str | Path, *, title: str = "") -> Path:
    """WCI (left axis) and the robust gap (right axis) over epochs, Spearman's ρ in the title;
    LR decays (if any, from ``summary["decay_epochs"]``) as dotted lines. PNG, written atomically."""
    fig = new_figure(5.6, 3.4, dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ep = summary["epochs"]
    ax.plot(ep, summary["wci"], color="#1f77b4", marker="o", ms=3, label="WCI (train probe)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("WCI", color="#1f77b4")
    ax2 = ax.twinx()
    ax2.plot(ep, [100 * g for g in summary["robust_gap"]], color="#d62728", marker="s", ms=3,
             label="robust gap (train − test)")
    ax2.set_ylabel("robust gap (%)", color="#d62728")
    for e in summary.get("decay_epochs", []):
        ax.axvline(e, color="grey", ls=":", lw=1)
    rho = summary["spearman"]
    head = f"{title}: " if title else ""
    ax.set_title(f"{head}Spearman ρ(WCI, robust gap) = {rho:.2f}" if math.isfinite(rho) else f"{head}ρ undefined",
                 fontsize=10)
    lines = ax.get_lines()[:1] + ax2.get_lines()[:1]
    ax.legend(lines, [str(ln.get_label()) for ln in lines], loc="upper left", fontsize=8)
    return save_figure(fig, path, bbox_inches="tight")
