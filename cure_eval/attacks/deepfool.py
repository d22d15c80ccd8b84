"""``deepfool_linf`` / ``deepfool_l2``: DeepFool (Moosavi-Dezfooli et al. 2016,
https://arxiv.org/abs/1511.04599), foolbox's batched ``LinfDeepFoolAttack`` /
``L2DeepFoolAttack``. Minimal-perturbation attacks: run with ``epsilons=[None, ε]``, the minimal
perturbation per point goes to the ``min_norm`` column (``inf`` where DeepFool found nothing,
0 for points misclassified clean) and the returned point is the minimal adversarial example
projected onto the ε-ball (foolbox's clipping). Deterministic.

:func:`foolbox_deepfool` is the one place a foolbox DeepFool is built: the suite's attacks, the
geometry's minimal perturbations and the ``adv_finetune`` method all use it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from .base import Attack, AttackConfig, AttackContext, AttackOutput, Norm, scatter, timed


def foolbox_deepfool(norm: Norm, *, steps: int = 50, candidates: int = 10, overshoot: float = 0.02) -> Any:
    """foolbox's ``LinfDeepFoolAttack`` or ``L2DeepFoolAttack`` (defaults: foolbox's)."""
    import foolbox

    cls = foolbox.attacks.L2DeepFoolAttack if norm == "l2" else foolbox.attacks.LinfDeepFoolAttack
    return cls(steps=steps, candidates=candidates, overshoot=overshoot)


@dataclass
class DeepFoolConfig(AttackConfig):
    """foolbox's DeepFool settings (its defaults: 50 steps, 10 candidate classes, overshoot 0.02)."""

    steps: int = 50
    candidates: int = 10
    overshoot: float = 0.02


class _DeepFool(Attack[DeepFoolConfig]):
    Config = DeepFoolConfig
    extras = ("min_norm",)

    def run(self, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> AttackOutput:
        start = time.perf_counter()
        c = self.config
        attack = foolbox_deepfool(self.norm, steps=c.steps, candidates=c.candidates, overshoot=c.overshoot)
        eps = ctx.radius(self.norm)
        out, norms = [], []
        with ctx.bar(self.name, len(x)) as bar:
            for sl in ctx.batches(len(x)):
                xb, yb = x[sl].to(ctx.device), y[sl].to(ctx.device)
                raw, clipped, success = attack(ctx.fmodel, xb, yb, epsilons=[None, eps])
                dist = attack.distance(xb, raw[0]).detach()
                dist = torch.where(success[0], dist, torch.full_like(dist, math.inf))
                out.append(clipped[1].detach().cpu())
                norms.append(dist.cpu())
                bar.update(sl.stop - sl.start)
        if not out:
            return AttackOutput(x_adv=x.clone(), seconds=timed(start), extra={"min_norm": torch.zeros(0)})
        return AttackOutput(x_adv=torch.cat(out), seconds=timed(start), extra={"min_norm": torch.cat(norms)})

    def per_sample(self, extra: dict[str, torch.Tensor], idx: torch.Tensor, n: int,
                   correct: torch.Tensor) -> dict[str, torch.Tensor]:
        """``min_norm``: NaN where not attacked (cascade), 0 where misclassified clean."""
        min_norm = scatter(n, idx, extra.get("min_norm", torch.zeros(0)), math.nan)
        min_norm[~correct] = 0.0  # misclassified clean: nothing to perturb
        return {"min_norm": min_norm}


class LinfDeepFool(_DeepFool):
    name = "deepfool_linf"
    label = "ℓ∞-DeepFool"
    description = "minimal ℓ∞ perturbation (foolbox LinfDeepFoolAttack), projected onto the ε-ball"
    norm = "linf"
    order = 5
    cost = 1


class L2DeepFool(_DeepFool):
    name = "deepfool_l2"
    label = "ℓ2-DeepFool"
    description = "minimal ℓ2 perturbation (foolbox L2DeepFoolAttack), projected onto the eps_l2 ball"
    norm = "l2"
    order = 6
    cost = 2
