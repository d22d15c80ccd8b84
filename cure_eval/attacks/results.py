"""What the suite measured and how it is reported: :class:`SuiteResult` and its JSON summary
(:func:`suite_summary`), per-point rows (:func:`suite_rows`), AutoAttack next to the suite's own
worst case (:func:`autoattack_comparison`), and the ε sweep's :class:`EpsSweepResult`.

The worst-case and cascade rules that fill a :class:`SuiteResult` live in one place,
:mod:`cure_eval.attacks.units`; this module only reads the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import foolbox
import torch
import torchattacks

from .base import AttackResult
from .registry import get_attack


@dataclass
class SuiteResult:
    """Everything :func:`run_suite` measured, per point (CPU tensors of length ``n``)."""

    eps: float
    eps_l2: float
    seed: int
    indices: torch.Tensor
    labels: torch.Tensor
    clean_pred: torch.Tensor
    clean_margin: torch.Tensor
    attacks: dict[str, AttackResult]
    worst_case: torch.Tensor
    worst_case_attacks: list[str]
    cascade: bool
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    #: the whole run's model passes: ``{"forward", "backward"}`` (clean pass and every unit),
    #: ``"clean"`` (the clean pass alone) and ``"families"`` (unit name: members sharing one run);
    #: empty when not counted
    passes: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def clean_correct(self) -> torch.Tensor:
        return self.clean_pred == self.labels

    @property
    def clean_accuracy(self) -> float:
        return fraction(self.clean_correct)

    @property
    def worst_case_accuracy(self) -> float:
        return fraction(self.worst_case)

    def summary(self) -> dict[str, Any]:
        """See :func:`suite_summary`."""
        return suite_summary(self)

    def rows(self) -> list[dict[str, Any]]:
        """See :func:`suite_rows`."""
        return suite_rows(self)


@dataclass
class EpsSweepResult:
    """PGD robust accuracy at each ε of a sweep (:func:`eps_sweep`)."""

    eps: list[float]
    robust_accuracy: list[float]
    clean_accuracy: float
    steps: int
    alpha: float
    seed: int
    robust: list[torch.Tensor]
    monotone: bool

    def as_dict(self) -> dict[str, Any]:
        return {"eps": self.eps, "robust_accuracy": self.robust_accuracy,
                "clean_accuracy": self.clean_accuracy, "steps": self.steps, "alpha": self.alpha,
                "seed": self.seed, "monotone": self.monotone}


def fraction(mask: torch.Tensor) -> float:
    """Mean of a boolean mask in float64 (float32 would print 60/66 as 0.9090909361839294)."""
    return float(mask.double().mean()) if len(mask) else float("nan")


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose attacks the numbers come from."""
    import timm

    from .autoattack import autoattack_version

    return {"torch": torch.__version__, "torchattacks": torchattacks.__version__,
            "foolbox": foolbox.__version__, "timm": timm.__version__, "pyautoattack": autoattack_version()}


def _broken_by_name(subs: Sequence[str], code: float) -> str | None:
    """The sub-attack name behind a ``broken_by`` code (``None`` for -1 / NaN)."""
    if math.isnan(code) or code < 0 or int(code) >= len(subs):
        return None
    return subs[int(code)]


def autoattack_comparison(result: SuiteResult) -> dict[str, Any]:
    """Each reference attack (AutoAttack) next to the suite's own worst case, per point.

    ``{name: {"robust_accuracy", "suite_worst_case_accuracy", "suite_attacks", "gap" (suite
    worst case − reference, in accuracy), "only_reference" (dataset indices the reference broke
    and no suite attack did), "only_suite" (the reverse), "agree" (points with the same verdict)}}``
    for every reference attack run beside at least one other attack of the worst case; ``{}``
    otherwise, and for a cascade (there the reference only sees what the cheaper attacks left).
    """
    if result.cascade:
        return {}
    refs = [a for a in result.attacks if get_attack(a).reference]
    own = [a for a in result.worst_case_attacks if a not in refs]
    if not refs or not own:
        return {}
    correct = result.clean_correct
    suite_robust = correct.clone()
    for a in own:
        suite_robust &= result.attacks[a].worst_case_robust
    out: dict[str, Any] = {}
    for r in refs:
        ref_robust = correct & result.attacks[r].robust
        only_ref = suite_robust & ~ref_robust
        only_suite = ref_robust & ~suite_robust
        out[r] = {
            "robust_accuracy": fraction(ref_robust),
            "suite_worst_case_accuracy": fraction(suite_robust),
            "suite_attacks": own,
            "gap": fraction(suite_robust) - fraction(ref_robust),
            "only_reference": result.indices[only_ref].tolist(),
            "only_suite": result.indices[only_suite].tolist(),
            "agree": int((suite_robust == ref_robust).sum()),
        }
    return out


def suite_summary(result: SuiteResult) -> dict[str, Any]:
    """A JSON-ready summary; accuracies are fractions in [0, 1], times in seconds.

    Keys: ``n``, ``eps``, ``eps_l2``, ``seed``, ``clean_accuracy``, ``attacks`` (per attack
    ``robust_accuracy``, ``seconds``, ``attacked`` and, for DeepFool, ``median_min_norm``; in a
    cascade ``robust_accuracy`` is ``None`` and ``cumulative_robust_accuracy`` is given instead),
    ``worst_case_accuracy``, ``worst_case_attacks``, ``cascade``, ``autoattack_comparison``
    (:func:`autoattack_comparison`), ``settings``, ``seconds`` and ``versions`` (torch,
    torchattacks, foolbox, timm, pyautoattack). AutoAttack entries also count ``broken_by`` per
    sub-attack; PGD entries give ``any_iterate_robust_accuracy`` (robust at every iterate of the
    run, what the worst case counts; not in a cascade). ``median_min_norm`` is the median minimal
    perturbation over the attacked points (``None`` if DeepFool failed on half of them or more).
    """
    attacks: dict[str, Any] = {}
    for name, res in result.attacks.items():
        entry: dict[str, Any] = {
            "robust_accuracy": None if result.cascade else fraction(res.robust),
            "seconds": res.seconds,
            "attacked": int(res.attacked.sum()),
        }
        if result.cascade:
            entry["cumulative_robust_accuracy"] = fraction(res.worst_case_robust)
        if "min_norm" in res.extra:
            # over the attacked points; inf (DeepFool found nothing) counts as large
            mn = res.extra["min_norm"][res.attacked]
            med = float(mn.median()) if len(mn) else math.nan
            entry["median_min_norm"] = med if math.isfinite(med) else None
        if "best_fooled" in res.extra and not result.cascade:
            entry["any_iterate_robust_accuracy"] = fraction(res.worst_case_robust)
        subs = get_attack(name).sub_attacks()
        if "broken_by" in res.extra and subs:
            codes = res.extra["broken_by"]
            entry["broken_by"] = {s: int((codes == k).sum()) for k, s in enumerate(subs)}
        if res.passes is not None:
            entry["passes"] = dict(res.passes)
            family = next((f for f, members in result.passes.get("families", {}).items() if name in members), None)
            if family is not None:
                entry["passes_shared_with"] = family
        attacks[name] = entry
    out: dict[str, Any] = {
        "n": result.n,
        "eps": result.eps,
        "eps_l2": result.eps_l2,
        "seed": result.seed,
        "clean_accuracy": result.clean_accuracy,
        "attacks": attacks,
        "worst_case_accuracy": result.worst_case_accuracy,
        "worst_case_attacks": list(result.worst_case_attacks),
        "cascade": result.cascade,
        "autoattack_comparison": autoattack_comparison(result),
        "settings": dict(result.settings),
        "seconds": result.seconds,
        "versions": library_versions(),
    }
    if result.passes:
        out["passes"] = {k: result.passes[k] for k in ("forward", "backward", "clean")}
    return out


def suite_rows(result: SuiteResult) -> list[dict[str, Any]]:
    """One row per (point, attack), the ``clean`` rows first, then attacks in run order.

    Columns: ``index`` (dataset index), ``label``, ``clean_pred``, ``attack``, ``attacked``,
    ``adv_pred``, ``success`` (attacked and misclassified at the returned point), ``robust``,
    ``adv_loss`` (true logit minus largest other logit at the returned point, CURE Fig. 7),
    ``linf``, ``l2`` (perturbation norms) and ``min_norm`` (DeepFool's minimal perturbation, in
    its own norm; ``None`` for other attacks and where DeepFool found nothing) and ``broken_by``
    (AutoAttack: the sub-attack that broke the point, e.g. ``apgd-ce``; ``None`` elsewhere) and
    ``best_fooled`` (PGD: fooled at the returned point or at an earlier iterate, what the worst
    case counts; ``None`` elsewhere) and ``forward_share``/``backward_share`` (the model passes
    spent on the point: its unit's passes shared equally among the points the unit attacked, 0 for a
    point it did not attack; clean rows: the clean pass over the points; ``None`` where not counted).
    """
    idx = result.indices.tolist()
    labels = result.labels.tolist()
    clean = result.clean_pred.tolist()
    rows: list[dict[str, Any]] = []
    margin = result.clean_margin.tolist()
    correct = result.clean_correct.tolist()
    clean_passes = result.passes.get("clean")
    clean_share = ([clean_passes["forward"] / result.n, clean_passes["backward"] / result.n]
                   if clean_passes and result.n else [None, None])
    for i in range(result.n):
        rows.append({"index": idx[i], "label": labels[i], "clean_pred": clean[i], "attack": "clean",
                     "attacked": False, "adv_pred": clean[i], "success": False, "robust": correct[i],
                     "adv_loss": margin[i], "linf": 0.0, "l2": 0.0, "min_norm": None, "broken_by": None,
                     "best_fooled": None, "forward_share": clean_share[0], "backward_share": clean_share[1]})
    for name, res in result.attacks.items():
        cols = {k: getattr(res, k).tolist() for k in ("attacked", "adv_pred", "success", "robust",
                                                       "margin", "linf", "l2")}
        mn = res.extra["min_norm"].tolist() if "min_norm" in res.extra else None
        subs = get_attack(name).sub_attacks()
        by = res.extra["broken_by"].tolist() if "broken_by" in res.extra and subs else None
        best = res.extra["best_fooled"].tolist() if "best_fooled" in res.extra else None
        shares = [res.extra[k].tolist() if k in res.extra else None for k in ("forward_share", "backward_share")]
        for i in range(result.n):
            m = None if mn is None or not math.isfinite(mn[i]) else mn[i]
            b = None if by is None else _broken_by_name(subs, by[i])
            rows.append({"index": idx[i], "label": labels[i], "clean_pred": clean[i], "attack": name,
                         "attacked": cols["attacked"][i], "adv_pred": cols["adv_pred"][i],
                         "success": cols["success"][i], "robust": cols["robust"][i],
                         "adv_loss": cols["margin"][i], "linf": cols["linf"][i], "l2": cols["l2"][i],
                         "min_norm": m, "broken_by": b,
                         "best_fooled": None if best is None or math.isnan(best[i]) else bool(best[i]),
                         "forward_share": None if shares[0] is None else shares[0][i],
                         "backward_share": None if shares[1] is None else shares[1][i]})
    return rows
