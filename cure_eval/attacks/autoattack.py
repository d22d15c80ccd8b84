"""``autoattack`` / ``autoattack-rand``: the original AutoAttack (Croce and Hein, "Reliable
evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks", ICML
2020, https://arxiv.org/abs/2003.01690), run through the authors' own code, the PyPI package
``pyautoattack`` 0.2.0 (import name ``pyautoattack``; home fra31/auto-attack; the package
RobustBench 1.1.1 evaluates with). Nothing here re-implements an attack.

What its ``standard`` version runs (read in ``pyautoattack/autoattack.py`` of 0.2.0,
``AutoAttack._set_version``), ℓ∞ and ℓ2, each sub-attack only on the points every earlier one
left robust, always from the clean input:

=============  ==================================================================================
``apgd-ce``    APGD on the cross-entropy, 1 restart, 100 iterations (step-size checkpoints at
               22 %, then every max(previous − 3 %, 6 %) of the budget, ρ = 0.75), random start.
``apgd-t``     targeted APGD on the DLR loss, 9 target classes (the 2nd…10th largest logits),
               1 restart and 100 iterations each.
``fab-t``      targeted FAB, 9 target classes, 1 restart, 100 iterations each.
``square``     Square Attack, 5000 queries, p_init = 0.8, 1 restart.
=============  ==================================================================================

``rand`` (for randomised defences): ``apgd-ce`` and ``apgd-dlr`` (untargeted DLR), 1 restart each,
with EOT over 20 forward passes per step; the randomness check is skipped.

What differs from the paper, or surprises: every sub-attack calls ``torch.manual_seed(seed)`` at
the start of *every batch* (so points in different batches share one random stream, and a point's
result depends on the batch it is in); ``seed=None`` seeds from ``time.time()`` (a rerun differs),
so we always pass one; the global RNG is reseeded (we run it inside ``torch.random.fork_rng``, so
the caller's RNG state is untouched); an attack's point only counts when the package's own
re-evaluation of the returned point is misclassified; FAB-T's ``n_restarts`` is forced to 1 inside
the evaluation loop. The attack choice, iteration counts, restarts and targets match the ICML
paper's description of the standard version (APGD-CE without restarts, APGD-T and FAB-T with 9
targets, Square with 5000 queries). The paper's first arXiv version used untargeted APGD-DLR and
FAB instead: that is the package's ``plus``/``custom`` territory, not ``standard``.

Which sub-attack broke a point (column ``broken_by``) is read off one
``run_standard_evaluation`` call on all the points: every ``perturb`` call of the package's
sub-attack objects is recorded (its input batch and its output; the attacks run unchanged), and a
point is credited to the sub-attack whose output the package returned for it. So the points and
verdicts are the package's own, bit for bit, also on randomised models, where a run split into
one call per sub-attack would redo the package's noisy clean check and differ
(``tests/test_autoattack.py`` checks both against ``AutoAttack(...).run_standard_evaluation``
called directly). pyautoattack 0.2.0's own resume (``state_path``) cannot serve here: restored
from a state, ``run_standard_evaluation`` never defines ``y_adv`` and fails on the first point it
breaks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..core.device import seeded_rng
from ..core.modes import eval_mode
from ..errors import CureEvalError, UsageError
from .base import Attack, AttackConfig, AttackContext, AttackOutput, scatter, timed

log = logging.getLogger(__name__)

Version = Literal["standard", "rand"]

#: The sub-attacks of each version, in the package's order (checked against the package at run time).
SUB_ATTACKS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
#: AutoAttack's own default batch size (``run_standard_evaluation(batch_size=250)``).
AUTOATTACK_BATCH = 250

INSTALL_HINT = "pip install pyautoattack==0.2.0"


def autoattack_class() -> Any:
    """``pyautoattack.AutoAttack`` (the authors' package; a one-line error without it)."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise CureEvalError(f"AutoAttack needs the pyautoattack package (a dependency of cure-eval): {INSTALL_HINT}") from None
    return AutoAttack


def autoattack_version() -> str:
    """The installed ``pyautoattack`` version (``"missing"`` without it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyautoattack")
    except PackageNotFoundError:
        return "missing"


def make_autoattack(model: nn.Module, *, eps: float, version: Version, seed: int,
                    device: torch.device | str, norm: Literal["Linf", "L2"] = "Linf") -> Any:
    """The package's ``AutoAttack`` object, configured by the package for ``version``."""
    if version not in SUB_ATTACKS:
        raise UsageError(f"unknown AutoAttack version {version!r}: use standard or rand")
    cls = autoattack_class()
    aa = cls(model, norm=norm, eps=float(eps), version=version, seed=int(seed), device=torch.device(device))
    if tuple(aa.attacks_to_run) != SUB_ATTACKS[version]:
        raise CureEvalError(f"pyautoattack {autoattack_version()} runs {aa.attacks_to_run} for {version!r}, "
                            f"expected {list(SUB_ATTACKS[version])}: install {INSTALL_HINT.split()[-1]}")
    return aa


@dataclass
class AutoAttackRun:
    """What :func:`run_autoattack` returns (CPU tensors of length N)."""

    x_adv: torch.Tensor
    y_adv: torch.Tensor
    #: index into ``sub_attacks`` of the sub-attack that broke the point, -1 where none did
    broken_by: torch.Tensor
    sub_attacks: tuple[str, ...]
    seconds: dict[str, float] = field(default_factory=dict)

    def robust(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_adv == y


def run_autoattack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, device: torch.device | str,
    version: Version = "standard", seed: int = 0, batch_size: int = AUTOATTACK_BATCH,
    norm: Literal["Linf", "L2"] = "Linf",
) -> AutoAttackRun:
    """The package's AutoAttack on ``(x, y)`` (points in [0, 1], ``eps`` in [0, 1] pixel units),
    sub-attack by sub-attack (see the module docs), the model in eval mode (its modes restored),
    the caller's RNG state untouched. Equal to
    ``AutoAttack(model, norm=norm, eps=eps, version=version, seed=seed, device=device)
    .run_standard_evaluation(x, y, batch_size=batch_size)``.
    """
    if not 0.0 < eps <= 1.0:
        raise UsageError(f"AutoAttack eps must be in (0, 1] ([0, 1] pixel units), got {eps}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device)
    x = x.detach().cpu()
    y = y.detach().cpu().long()
    with eval_mode(model), seeded_rng(seed, dev):
        aa = make_autoattack(model, eps=eps, version=version, seed=seed, device=dev, norm=norm)
        subs = tuple(aa.attacks_to_run)
        with _recording(aa) as calls:
            x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    x_adv, y_adv = x_adv.detach().cpu().to(x.dtype), y_adv.detach().cpu()
    broken_by = _attribute(x, y, x_adv, y_adv, calls, subs)
    seconds: dict[str, float] = {}
    for call in calls:
        seconds[call.sub] = seconds.get(call.sub, 0.0) + call.seconds
    for k, sub in enumerate(subs):
        log.debug("autoattack %s: %s broke %d points (%.1fs)", version, sub, int((broken_by == k).sum()),
                  seconds.get(sub, 0.0))
    return AutoAttackRun(x_adv=x_adv, y_adv=y_adv, broken_by=broken_by, sub_attacks=subs, seconds=seconds)


@dataclass
class _Call:
    """One sub-attack call the package made: its name, its input batch, its output, its time."""

    sub: str
    x_in: torch.Tensor
    x_out: torch.Tensor
    seconds: float


@contextmanager
def _recording(aa: Any) -> Iterator[list[_Call]]:
    """Record every ``perturb`` call of the package's sub-attack objects during one
    ``run_standard_evaluation`` (instance attributes over the bound methods, removed afterwards:
    the attacks themselves run unchanged). ``apgd`` serves APGD-CE and APGD-DLR: its ``loss`` at
    call time names the sub-attack."""
    calls: list[_Call] = []

    def name_of(attr: str, obj: Any) -> str:
        if attr == "apgd":
            return f"apgd-{obj.loss}"
        if attr == "fab":
            return "fab-t" if obj.targeted else "fab"
        return {"apgd_targeted": "apgd-t", "square": "square"}[attr]

    def wrap(attr: str, obj: Any) -> Callable[..., torch.Tensor]:
        inner = obj.perturb

        def perturb(x: torch.Tensor, y: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            start = time.perf_counter()
            out: torch.Tensor = inner(x, y, *args, **kwargs)
            calls.append(_Call(name_of(attr, obj), x.detach().cpu(), out.detach().cpu(), timed(start)))
            return out

        return perturb

    objs = {attr: getattr(aa, attr) for attr in ("apgd", "apgd_targeted", "fab", "square")}
    for attr, obj in objs.items():
        obj.perturb = wrap(attr, obj)
    try:
        yield calls
    finally:
        for obj in objs.values():
            del obj.perturb  # the class's method again


def _attribute(x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, y_adv: torch.Tensor, calls: list[_Call],
               subs: tuple[str, ...]) -> torch.Tensor:
    """Per point, the index in ``subs`` of the sub-attack whose output the package returned for it
    (the point's clean image in that call's input batch and its returned point in the output),
    -1 where the package kept the point robust or no sub-attack's output is the returned point
    (a randomised model misclassifying the clean input in the package's clean check)."""
    broken_by = torch.full((len(x),), -1, dtype=torch.long)
    fooled = (y_adv != y).nonzero().flatten()
    if not len(fooled):
        return broken_by
    flat_x, flat_adv = x.flatten(1), x_adv.flatten(1)
    for call in calls:
        k = subs.index(call.sub)
        xin, xout = call.x_in.flatten(1).to(x.dtype), call.x_out.flatten(1).to(x.dtype)
        for i in fooled[broken_by[fooled] == -1].tolist():
            rows = (xin == flat_x[i]).all(1) & (xout == flat_adv[i]).all(1)
            if bool(rows.any()):
                broken_by[i] = k
    return broken_by


@dataclass
class AutoAttackConfig(AttackConfig):
    """AutoAttack's batch size (its default, 250). The attacks, iterations, restarts and targets
    are the package's, for the attack's version, and are not settable here."""

    batch_size: int = AUTOATTACK_BATCH


class _AutoAttack(Attack[AutoAttackConfig]):
    Config = AutoAttackConfig
    version: ClassVar[Version]
    extras = ("broken_by",)
    reference = True  # compared with the suite's own worst case (``autoattack_comparison``)

    @classmethod
    def sub_attacks(cls) -> tuple[str, ...]:
        return SUB_ATTACKS[cls.version]

    def run(self, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> AttackOutput:
        start = time.perf_counter()
        if not len(x):
            return AttackOutput(x_adv=x.clone(), seconds=0.0, extra={"broken_by": torch.zeros(0)})
        res = run_autoattack(ctx.model, x, y, eps=ctx.eps, device=ctx.device, version=self.version,
                             seed=ctx.seed, batch_size=self.config.batch_size)
        return AttackOutput(x_adv=res.x_adv, seconds=timed(start), extra={"broken_by": res.broken_by.float()})

    def per_sample(self, extra: dict[str, torch.Tensor], idx: torch.Tensor, n: int,
                   correct: torch.Tensor) -> dict[str, torch.Tensor]:
        """``broken_by``: index of the sub-attack that broke the point, -1 where none did, NaN
        where AutoAttack did not attack it."""
        return {"broken_by": scatter(n, idx, extra.get("broken_by", torch.zeros(0)), math.nan)}


class AutoAttackStandard(_AutoAttack):
    """``autoattack``: the package's ``standard`` version (APGD-CE, APGD-T, FAB-T, Square)."""

    name = "autoattack"
    label = "AutoAttack"
    description = "the original AutoAttack, standard version (pyautoattack: APGD-CE, APGD-T, FAB-T, Square 5000)"
    version = "standard"
    order = 8
    cost = 8


class AutoAttackRand(_AutoAttack):
    """``autoattack-rand``: the package's ``rand`` version (APGD-CE, APGD-DLR with EOT 20)."""

    name = "autoattack-rand"
    label = "AutoAttack (rand)"
    description = "the original AutoAttack, rand version for randomised models (APGD-CE, APGD-DLR, EOT 20)"
    version = "rand"
    order = 9
    cost = 9

