"""Attacks for robustness audits: PGD family, SPSA (foolbox), DeepFool (foolbox), FGSM, the suite.

See :mod:`cure_eval.attacks.suite` for the rules every reported number obeys.
"""

from __future__ import annotations

from .base import AttackResult, adversarial_margin
from .pgd import DEFAULT_PGD_STEPS, MultiStepPGD
from .spsa import LinfSPSAAttack, SPSAOutput, spsa_attack, spsa_gradient
from .suite import (
    ATTACK_NAMES,
    ATTACKS,
    CASCADE_ORDER,
    EPS_TOL,
    PGD_STEPS,
    EpsSweepResult,
    SuiteResult,
    check_adversarial,
    eps_sweep,
    library_versions,
    perturbation_norms,
    run_attack,
    run_suite,
    suite_rows,
    suite_summary,
    threat_norm,
)

__all__ = [
    "ATTACKS",
    "ATTACK_NAMES",
    "AttackResult",
    "CASCADE_ORDER",
    "DEFAULT_PGD_STEPS",
    "EPS_TOL",
    "EpsSweepResult",
    "LinfSPSAAttack",
    "MultiStepPGD",
    "PGD_STEPS",
    "SPSAOutput",
    "SuiteResult",
    "adversarial_margin",
    "check_adversarial",
    "eps_sweep",
    "library_versions",
    "perturbation_norms",
    "run_attack",
    "run_suite",
    "spsa_attack",
    "spsa_gradient",
    "suite_rows",
    "suite_summary",
    "threat_norm",
]
