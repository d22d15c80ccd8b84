"""The record every attack in the suite produces, and the per-point quantities it holds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def adversarial_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The CURE paper's "adversarial loss" (Fig. 7): true logit minus the largest other logit.

    Negative means misclassified. Shape ``(N,)``.
    """
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, labels[:, None], float("-inf"))
    return true - other.max(dim=1).values


@dataclass
class AttackResult:
    """Per-point outcome of one attack on N points (all tensors on the CPU, length N).

    ``robust`` is what counts for robust accuracy: for fixed-ε attacks it is "still correctly
    classified at the returned point"; for minimal-perturbation attacks (DeepFool) it is
    "clean-correct and minimal perturbation larger than ε". Points that were misclassified
    clean are never attacked and count as non-robust (``attacked`` is False for them).
    """

    name: str
    eps: float
    x_adv: torch.Tensor
    adv_pred: torch.Tensor
    success: torch.Tensor
    robust: torch.Tensor
    margin: torch.Tensor
    linf: torch.Tensor
    l2: torch.Tensor
    attacked: torch.Tensor
    seconds: float = 0.0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.double().mean()) if len(self.robust) else float("nan")
