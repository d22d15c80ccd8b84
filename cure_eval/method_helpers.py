"""Helpers shared by the method plugins: moved to :mod:`cure_eval.training.method_helpers`; removed in 0.3.

A thin re-export so that ``cure_eval.method_helpers`` (plugins, third-party code) keeps working for one release:
import from :mod:`cure_eval.training.method_helpers` instead.
"""

from __future__ import annotations

from .training.method_helpers import (
    IC,
    AttackBN,
    Forward,
    InnerAttackMethod,
    InnerAttackOptions,
    attack_mode,
    check_inner_attack,
    digits_or_cifar_defaults,
)

__all__ = [
    "AttackBN",
    "Forward",
    "IC",
    "InnerAttackMethod",
    "InnerAttackOptions",
    "attack_mode",
    "check_inner_attack",
    "digits_or_cifar_defaults",
]
