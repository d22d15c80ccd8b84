"""Minimal ℓ2 perturbations with foolbox's DeepFool (Moosavi-Dezfooli et al. 2016).

Used for the measured robustness next to the Theorem 1 bounds and for the boundary-normal
direction ``r`` of the loss-surface / decision-region planes (CURE paper Fig. 1, 3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..attacks.deepfool import foolbox_deepfool
from ._util import check_batch, check_device, eval_mode

log = logging.getLogger(__name__)


@dataclass
class MinimalPerturbation:
    """DeepFool's result per point (CPU tensors, length N)."""

    #: the adversarial points (clipped to [0, 1]); equal to x where not attacked
    x_adv: torch.Tensor
    #: ``x_adv − x``
    delta: torch.Tensor
    #: ``||x_adv − x||₂`` in [0, 1] pixel space; 0 for points misclassified clean, +inf where
    #: the attack failed to cross the boundary
    norm: torch.Tensor
    #: the returned point is misclassified
    success: torch.Tensor
    #: the clean point is correctly classified
    clean_correct: torch.Tensor


def deepfool_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device | str,
    steps: int = 50,
    overshoot: float = 0.02,
    candidates: int = 10,
) -> MinimalPerturbation:
    """Run foolbox's ``L2DeepFoolAttack`` with ``epsilons=None`` (raw minimal perturbations).

    ``foolbox.PyTorchModel(model, bounds=(0, 1), device=device)``; the model is attacked in
    eval mode (caller's mode restored). DeepFool's overshoot (default 0.02) makes the returned
    norms slightly larger than the distance to the boundary; they are upper bounds on the true
    minimal perturbation of the network.
    """
    import foolbox

    check_batch(x, y)
    dev = check_device(model, device)
    x, y = x.to(dev), y.to(dev)
    with eval_mode(model):
        with torch.no_grad():
            logits = model(x)
        clean_pred, n_classes = logits.argmax(1), int(logits.shape[1])
        fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device=dev)
        attack = foolbox_deepfool("l2", steps=steps, overshoot=overshoot,
                                  candidates=max(2, min(candidates, n_classes)))
        raw, _, success = attack(fmodel, x, y, epsilons=None)
        with torch.no_grad():
            adv_pred = model(raw).argmax(1)
    raw = raw.detach()
    delta = raw - x
    norm = delta.reshape(len(x), -1).norm(dim=1)
    correct = clean_pred == y
    success = adv_pred != y
    norm = torch.where(correct, norm, torch.zeros_like(norm))
    norm = torch.where(success, norm, torch.full_like(norm, float("inf")))
    if (~success).any():
        log.warning("DeepFool did not reach the boundary for %d of %d points", int((~success).sum()), len(x))
    return MinimalPerturbation(x_adv=raw.cpu(), delta=delta.cpu(), norm=norm.cpu(),
                               success=success.cpu(), clean_correct=correct.cpu())
