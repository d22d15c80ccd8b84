"""``fgsm``: the fast gradient sign method (Goodfellow et al. 2015, https://arxiv.org/abs/1412.6572),
``torchattacks.FGSM``: one step ``x + ε·sign ∇ℓ``, clipped to [0, 1]. Deterministic."""

from __future__ import annotations

import time

import torch
import torchattacks

from .base import Attack, AttackConfig, AttackContext, AttackOutput, timed


class FGSM(Attack[AttackConfig]):
    name = "fgsm"
    label = "FGSM"
    description = "fast gradient sign method (torchattacks.FGSM)"
    order = 0
    cost = 0

    def run(self, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> AttackOutput:
        start = time.perf_counter()
        attack = torchattacks.FGSM(ctx.model, eps=ctx.eps)
        out = []
        with ctx.bar("fgsm", len(x)) as bar:
            for sl in ctx.batches(len(x)):
                out.append(attack(x[sl].to(ctx.device), y[sl].to(ctx.device)).detach().cpu())
                bar.update(sl.stop - sl.start)
        return AttackOutput(x_adv=torch.cat(out) if out else x.clone(), seconds=timed(start))
