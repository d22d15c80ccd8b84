"""Gradient-masking checks: is a model's robustness real, or do its gradients lie?

A robustness number from gradient attacks (FGSM, PGD) is only as good as the gradients. A model
can look robust because its gradients are useless — shattered (non-differentiable or zero),
vanishing (saturated softmax) or stochastic (randomness at inference) — while adversarial
examples exist in plenty (Athalye, Carlini and Wagner 2018, https://arxiv.org/abs/1802.00420;
Carlini et al. 2019, https://arxiv.org/abs/1902.06705). This module runs the standard warning
signs as small, separate checks, each returning one :class:`Finding`, and combines them in
:func:`run_masking_check` into a :class:`MaskingReport` with a verdict.

The central check is the CURE paper's (Moosavi-Dezfooli et al., CVPR 2019,
https://arxiv.org/abs/1811.09716, §5 "Stronger attacks and verifying the absence of gradient
masking", Fig. 7): per test point, the *adversarial loss* (true logit minus largest other logit at
the returned point) of the gradient-free SPSA attack (Uesato et al. 2018,
https://arxiv.org/abs/1802.05666) against that of PGD(100). If SPSA, which never looks at a
gradient, does clearly better than PGD, the gradients are masked.

=========================  ==================================================================
check                      warning sign (source)
=========================  ==================================================================
``spsa_vs_pgd``            gradient-free SPSA beats PGD(100) per point (CURE Fig. 7; Uesato
                           et al. 2018; Athalye et al. 2018 "black-box beats white-box"), on a
                           seeded subset of the points (:func:`gradient_free_points`)
``square_vs_pgd``          the same comparison for gradient-free Square (Andriushchenko et al.
                           2020), on the same subset; WARN at most (no FAIL threshold measured)
``fgsm_vs_pgd``            single-step FGSM fools points PGD(100) does not (Athalye et al. 2018;
                           Carlini et al. 2019)
``eps_monotone``           PGD robust accuracy rises with ε (Carlini et al. 2019)
``unbounded``              PGD with ε = 1 (the whole input range) does not fool everything (ART;
                           Carlini et al. 2019; Pintor et al. 2022 "unconstrained attack
                           failure")
``random_noise``           uniform noise in the ε-ball fools points PGD(100) does not (Athalye
                           et al. 2018; Carlini et al. 2019)
``gradients``              zero, NaN or infinite input gradients (ART; AutoAttack; Pintor et al.
                           2022 "unavailable gradients")
``randomised_forward``     the same input gives different logits (AutoAttack, Croce and Hein
                           2020, https://arxiv.org/abs/2003.01690)
``probability_outputs``    outputs are probabilities, not logits (AutoAttack)
``pgd_convergence``        PGD(100) still far below PGD(40), or PGD's loss still rising at its
                           last steps (Pintor et al. 2022, https://arxiv.org/abs/2106.09947,
                           "incomplete optimisation")
``suite_vs_autoattack``    the original AutoAttack breaks points no attack of the suite breaks
                           (Croce and Hein 2020): the suite's attacks are too weak for this
                           model. Only when the audit ran ``--attacks ...,autoattack``
=========================  ==================================================================

Statuses and the verdict. Each check compares one number (``value``) with one ``threshold``:
``FAIL`` when the value is beyond the threshold (and, for per-point shares, at least
:data:`MIN_POINTS` points are involved), ``WARN`` when there is some evidence below that — single
stray points, of the size honest models also show —, ``PASS`` otherwise. The verdict is
``"suspect"`` if any check FAILs and ``"pass"`` otherwise. WARNs are reported but do not count:
a CURE-trained digits model without any masking had SPSA fool 3 of its 176 points PGD(100)
missed and FGSM fool 1 (both WARN); counting those would make every honest model suspect.
``docs/masking.md`` lists the measured values behind every threshold.

Fractions are per point and over the *attacked* points (those classified correctly clean), the
same denominator for every check, so that a FAIL reads "this share of the points we attacked".

Layout: :mod:`~cure_eval.masking.findings` (thresholds, :class:`Finding`, statuses),
:mod:`~cure_eval.masking.verdicts` (the checks over recorded numbers),
:mod:`~cure_eval.masking.probes` (the checks that run the model),
:mod:`~cure_eval.masking.report` (:class:`MaskingReport`: verdict, table, scatter, JSON) and
:mod:`~cure_eval.masking.run` (:func:`run_masking_check` and :data:`~cure_eval.masking.run.MASKING_CHECKS`,
the checks as a table); the recorded PGD is :func:`cure_eval.attacks.trajectory.pgd_trajectory`.
The models that mask on purpose live in :mod:`cure_eval.testing`; their old names here
(``NoisyInput``, ``QuantizedInput``, ``SaturatedLogits``) still resolve, with a
``DeprecationWarning``, until 0.3.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from ..attacks.trajectory import PGDTrajectory, pgd_trajectory
from .findings import NEEDED_ATTACKS, Finding, gradient_free_points
from .probes import (
    check_gradients,
    check_probability_outputs,
    check_randomised_forward,
    random_noise_fooled,
)
from .report import MaskingReport
from .run import MASKING_CHECKS, run_masking_check
from .verdicts import (
    check_eps_monotone,
    check_fgsm_vs_pgd,
    check_pgd_convergence,
    check_random_noise,
    check_spsa_vs_pgd,
    check_square_vs_pgd,
    check_suite_vs_autoattack,
    check_unbounded,
    still_improving,
)

#: The masking-on-purpose test models' old home (removed in 0.3): import them from cure_eval.testing.
_MOVED_TO_TESTING = ("NoisyInput", "QuantizedInput", "SaturatedLogits")


def __getattr__(name: str) -> Any:
    """The test models' old names, forwarded to :mod:`cure_eval.testing` with a warning (the
    library itself never imports that module)."""
    if name in _MOVED_TO_TESTING:
        warnings.warn(f"cure_eval.masking.{name} moved to cure_eval.testing.{name}; the old name is removed in 0.3",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("cure_eval.testing"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Finding",
    "MASKING_CHECKS",
    "MaskingReport",
    "NEEDED_ATTACKS",
    "PGDTrajectory",
    "check_eps_monotone",
    "check_fgsm_vs_pgd",
    "check_gradients",
    "check_pgd_convergence",
    "check_probability_outputs",
    "check_random_noise",
    "check_randomised_forward",
    "check_spsa_vs_pgd",
    "check_square_vs_pgd",
    "check_suite_vs_autoattack",
    "check_unbounded",
    "gradient_free_points",
    "pgd_trajectory",
    "random_noise_fooled",
    "run_masking_check",
    "still_improving",
]
