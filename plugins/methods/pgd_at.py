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

The helpers :func:`pgd_linf`, :func:`attack_mode` and :func:`digits_or_cifar_defaults` are
shared with ``trades`` and ``awp``. Nothing here has state beyond the model and optimiser: resuming is exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cure_eval.data import DatasetSpec
from cure_eval.errors import UsageError
from cure_eval.methods import Method, MethodConfig
from cure_eval.modes import eval_mode

#: ``forward(inputs) -> logits``: the model itself, or a functional copy of it (AWP's proxy).
Forward = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def attack_mode(model: nn.Module, bn: str) -> Iterator[None]:
    """Model mode for crafting adversarial examples: ``eval`` (every submodule in eval mode,
    previous modes restored afterwards) or ``train`` (left as it is)."""
    if bn == "eval":
        with eval_mode(model):
            yield
    elif bn == "train":
        yield
    else:
        raise UsageError(f"attack_bn must be 'eval' or 'train', got {bn!r}")


def pgd_linf(
    model: Forward, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
    random_start: bool = True,
) -> torch.Tensor:
    """ℓ∞ PGD on the cross-entropy (Madry et al. 2018), returning detached adversarial inputs.

    Start: ``x + U(-ε, ε)`` clipped to [0, 1] (or ``x``); then ``steps`` times
    ``x ← clip_[0,1](clip_{x0±ε}(x + α·sign ∇ₓ CE))``. Only input gradients are computed
    (``autograd.grad``), so no parameter ``.grad`` is touched. Uses the global RNG of ``x``'s device.
    """
    x0 = x.detach()
    if random_start:
        adv = (x0 + torch.empty_like(x0).uniform_(-eps, eps)).clamp(0.0, 1.0)
    else:
        adv = x0.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(adv), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = torch.min(torch.max(adv, x0 - eps), x0 + eps).clamp(0.0, 1.0)
    return adv.detach()


def digits_or_cifar_defaults(spec: DatasetSpec) -> dict[str, Any]:
    """``standard``'s optimiser settings (the from-scratch baselines share them)."""
    if spec.name == "digits":
        return {"epochs": 15, "batch_size": 64, "optimizer": "adam", "lr": 1e-3,
                "weight_decay": 0.0, "lr_schedule": "cosine"}
    return {"epochs": 100, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4,
            "lr_schedule": "cosine"}


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
    attack_bn: str = "eval"


def check_inner_attack(*, attack_bn: str, steps: int) -> None:
    """Validate the inner-attack options shared by ``pgd_at`` and ``trades``."""
    if attack_bn not in ("eval", "train"):
        raise UsageError(f"attack_bn must be 'eval' or 'train', got {attack_bn!r}")
    if steps < 0:
        raise UsageError(f"steps must be >= 0, got {steps}")


class PGDATMethod(Method):
    name = "pgd_at"
    description = "PGD(10) adversarial training from scratch (Madry et al. 2018)"
    fine_tunes = False
    Config = PGDATConfig

    @classmethod
    def check(cls, config: MethodConfig) -> None:
        """Refuse invalid option values with a one-line :class:`UsageError`."""
        assert isinstance(config, PGDATConfig)
        check_inner_attack(attack_bn=config.attack_bn, steps=config.steps)

    @classmethod
    def default_config(cls, spec: DatasetSpec, model_name: str) -> dict[str, Any]:
        return digits_or_cifar_defaults(spec)

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return {
            # Madry et al.'s CIFAR-10 run: 80k iterations of batch 128 (≈ 205 epochs), lr 0.1,
            # ÷10 at 40k and 60k iterations, weight decay 2e-4, momentum 0.9.
            "paper": {"epochs": 205, "batch_size": 128, "optimizer": "sgd", "lr": 0.1,
                      "momentum": 0.9, "nesterov": False, "weight_decay": 2e-4, "lr_schedule": "step",
                      "lr_milestones": (102, 154)},
        }

    @property
    def alpha(self) -> float:
        c = self.config
        assert isinstance(c, PGDATConfig)
        return c.step_size if c.step_size is not None else self.ctx.spec.pgd_alpha / 255

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial inputs of the current model (in ``attack_bn`` mode)."""
        c = self.config
        assert isinstance(c, PGDATConfig)
        with attack_mode(model, c.attack_bn):
            return pgd_linf(model, x, y, eps=self.ctx.eps, alpha=self.alpha, steps=c.steps,
                            random_start=c.random_start)

    def objective(self, forward: Forward, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss ``CE(f(x_adv), y)`` and detached per-step statistics."""
        logits = forward(x_adv)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "adv_acc": (logits.argmax(1) == y).float().mean()}

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        x_adv = self.attack(model, x, y)
        loss, stats = self.objective(model, x, x_adv, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {k: float(v) for k, v in stats.items()}
