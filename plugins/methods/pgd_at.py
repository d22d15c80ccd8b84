"""``pgd_at``: PGD adversarial training (Madry et al., ICLR 2018, https://arxiv.org/abs/1706.06083).

Each step minimises the cross-entropy on the adversarial batch only (Madry's objective
``min_θ E max_{||δ||∞ ≤ ε} ℓ(x + δ)``), with the inner maximisation approximated by ℓ∞ PGD on
the cross-entropy:

* ``steps = 10`` iterations (the usual PGD-AT setting, also AWP's and TRADES' training attack;
  Madry et al. trained CIFAR-10 with 7 steps of 2/255 — ``--method-arg steps=7``),
* a uniform random start in the ε-ball (Madry et al.),
* step ``α = ctx.spec.pgd_alpha / 255`` (2/255 on CIFAR-10/SVHN, Madry's and AWP's value at
  ε = 8/255; 4/255 on digits where ε = 32/255), ``x ← Π(x + α·sign ∇ℓ)`` projected onto the
  ε-ball ∩ [0, 1] after every step,
* ``ε = ctx.eps`` (the run's ``--eps``, i.e. the radius it is evaluated at).

BatchNorm during the attack (``attack_bn``): the inner PGD runs with the model in **eval mode**
by default (running statistics, which the 10 attack forwards do not update); only the training
forward on the adversarial batch is in train mode and updates them, once per step. This is what
the TRADES reference code and AWP's TRADES code do for their attack (``model.eval()`` before
crafting). Implementations that attack in train mode (batch statistics, running statistics then
updated 11 times a step) are reproduced with ``--method-arg attack_bn=train``.

Defaults: on CIFAR-10/SVHN, the optimiser of ``standard`` (SGD + Nesterov 0.9, lr 0.1 cosine, weight
decay 5e-4, batch 128, 100 epochs); preset ``paper`` is Madry et al.'s CIFAR-10 schedule (80k
iterations of batch 128 ≈ 205 epochs, lr 0.1 divided by 10 at 40k and 60k iterations ≈ epochs 102
and 154, weight decay 2e-4; our SGD uses Nesterov momentum where Madry's used plain momentum). On
digits: Adam 1e-3 cosine, batch 64, 15 epochs, as ``standard``.

The helpers it shares with ``trades`` and ``awp`` live in the core:
:func:`cure_eval.attacks.pgd.pgd_linf` and :mod:`cure_eval.training.method_helpers`. Nothing here has
state beyond the model and optimiser: resuming is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cure_eval.attacks.pgd import pgd_linf
from cure_eval.training.method_helpers import (
    AttackBN,
    Forward,
    InnerAttackMethod,
    attack_mode,
)
from cure_eval.training.methods import MethodConfig, StepStats


@dataclass
class PGDATConfig(MethodConfig):
    """PGD-AT hyperparameters.

    Attributes:
        steps: PGD iterations of the inner maximisation (default 10, as AWP/TRADES; Madry et al.
            trained CIFAR-10 with 7).
        step_size: PGD step in [0, 1] pixel units; ``None`` (default): ``spec.pgd_alpha / 255``.
        random_start: start from a uniform point of the ε-ball (Madry et al.; default True).
        attack_bn: ``eval`` (default) or ``train``: the model's mode while the attack runs.
    """

    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    attack_bn: AttackBN = "eval"


class PGDATMethod(InnerAttackMethod[PGDATConfig]):
    name = "pgd_at"
    description = "PGD(10) adversarial training from scratch (Madry et al. 2018)"
    Config = PGDATConfig

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return {
            # Madry et al.'s CIFAR-10 run: 80k iterations of batch 128 (≈ 205 epochs), lr 0.1,
            # ÷10 at 40k and 60k iterations, weight decay 2e-4, momentum 0.9.
            "paper": {"epochs": 205, "batch_size": 128, "optimizer": "sgd", "lr": 0.1,
                      "momentum": 0.9, "nesterov": False, "weight_decay": 2e-4, "lr_schedule": "step",
                      "lr_milestones": (102, 154)},
        }

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial inputs of the current model (in ``attack_bn`` mode)."""
        c = self.config
        with attack_mode(model, c.attack_bn):
            return pgd_linf(model, x, y, eps=self.ctx.eps, alpha=self.alpha, steps=c.steps,
                            random_start=c.random_start)

    def objective(self, forward: Forward, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss ``CE(f(x_adv), y)`` and detached per-step statistics."""
        logits = forward(x_adv)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "adv_acc": (logits.argmax(1) == y).float().mean()}

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        x_adv = self.attack(model, x, y)
        loss, stats = self.objective(model, x, x_adv, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return dict(stats)
