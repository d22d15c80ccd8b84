"""The ε sweep: PGD robust accuracy at several radii (the robust-accuracy curve), a check for
gradient masking (Athalye et al. 2018, https://arxiv.org/abs/1802.00420: accuracy must not rise
with ε)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from ..core.modes import check_device, eval_mode
from ..errors import UsageError
from .base import AttackContext, adversarial_margin, require_input_gradients
from .measure import measure_attack
from .pgd import run_pgd_steps
from .results import EpsSweepResult, fraction
from .units import warn_short_pgd
from .validity import check_inputs

log = logging.getLogger("cure_eval.attacks.suite")


def eps_sweep(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_list: Sequence[float],
    *,
    device: torch.device | str,
    steps: int = 20,
    alpha: float = 2 / 255,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> EpsSweepResult:
    """PGD(``steps``) robust accuracy at every ε of ``eps_list`` (the robust-accuracy curve).

    Each ε is a separate PGD run on the clean-correct points from ``torch.manual_seed(seed)``,
    step size ``alpha`` (default 2/255). ``monotone`` is False (and a warning is logged) if the
    accuracy rises with ε anywhere: a warning sign of gradient masking (Athalye et al. 2018).
    """
    if not eps_list:
        raise UsageError("eps_sweep needs at least one eps")
    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    check_inputs(x, y, float(eps_list[0]), batch_size)
    bad = [e for e in eps_list if not 0.0 < e <= 1.0]
    if bad:
        raise UsageError(f"every eps must be in (0, 1] ([0, 1] pixel units), got {bad}")
    for e in eps_list:
        warn_short_pgd([steps], e, alpha)
    dev = torch.device(device)
    x = x.detach().cpu()
    y = y.detach().cpu().long()
    n = len(x)
    ctx = AttackContext(model=model, device=dev, batch_size=batch_size, progress=progress, eps=0.0,
                        eps_l2=0.0, seed=seed)
    accs: list[float] = []
    robust: list[torch.Tensor] = []
    check_device(model, dev)
    require_input_gradients(model, x[:2].to(dev))
    with eval_mode(model):
        logits = ctx.logits(x)
        clean_pred = logits.argmax(dim=1)
        clean_margin = adversarial_margin(logits, y)
        correct = clean_pred == y
        idx = correct.nonzero().flatten()
        for e in eps_list:
            ctx.eps = float(e)
            with torch.enable_grad():
                run = run_pgd_steps(ctx, x[idx], y[idx], [steps], alpha=alpha, stop_on_success=False)
            res = measure_attack(ctx, x, y, name=f"pgd{steps}", norm="linf", clean_pred=clean_pred,
                                 clean_margin=clean_margin, attacked=correct, x_adv_attacked=run.adv[steps],
                                 seconds=run.seconds[steps])
            accs.append(fraction(res.robust))
            log.info("pgd%d at eps %.4g: robust accuracy %.4f", steps, e, accs[-1])
            robust.append(res.robust)
    order = sorted(range(len(eps_list)), key=lambda i: eps_list[i])
    monotone = all(accs[order[i + 1]] <= accs[order[i]] for i in range(len(order) - 1))
    if not monotone:
        log.warning("robust accuracy rises with eps somewhere in %s: a sign of gradient masking", accs)
    return EpsSweepResult(eps=[float(e) for e in eps_list], robust_accuracy=accs,
                          clean_accuracy=float(correct.double().mean()) if n else float("nan"),
                          steps=steps, alpha=alpha, seed=seed, robust=robust, monotone=monotone)
