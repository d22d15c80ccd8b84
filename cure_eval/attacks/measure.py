"""Measuring one attack's output: check the returned points (:mod:`.validity`), evaluate the model
there (eval mode) and keep per point the prediction, the margin (CURE Fig. 7's "adversarial loss":
true logit minus the largest other logit) and the ℓ∞/ℓ2 perturbation norms.

Used by the unit runner (:mod:`.units`) and the ε sweep (:mod:`.sweep`).
"""

from __future__ import annotations

import math

import torch

from .base import AttackContext, AttackResult, Norm, adversarial_margin
from .validity import check_adversarial, perturbation_norms


def measure_attack(
    ctx: AttackContext,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    name: str,
    norm: Norm,
    clean_pred: torch.Tensor,
    clean_margin: torch.Tensor,
    attacked: torch.Tensor,
    x_adv_attacked: torch.Tensor,
    seconds: float,
    extra: dict[str, torch.Tensor] | None = None,
    x_best_attacked: torch.Tensor | None = None,
) -> AttackResult:
    """Check the returned points and measure everything at them (model in eval mode); the same
    for the run's best points, if given (extra ``best_fooled``: 1 fooled at the returned or the
    best point, 0 not, NaN not attacked)."""
    eps = ctx.radius(norm)
    idx = attacked.nonzero().flatten()
    x_adv = x.clone()
    x_adv[idx] = x_adv_attacked.detach().to(x_adv.dtype).cpu()
    check_adversarial(x, x_adv, eps=eps, norm=norm, name=name)
    adv_pred = clean_pred.clone()
    margin = clean_margin.clone()
    if len(idx):
        logits = ctx.logits(x_adv[idx])
        adv_pred[idx] = logits.argmax(dim=1)
        margin[idx] = adversarial_margin(logits, y[idx]).to(margin.dtype)
    success = attacked & (adv_pred != y)
    robust = attacked & (adv_pred == y)
    extra = dict(extra or {})
    if x_best_attacked is not None:
        extra["best_fooled"] = _best_fooled(ctx, name, norm, x, y, idx, x_adv, x_best_attacked, success)
    linf, l2 = perturbation_norms(x, x_adv)
    return AttackResult(
        name=name, eps=eps, x_adv=x_adv, adv_pred=adv_pred, success=success, robust=robust,
        margin=margin, linf=linf.float(), l2=l2.float(), attacked=attacked.clone(),
        seconds=seconds, extra=extra,
    )


def _best_fooled(ctx: AttackContext, name: str, norm: Norm, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                 x_adv: torch.Tensor, x_best_attacked: torch.Tensor, success: torch.Tensor) -> torch.Tensor:
    """1 where the returned point or the run's best point fools the model, 0 where neither does,
    NaN where not attacked. The best points are checked against the ε-ball and [0, 1] and the
    model is evaluated there (only where they differ from the returned point)."""
    x_best = x_adv.clone()
    x_best[idx] = x_best_attacked.detach().to(x_best.dtype).cpu()
    check_adversarial(x, x_best, eps=ctx.radius(norm), norm=norm, name=f"{name} (best iterate)")
    fooled = success.clone()
    other = idx[(x_best[idx] != x_adv[idx]).flatten(1).any(dim=1)] if len(idx) else idx
    if len(other):
        fooled[other] |= ctx.logits(x_best[other]).argmax(dim=1) != y[other]
    out = torch.full((len(x),), math.nan)
    out[idx] = fooled[idx].float()
    return out
