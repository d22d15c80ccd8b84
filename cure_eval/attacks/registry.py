"""The attack registry: entry points ``cure_eval.attacks`` plus :func:`register_attack`.

The built-in attacks (``fgsm``, ``pgd7/20/40/100``, ``deepfool_linf``, ``deepfool_l2``, ``spsa``)
are registered through the same entry points a third-party package uses::

    [project.entry-points."cure_eval.attacks"]
    my_attack = "my_package.attacks:MyAttack"

Unknown names list the valid ones. The registry is :class:`cure_eval.core.registry.PluginRegistry`,
the same as the methods'.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, TypeVar

from ..core.registry import PluginRegistry
from ..errors import UsageError
from .base import Attack

log = logging.getLogger(__name__)

ATTACK_ENTRY_POINT_GROUP = "cure_eval.attacks"

_ATTACKS: PluginRegistry[type[Attack[Any]]] = PluginRegistry(group=ATTACK_ENTRY_POINT_GROUP, base=Attack,
                                                              kind="attack")

A = TypeVar("A", bound="type[Attack[Any]]")


def register_attack(cls: A) -> A:
    """Register an attack class (usable as a decorator). Re-registering a name replaces it."""
    if isinstance(cls, type) and issubclass(cls, Attack) and cls.norm not in ("linf", "l2"):
        raise TypeError(f"attack {cls.name!r}: norm must be 'linf' or 'l2', got {cls.norm!r}")
    _ATTACKS.register(cls)
    return cls


def unregister_attack(name: str) -> None:
    """Remove an attack added with :func:`register_attack` (entry points are unaffected)."""
    _ATTACKS.unregister(name)


def _available() -> dict[str, type[Attack[Any]]]:
    return _ATTACKS.available()


def list_attacks() -> list[str]:
    """Names of all installed attacks, in report order."""
    attacks = _available()
    return sorted(attacks, key=lambda a: (attacks[a].order, a))


def get_attack(name: str) -> type[Attack[Any]]:
    """The attack class registered as ``name``; an unknown name lists the valid ones."""
    attacks = _available()
    try:
        return attacks[name]
    except KeyError:
        raise UsageError(f"unknown attack {name!r}: choose from {', '.join(['clean', *list_attacks()])}") from None


def check_attack_names(names: Iterable[str]) -> list[str]:
    """``names`` without duplicates (``clean`` dropped: it is always computed), each checked
    against the registry; unknown names raise one :class:`UsageError` that lists the valid ones."""
    attacks = _available()
    names = list(names)
    unknown = [a for a in names if a != "clean" and a not in attacks]
    if unknown:
        raise UsageError(f"unknown attack {', '.join(unknown)}: choose from {', '.join(['clean', *list_attacks()])}")
    return list(dict.fromkeys(a for a in names if a != "clean"))


def attack_order(names: Iterable[str], *, cascade: bool) -> list[str]:
    """``names`` in report order, or cheap → expensive for a cascade."""
    attacks = _available()
    wanted = check_attack_names(names)
    if cascade:
        return sorted(wanted, key=lambda a: (attacks[a].cost, attacks[a].order, a))
    return sorted(wanted, key=lambda a: (attacks[a].order, a))
