"""Helpers that several training-method plugins share (``pgd_at``, ``trades``, ``awp``...).

They live in the core so that a plugin never imports another plugin for them: the model mode
while an inner attack runs (:func:`attack_mode`), the validation of the inner-attack options
(:func:`check_inner_attack`) and the from-scratch optimiser defaults
(:func:`digits_or_cifar_defaults`), and :class:`InnerAttackMethod`, the base of the methods that
train on an inner attack. The training-time ℓ∞ PGD is
:func:`cure_eval.attacks.pgd.pgd_linf`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol, TypeVar, cast

import torch
from torch import nn

from ..core.modes import eval_mode
from ..data import DatasetSpec
from ..errors import UsageError
from .methods import Method, MethodConfig

#: ``forward(inputs) -> logits``: the model itself, or a functional copy of it (AWP's proxy).
Forward = Callable[[torch.Tensor], torch.Tensor]
#: The model's mode while an inner attack crafts adversarial examples.
AttackBN = Literal["eval", "train"]


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


def check_inner_attack(*, attack_bn: str, steps: int) -> None:
    """Validate the inner-attack options shared by ``pgd_at``, ``trades`` and ``awp``."""
    if attack_bn not in ("eval", "train"):
        raise UsageError(f"attack_bn must be 'eval' or 'train', got {attack_bn!r}")
    if steps < 0:
        raise UsageError(f"steps must be >= 0, got {steps}")


def digits_or_cifar_defaults(spec: DatasetSpec) -> dict[str, Any]:
    """``standard``'s optimiser settings (the from-scratch baselines share them)."""
    if spec.name == "digits":
        return {"epochs": 15, "batch_size": 64, "optimizer": "adam", "lr": 1e-3,
                "weight_decay": 0.0, "lr_schedule": "cosine"}
    return {"epochs": 100, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4,
            "lr_schedule": "cosine"}


class InnerAttackOptions(Protocol):
    """The inner-attack fields a config of an :class:`InnerAttackMethod` has."""

    steps: int
    step_size: float | None
    attack_bn: str


IC = TypeVar("IC", bound=MethodConfig)


class InnerAttackMethod(Method[IC]):
    """Base of the from-scratch methods that train on an inner attack (``pgd_at``, ``trades``):
    validates ``steps``/``attack_bn``, uses the from-scratch optimiser defaults and resolves the
    attack step (``step_size``, else the dataset's PGD step)."""

    fine_tunes = False

    @classmethod
    def check(cls, config: IC) -> None:
        """Refuse invalid option values with a one-line :class:`UsageError`."""
        c = cast(InnerAttackOptions, config)
        check_inner_attack(attack_bn=c.attack_bn, steps=c.steps)

    @classmethod
    def default_config(cls, spec: DatasetSpec, model_name: str) -> dict[str, Any]:
        return digits_or_cifar_defaults(spec)

    @property
    def alpha(self) -> float:
        """The inner attack's step in [0, 1] pixel units."""
        c = cast(InnerAttackOptions, self.config)
        return c.step_size if c.step_size is not None else self.ctx.spec.pgd_alpha / 255
