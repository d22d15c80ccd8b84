"""SPSA (Uesato et al. 2018) as a foolbox 3 fixed-epsilon ℓ∞ attack, and the suite's ``spsa``.

SPSA is the gradient-free attack of Uesato, O'Donoghue, van den Oord and Kohli, "Adversarial Risk
and the Dangers of Evaluating Against Weak Attacks", ICML 2018, https://arxiv.org/abs/1802.05666:
if SPSA beats PGD, the model's gradients are lying (CURE paper, Fig. 7).

The algorithm (its semantics, the counter-based randomness, :func:`spsa_attack`,
:func:`spsa_gradient`) lives in :mod:`cure_eval.attacks.spsa_algorithm`; this module wraps it as
the foolbox attack :class:`LinfSPSAAttack` and the suite plugin :class:`SPSA` (entry point
``spsa``), and re-exports the algorithm's public names, so ``from cure_eval.attacks.spsa import
spsa_attack`` keeps working.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import eagerpy as ep
import torch
from foolbox.attacks.base import (
    FixedEpsilonAttack,
    T,
    get_criterion,
    raise_if_kwargs,
    verify_input_bounds,
)
from foolbox.criteria import Misclassification
from foolbox.distances import linf
from foolbox.models import Model

from ..errors import UsageError
from .base import Attack, AttackConfig, AttackContext, AttackOutput, scatter, timed
from .spsa_algorithm import (
    LogitsFn,
    ProgressCallback,
    SPSAOutput,
    _check_settings,
    point_keys,
    spsa_attack,
    spsa_gradient,
)

__all__ = [
    "SPSA", "SPSA_POINTS_PER_CALL", "LinfSPSAAttack", "LogitsFn", "ProgressCallback", "SPSAConfig", "SPSAOutput",
    "point_keys", "spsa_attack", "spsa_gradient",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The foolbox attack.
# --------------------------------------------------------------------------------------------
class LinfSPSAAttack(FixedEpsilonAttack):
    """SPSA (https://arxiv.org/abs/1802.05666) as a foolbox 3 fixed-epsilon ℓ∞ attack.

    Use it like any foolbox attack::

        fmodel = foolbox.PyTorchModel(model.eval(), bounds=(0, 1), device=device)
        raw, clipped, success = LinfSPSAAttack(seed=0)(fmodel, x, y, epsilons=[4/255, 8/255])

    foolbox's ``FixedEpsilonAttack.__call__`` handles the list of epsilons, clips the result to
    each ε-ball and decides success; :meth:`run` is the SPSA of :func:`spsa_attack`. Extra keyword
    argument of the call: ``point_ids`` (one non-negative id per point, default ``0..N-1``) to make
    each point's randomness independent of its batch. PyTorch models only, untargeted
    (``Misclassification``) only.

    After each run, :attr:`last_output` holds the :class:`SPSAOutput` (per-point best margin,
    iterations, model inputs used) and :attr:`outputs` maps each ε of the last call to its output.

    Args (all keyword-only, defaults from the paper):
        iterations: Adam steps. Default 100.
        lr: Adam learning rate. Default 0.01.
        delta: finite-difference step. Default 0.01.
        samples: loss evaluations per point and iteration (mirrored pairs). Default 128.
        max_batch: most inputs per model call. Default 1024.
        seed: base seed of the per-point random streams. Default 0.
        random_start: uniform random start in the ε-ball. Default True.
        early_stop: stop each point once misclassified. Default True.
        plateau_window, plateau_tol: stop a point whose best margin stalls (see
            :func:`spsa_attack`). Default 0, 0.0: off (the reference semantics).
        callback: ``callback(iteration, still_running)`` after each iterate check.
    """

    distance = linf

    def __init__(
        self,
        *,
        iterations: int = 100,
        lr: float = 0.01,
        delta: float = 0.01,
        samples: int = 128,
        max_batch: int = 1024,
        seed: int = 0,
        random_start: bool = True,
        early_stop: bool = True,
        plateau_window: int = 0,
        plateau_tol: float = 0.0,
        callback: ProgressCallback | None = None,
    ) -> None:
        _check_settings(iterations=iterations, lr=lr, delta=delta, samples=samples, max_batch=max_batch)
        self.iterations = iterations
        self.lr = lr
        self.delta = delta
        self.samples = samples
        self.max_batch = max_batch
        self.seed = seed
        self.random_start = random_start
        self.early_stop = early_stop
        self.plateau_window = plateau_window
        self.plateau_tol = plateau_tol
        self.callback = callback
        self.last_output: SPSAOutput | None = None
        self.outputs: dict[float, SPSAOutput] = {}
        self._last_inputs: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"LinfSPSAAttack(iterations={self.iterations}, lr={self.lr}, delta={self.delta}, "
                f"samples={self.samples}, max_batch={self.max_batch}, seed={self.seed}, "
                f"random_start={self.random_start}, early_stop={self.early_stop}, "
                f"plateau_window={self.plateau_window}, plateau_tol={self.plateau_tol})")

    def run(
        self,
        model: Model,
        inputs: T,
        criterion: Misclassification | T,
        *,
        epsilon: float,
        point_ids: torch.Tensor | Sequence[int] | None = None,
        **kwargs: Any,
    ) -> T:
        raise_if_kwargs(kwargs)
        x0, restore_type = ep.astensor_(inputs)
        criterion_ = get_criterion(criterion)
        del inputs, criterion, kwargs
        verify_input_bounds(x0, model)
        if not isinstance(criterion_, Misclassification):
            raise UsageError("LinfSPSAAttack is untargeted: pass labels or a Misclassification criterion")
        if not isinstance(x0.raw, torch.Tensor):
            raise UsageError("LinfSPSAAttack supports PyTorch models and tensors only")
        labels = criterion_.labels.raw

        def logits_fn(batch: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = model(batch)
            return out

        lo, hi = model.bounds
        out = spsa_attack(
            logits_fn, x0.raw, labels, eps=float(epsilon), bounds=(float(lo), float(hi)),
            iterations=self.iterations, lr=self.lr, delta=self.delta, samples=self.samples,
            max_batch=self.max_batch, seed=self.seed, point_ids=point_ids,
            random_start=self.random_start, early_stop=self.early_stop, plateau_window=self.plateau_window,
            plateau_tol=self.plateau_tol, callback=self.callback,
        )
        if x0.raw is not self._last_inputs:  # a new __call__ (foolbox reuses x for every ε)
            self.outputs = {}
            self._last_inputs = x0.raw
        self.outputs[float(epsilon)] = out
        self.last_output = out
        log.debug("SPSA eps=%.5g: %d/%d misclassified, %d model inputs, %.2fs", epsilon,
                  int(out.success.sum()), len(out.success), out.model_inputs, out.seconds)
        return restore_type(ep.astensor(out.x_adv))


# --------------------------------------------------------------------------------------------
# The suite's ``spsa`` attack.
# --------------------------------------------------------------------------------------------
#: SPSA processes at most this many points at once (its per-point state is small; large groups
#: keep its model calls full while points finish early).
SPSA_POINTS_PER_CALL = 1024


@dataclass
class SPSAConfig(AttackConfig):
    """SPSA settings (the paper's): Adam steps, loss evaluations per point and step, the most
    inputs per model call."""

    iterations: int = 100
    samples: int = 128
    max_batch: int = 1024
    plateau_window: int = 0
    plateau_tol: float = 0.0


class SPSA(Attack[SPSAConfig]):
    """``spsa``: gradient-free :class:`LinfSPSAAttack`, each point seeded from ``(seed, index)``,
    so a point's result does not depend on the other points. Extras: ``spsa_margin`` (best
    margin found) and ``iterations`` (steps run before the point finished)."""

    name = "spsa"
    label = "SPSA"
    description = "gradient-free SPSA (Uesato et al. 2018) as a foolbox attack"
    needs = frozenset()
    order = 7
    cost = 7
    extras = ("spsa_margin", "iterations")
    Config = SPSAConfig

    def run(self, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> AttackOutput:
        start = time.perf_counter()
        c = self.config
        chunks = range(0, len(x), SPSA_POINTS_PER_CALL)
        out: list[torch.Tensor] = []
        margins: list[torch.Tensor] = []
        iters: list[torch.Tensor] = []
        with ctx.bar("spsa", len(chunks) * (c.iterations + 1), unit="it") as bar:
            def callback(_t: int, running: int) -> None:
                bar.update(1)
                bar.set_postfix(running=running, refresh=False)

            attack = LinfSPSAAttack(iterations=c.iterations, samples=c.samples, max_batch=c.max_batch,
                                    seed=ctx.seed, plateau_window=c.plateau_window, plateau_tol=c.plateau_tol,
                                    callback=callback)
            for s in chunks:
                before = bar.n
                sl = slice(s, s + SPSA_POINTS_PER_CALL)
                _, clipped, _ = attack(ctx.fmodel, x[sl].to(ctx.device), y[sl].to(ctx.device),
                                       epsilons=[ctx.eps], point_ids=ids[sl].to(ctx.device))
                bar.update(before + c.iterations + 1 - bar.n)  # early finish: fill the bar
                assert attack.last_output is not None
                out.append(clipped[0].detach().cpu())
                margins.append(attack.last_output.best_margin.cpu())
                iters.append(attack.last_output.iterations.cpu())
        if not out:
            return AttackOutput(x_adv=x.clone(), seconds=0.0,
                                extra={"spsa_margin": torch.zeros(0), "iterations": torch.zeros(0)})
        return AttackOutput(x_adv=torch.cat(out), seconds=timed(start),
                            extra={"spsa_margin": torch.cat(margins), "iterations": torch.cat(iters)})

    def per_sample(self, extra: dict[str, torch.Tensor], idx: torch.Tensor, n: int,
                   correct: torch.Tensor) -> dict[str, torch.Tensor]:
        """``spsa_margin``: NaN where not attacked; ``iterations``: 0 there (integers)."""
        return {"spsa_margin": scatter(n, idx, extra.get("spsa_margin", torch.zeros(0)), math.nan),
                "iterations": scatter(n, idx, extra.get("iterations", torch.zeros(0)), 0.0).long()}
