"""``trades``: TRADES (Zhang et al., ICML 2019, https://arxiv.org/abs/1901.08573), from scratch.

Objective per batch: ``CE(f(x), y) + β · KL(softmax f(x) ‖ softmax f(x'))`` with the KL averaged
over the batch (``batchmean``), ``x'`` the point of the ε-ball that maximises that KL. As in the
reference code (yaodongyu/TRADES ``trades.py``) the clean softmax is *not* detached: the KL
gradient flows through both ``f(x)`` and ``f(x')``.

Inner maximisation as in the reference code: start ``x + 0.001·N(0, I)`` (not clipped before the
first step), ``steps = 10`` ℓ∞ sign-gradient steps on ``KL(softmax f(x) ‖ softmax f(x'))`` (sum),
each followed by projection onto the ε-ball ∩ [0, 1]; the model is in eval mode during the attack
(``model.eval()`` in the reference code; ``attack_bn=train`` keeps train mode). The reference
values ε = 0.031, step 0.007 (docs/references.md §8) are scaled to the run: ``ε = ctx.eps`` and step
``ctx.spec.pgd_alpha / 255`` (2/255 ≈ 0.0078 on CIFAR-10, AWP's TRADES value; preset ``paper``
sets 0.007). β = 6 (the paper's CIFAR-10 value for its headline results).

Training forwards in train mode: one on ``x`` (its logits serve both the CE and the KL target;
the reference code runs that forward twice, identically) and one on ``x'``.

Defaults: on CIFAR-10/SVHN ``standard``'s optimiser (SGD + Nesterov, lr 0.1 cosine, weight decay
5e-4, batch 128, 100 epochs); preset ``paper``: the reference ``train_trades_cifar10.py`` (SGD
lr 0.1, momentum 0.9, weight decay 2e-4, batch 128, 80 epochs, lr ÷10 from epoch 75 and again
from 90). On digits: Adam 1e-3 cosine, batch 64, 15 epochs, as ``standard``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cure_eval.training.method_helpers import (
    AttackBN,
    Forward,
    InnerAttackMethod,
    attack_mode,
)
from cure_eval.training.methods import MethodConfig, StepStats


def trades_kl(logits_adv: torch.Tensor, logits_nat: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """``KL(softmax(logits_nat) ‖ softmax(logits_adv))`` as ``F.kl_div`` computes it in TRADES."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction=reduction)


def trades_attack(
    model: Forward, x: torch.Tensor, *, eps: float, alpha: float, steps: int, init_std: float = 0.001,
) -> torch.Tensor:
    """The TRADES inner maximisation (reference ``trades_loss``), detached adversarial inputs."""
    x0 = x.detach()
    with torch.no_grad():
        p_nat = F.softmax(model(x0), dim=1)
    adv = x0 + init_std * torch.randn_like(x0)
    for _ in range(steps):
        adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.kl_div(F.log_softmax(model(adv), dim=1), p_nat, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = torch.min(torch.max(adv, x0 - eps), x0 + eps).clamp(0.0, 1.0)
    return adv.clamp(0.0, 1.0).detach()


@dataclass
class TradesConfig(MethodConfig):
    """TRADES hyperparameters.

    Attributes:
        beta: weight β of the robust KL term (1/λ in the paper; 6 for its CIFAR-10 results).
        steps: iterations of the KL attack (reference: 10).
        step_size: attack step in [0, 1] pixel units; ``None`` (default): ``spec.pgd_alpha / 255``.
        init_std: standard deviation of the Gaussian random start (reference: 0.001).
        attack_bn: ``eval`` (default, as the reference code) or ``train``.
    """

    beta: float = 6.0
    steps: int = 10
    step_size: float | None = None
    init_std: float = 0.001
    attack_bn: AttackBN = "eval"


class TradesMethod(InnerAttackMethod[TradesConfig]):
    name = "trades"
    description = "TRADES: CE + β·KL to a KL-PGD(10) point, from scratch (Zhang et al. 2019)"
    Config = TradesConfig

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return {
            # yaodongyu/TRADES train_trades_cifar10.py (WRN-34-10): 1-based epochs ≥ 75 use lr/10,
            # ≥ 90 lr/100, i.e. 0-based milestones 74 and 89; ε = 0.031 (pass --eps 7.9), step 0.007.
            "paper": {"epochs": 80, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False,
                      "weight_decay": 2e-4, "lr_schedule": "step", "lr_milestones": (74, 89),
                      "beta": 6.0, "steps": 10, "step_size": 0.007},
        }

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The KL-maximising point of the ε-ball (labels unused, as in TRADES)."""
        c = self.config
        with attack_mode(model, c.attack_bn):
            return trades_attack(model, x, eps=self.ctx.eps, alpha=self.alpha, steps=c.steps,
                                 init_std=c.init_std)

    def objective(self, forward: Forward, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``CE(f(x), y) + β·KL(f(x) ‖ f(x_adv))`` and detached statistics."""
        c = self.config
        logits_nat = forward(x)
        logits_adv = forward(x_adv)
        ce = F.cross_entropy(logits_nat, y)
        kl = trades_kl(logits_adv, logits_nat)
        loss = ce + c.beta * kl
        return loss, {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach(),
                      "train_acc": (logits_nat.argmax(1) == y).float().mean(),
                      "adv_acc": (logits_adv.argmax(1) == y).float().mean()}

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        x_adv = self.attack(model, x, y)
        loss, stats = self.objective(model, x, x_adv, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return dict(stats)
