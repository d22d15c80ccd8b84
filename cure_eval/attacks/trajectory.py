"""An ℓ∞ PGD that records every iterate (Madry et al. 2018, https://arxiv.org/abs/1706.06083):
per point the loss and whether it is fooled after each step. Built from the PGD core of
:mod:`cure_eval.attacks.pgd` (:func:`~cure_eval.attacks.pgd.linf_random_start`,
:func:`~cure_eval.attacks.pgd.linf_step`); the masking check reads its trajectories."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.device import seeded_rng
from ..core.modes import check_device, eval_mode
from ..errors import UsageError
from .pgd import linf_random_start, linf_step


@dataclass
class PGDTrajectory:
    """Per-point record of one ℓ∞ PGD run (CPU tensors).

    ``loss[:, t]`` is the cross-entropy at the iterate after ``t`` steps (``t = 0``: the start),
    ``fooled[:, t]`` whether that iterate is misclassified, ``x_adv`` the last iterate.
    """

    loss: torch.Tensor
    fooled: torch.Tensor
    x_adv: torch.Tensor

def pgd_trajectory(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    device: torch.device | str,
    seed: int = 0,
    random_start: bool = True,
    early_stop: bool = False,
    batch_size: int = 256,
    progress: bool = False,
) -> PGDTrajectory:
    """ℓ∞ PGD (Madry et al. 2018) that records every iterate's per-point loss (the PGD core of
    :mod:`cure_eval.attacks.pgd`: :func:`~cure_eval.attacks.pgd.linf_random_start`,
    :func:`~cure_eval.attacks.pgd.linf_step`).

    Exactly ``torchattacks.PGD``'s operations (uniform random start drawn with
    ``torch.empty_like(x).uniform_(-eps, eps)`` after ``torch.manual_seed(seed)``, gradient of the
    batch-mean cross-entropy, step ``alpha·sign(grad)``, projection onto the ε-ball ∩ [0, 1]);
    the per-point losses are read off the same forward passes, plus one forward at the last
    iterate. With ``early_stop`` a point stops at its first misclassified iterate (its later
    columns repeat that iterate's values). Model in eval mode, its modes restored afterwards.
    """
    if steps < 1:
        raise UsageError(f"PGD steps must be >= 1, got {steps}")
    dev = torch.device(device)
    n = len(x)
    loss_all = torch.zeros(n, steps + 1)
    fooled_all = torch.zeros(n, steps + 1, dtype=torch.bool)
    x_out = x.detach().cpu().clone()
    check_device(model, dev)
    with eval_mode(model), seeded_rng(seed, dev), torch.enable_grad(), \
            tqdm(total=n, desc=f"pgd{steps} ε={eps * 255:.3g}/255", unit="pt", disable=not progress,
                 leave=False) as bar:
        for s in range(0, n, batch_size):
            xb = x[s:s + batch_size].detach().to(dev)
            yb = y[s:s + batch_size].to(dev)
            adv = xb.clone()
            if random_start:
                adv = linf_random_start(adv, eps)
            active = torch.arange(len(xb), device=dev)
            rows = torch.arange(s, s + len(xb))
            for t in range(steps + 1):
                a = adv[active].clone().requires_grad_(t < steps)
                with torch.set_grad_enabled(t < steps):
                    out = model(a)
                lvec = F.cross_entropy(out, yb[active], reduction="none")
                fooled = out.argmax(dim=1) != yb[active]
                idx = rows[active.cpu()]
                loss_all[idx, t:] = lvec.detach().float().cpu()[:, None]
                fooled_all[idx, t:] = fooled.cpu()[:, None]
                if t == steps:
                    break
                (grad,) = torch.autograd.grad(lvec.mean(), a)
                adv[active] = linf_step(a, grad, xb[active], eps=eps, alpha=alpha)
                if early_stop:
                    keep = ~fooled
                    adv[active[fooled]] = a.detach()[fooled]  # keep the fooling iterate
                    active = active[keep]
                    if len(active) == 0:
                        break
            x_out[s:s + len(xb)] = adv.detach().cpu()
            bar.update(len(xb))
    return PGDTrajectory(loss=loss_all, fooled=fooled_all, x_adv=x_out)
