"""Findings of the gradient-masking check: the thresholds, :class:`Finding` (one warning sign's
status, value and details) and how a value becomes PASS / WARN / FAIL. See :mod:`cure_eval.masking`
for the table of checks and their sources, ``docs/masking.md`` for the measurements behind every
threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..core.io import to_jsonable
from ..errors import UsageError

Status = Literal["PASS", "WARN", "FAIL"]
Verdict = Literal["pass", "suspect"]

#: The attacks of the suite the checks need (reused from a given :class:`SuiteResult`).
NEEDED_ATTACKS: tuple[str, ...] = ("fgsm", "pgd40", "pgd100", "spsa")
#: The gradient-free attacks of the per-point comparisons: run on a seeded subset of the checked
#: points (:func:`gradient_free_points`), the others on all of them.
GRADIENT_FREE_ATTACKS: tuple[str, ...] = ("spsa", "square")

# --------------------------------------------------------------------------------------------
# Thresholds. Measured on digits models (normal, CURE, and three models that mask on purpose);
# the numbers behind each choice are in docs/masking.md and in each check's docstring.
# --------------------------------------------------------------------------------------------
#: A FAIL needs at least this many points beyond the threshold (one point of a small sample is
#: a large fraction; every honest model we measured had single stray points).
MIN_POINTS = 2
#: SPSA counts as "stronger" on a point (a red point of Fig. 7) when its adversarial loss is
#: below PGD(100)'s by more than this fraction of the point's clean margin (scale-free: logits
#: ×1e4 change nothing). Honest digits models: 0-2.9 % of points beyond 0.2, 1.6-13.5 % beyond
#: 0.1; masked models: 88-100 % beyond 0.2.
SPSA_TOLERANCE = 0.2
#: FAIL when more than this fraction of the attacked points are red (honest max 2.9 %).
SPSA_STRONGER_FAIL = 0.1
#: SPSA and Square run on one checked point in ``GRADIENT_FREE_SHARE`` (seeded), at least
#: ``GRADIENT_FREE_MIN_POINTS`` (all when fewer): SPSA spends up to 12,900 forwards on every point it
#: cannot break (about 7,000 on average on the digits CNNs, twice AutoAttack's whole budget per
#: point), while the red share it is judged on is 0-2.9 % on honest models and 87-100 % on masked
#: ones, which a sixteenth of the points still separates. With one in 16, the whole masking check
#: of a 200-point audit stays under AutoAttack's passes on the same points, and the verdicts on the
#: masked test models are those of SPSA on every point (docs/masking.md#cost).
GRADIENT_FREE_SHARE = 16
GRADIENT_FREE_MIN_POINTS = 10
#: Square's queries in the check, its own budget (the audit's default Square has fewer): the
#: per-sample Square-vs-PGD comparison and the verdicts were measured with 1000
#: (docs/masking.md#cost); fewer queries leave Square's loss higher, which can only hide masking.
SQUARE_QUERIES = 1000
#: FAIL when FGSM fools more than this fraction of the attacked points that PGD(100) did not
#: (honest max 1.4 %, i.e. one point of 70).
FGSM_BEATS_PGD_FAIL = 0.05
#: FAIL when PGD robust accuracy rises by more than this between two successive radii.
EPS_RISE_FAIL = 0.02
#: Multiples of ε of the sweep (capped at 1), PGD(20) with step max(pgd_alpha, 2.5·ε/20).
EPS_SWEEP_FACTORS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
EPS_SWEEP_STEPS = 20
#: FAIL when PGD at ε = 1 from the clean input leaves more than this fraction correct.
UNBOUNDED_FAIL = 0.02
UNBOUNDED_STEPS = 100
#: FAIL when uniform noise fools more than this fraction of points that PGD(100) did not.
NOISE_BEATS_PGD_FAIL = 0.02
NOISE_DRAWS = 100
#: FAIL when more than this fraction of the points has a zero, NaN or infinite gradient.
GRADIENTS_FAIL = 0.05
#: FAIL when logits of repeated passes differ by more than this (relative to max(1, max|z|)).
RANDOM_FORWARD_FAIL = 1e-4
RANDOM_FORWARD_PASSES = 5
#: FAIL when more than this fraction of output rows are non-negative and sum to 1.
PROBABILITY_FAIL = 0.5
PROBABILITY_ATOL = 1e-3
#: FAIL when more than this fraction of the points is still changing with more PGD iterations.
CONVERGENCE_FAIL = 0.05
#: Pintor et al. 2022: the best normalised loss still improving by > 0.05 over the last 10 steps.
CONVERGENCE_WINDOW = 10
CONVERGENCE_DELTA = 0.05
#: FAIL when AutoAttack breaks more than this fraction of the attacked points that no attack of
#: the suite broke (the suite's worst case sits that far above AutoAttack's): the suite's own
#: attacks are too weak for this model (WARN on any such point). Measured with the default suite
#: (APGD-CE/DLR included; docs/masking.md): honest digits models 0 % (small CNN), 1.5 % and 2.6 %
#: (the default defend run's normal and CURE WRN-16-4s: only points AutoAttack's targeted APGD-T
#: broke); the suite without the APGDs on those WRNs 3.1 % and 7.8 %; shattered gradients 46 %.
AUTOATTACK_GAP_FAIL = 0.05


# --------------------------------------------------------------------------------------------
# Findings and the report.
# --------------------------------------------------------------------------------------------
@dataclass
class Finding:
    """The outcome of one check.

    Attributes:
        name: the check (``"spsa_vs_pgd"``, ``"gradients"``...).
        status: ``"PASS"``, ``"WARN"`` or ``"FAIL"`` (see the module docs).
        value: the measured number the status is decided on.
        threshold: the FAIL threshold ``value`` is compared with.
        message: one line: what was measured and what it means.
        details: further measurements (JSON-ready: numbers, strings, lists).
    """

    name: str
    status: Status
    value: float
    threshold: float
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, *, details: bool = False) -> dict[str, Any]:
        """``{"name", "status", "value", "threshold", "message"}`` (plus ``details`` if asked)."""
        out: dict[str, Any] = {"name": self.name, "status": self.status, "value": json_float(self.value),
                               "threshold": json_float(self.threshold), "message": self.message}
        if details:
            out["details"] = to_jsonable(self.details)
        return out


def status_of(value: float, threshold: float, *, warn: bool, count: int | None = None) -> Status:
    """FAIL when ``value > threshold`` (and, for per-point fractions, ``count >= MIN_POINTS``);
    else WARN if ``warn`` (some evidence), else PASS. NaN (nothing to measure) is a WARN."""
    if math.isnan(value):
        return "WARN"
    if value > threshold and (count is None or count >= MIN_POINTS):
        return "FAIL"
    return "WARN" if warn else "PASS"


def gradient_free_points(n: int, spsa_n: int | str = "auto", *, name: str = "spsa_n") -> int:
    """How many of ``n`` checked points SPSA and Square attack: ``spsa_n`` points (at most ``n``),
    all of them for ``"all"``, and for ``"auto"`` one in :data:`GRADIENT_FREE_SHARE`, at least
    :data:`GRADIENT_FREE_MIN_POINTS`. ``name``: the parameter an error message names."""
    if spsa_n == "all":
        return n
    if spsa_n == "auto":
        return min(n, max(GRADIENT_FREE_MIN_POINTS, -(-n // GRADIENT_FREE_SHARE)))
    if isinstance(spsa_n, int) and not isinstance(spsa_n, bool) and spsa_n >= 1:
        return min(n, spsa_n)
    raise UsageError(f"`{name}` must be a positive number of points, auto or all, got {spsa_n!r}")


def json_float(v: float) -> float | None:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def frac(mask: torch.Tensor, among: torch.Tensor) -> float:
    """Share of the ``among`` points where ``mask`` holds (NaN when there are none)."""
    k = int(among.sum())
    return float((mask & among).sum()) / k if k else float("nan")


def pct(v: float) -> str:
    return "nan" if math.isnan(v) else f"{100 * v:.1f} %"
