"""The per-epoch probe: clean and PGD(20) accuracy on a fixed batch of test points, an epoch hook."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..attacks.evaluation import pgd_accuracy
from ..core.modes import eval_mode
from .hooks import EpochEnd


class ProbeHook:
    """``probe_clean_acc``, ``probe_pgd20_acc`` (torchattacks PGD(20), the data set's step, a forked
    RNG seeded with 0) and ``method.probe_metrics`` on a fixed probe batch, measured on rank 0.

    Args:
        probe: fixed test points ``(x, y)`` in [0, 1] (CPU or device tensors).
    """

    def __init__(self, probe: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.probe = probe

    def on_epoch_end(self, end: EpochEnd) -> Mapping[str, Any]:
        if not end.main:
            return {}
        model, method, device = end.model, end.method, end.device
        px, py = self.probe[0].to(device), self.probe[1].to(device)
        ctx = method.ctx
        with eval_mode(model):
            with torch.no_grad():
                acc = float((model(px).argmax(1) == py).double().mean())
            robust = pgd_accuracy(model, px, py, eps=ctx.eps, device=device, steps=20,
                                  alpha=ctx.spec.pgd_alpha / 255, progress=False)
            extra = method.probe_metrics(model, px, py)
        return {"probe_clean_acc": acc, "probe_pgd20_acc": robust, **extra}
