"""Attacks for robustness audits: a registry of attack plugins and the suite that runs them.

Built-ins, one module each, registered through the entry-point group ``cure_eval.attacks``
exactly as a third-party package would: ``fgsm`` (:mod:`.fgsm`), ``pgd7/20/40/100``
(:mod:`.pgd`, one trajectory), ``deepfool_linf``/``deepfool_l2`` (:mod:`.deepfool`), ``spsa``
(:mod:`.spsa`), ``autoattack``/``autoattack-rand`` (:mod:`.autoattack`, the original AutoAttack
through the ``pyautoattack`` package). The suite runs as units (:mod:`.units`: one attack or
family on one chunk of points, into a store). The plugin contract is :class:`~cure_eval.attacks.base.Attack`; see
:mod:`cure_eval.attacks.suite` for the rules every reported number obeys.
"""

from __future__ import annotations

from .autoattack import AutoAttackRun, run_autoattack
from .base import (
    Attack,
    AttackConfig,
    AttackContext,
    AttackOutput,
    AttackResult,
    adversarial_margin,
    require_input_gradients,
)
from .pgd import DEFAULT_PGD_STEPS, MultiStepPGD, PGDConfig
from .registry import (
    ATTACK_ENTRY_POINT_GROUP,
    attack_order,
    check_attack_names,
    get_attack,
    list_attacks,
    register_attack,
    unregister_attack,
)
from .spsa import LinfSPSAAttack, SPSAOutput, spsa_attack, spsa_gradient
from .suite import (
    ATTACK_NAMES,
    ATTACK_PRESETS,
    ATTACKS,
    DEFAULT_ATTACKS,
    EPS_TOL,
    THOROUGH_ATTACKS,
    EpsSweepResult,
    SuiteResult,
    autoattack_comparison,
    cascade_update,
    check_adversarial,
    eps_sweep,
    expand_presets,
    library_versions,
    perturbation_norms,
    run_attack,
    run_suite,
    suite_rows,
    suite_summary,
    threat_norm,
)
from .units import (
    SUITE_DEFAULTS,
    SUITE_SETTINGS,
    MemoryStore,
    SuitePlan,
    Unit,
    UnitStore,
    assemble,
    chunk_seed,
    make_plan,
    run_units,
    unit_keys,
)

__all__ = [
    "ATTACKS",
    "ATTACK_PRESETS",
    "DEFAULT_ATTACKS",
    "THOROUGH_ATTACKS",
    "expand_presets",
    "ATTACK_ENTRY_POINT_GROUP",
    "ATTACK_NAMES",
    "Attack",
    "AttackConfig",
    "AttackContext",
    "AttackOutput",
    "AttackResult",
    "AutoAttackRun",
    "DEFAULT_PGD_STEPS",
    "EPS_TOL",
    "EpsSweepResult",
    "LinfSPSAAttack",
    "MultiStepPGD",
    "PGDConfig",
    "SPSAOutput",
    "SUITE_DEFAULTS",
    "SUITE_SETTINGS",
    "MemoryStore",
    "SuitePlan",
    "Unit",
    "UnitStore",
    "assemble",
    "chunk_seed",
    "make_plan",
    "run_units",
    "unit_keys",
    "SuiteResult",
    "adversarial_margin",
    "attack_order",
    "autoattack_comparison",
    "cascade_update",
    "check_adversarial",
    "check_attack_names",
    "eps_sweep",
    "get_attack",
    "library_versions",
    "list_attacks",
    "perturbation_norms",
    "register_attack",
    "require_input_gradients",
    "run_attack",
    "run_autoattack",
    "run_suite",
    "spsa_attack",
    "spsa_gradient",
    "suite_rows",
    "suite_summary",
    "threat_norm",
    "unregister_attack",
]
