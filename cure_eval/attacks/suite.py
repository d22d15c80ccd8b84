"""The attack suite: clean accuracy, FGSM, PGD(7/20/40/100), ℓ∞/ℓ2 DeepFool and SPSA.

Attacks and what they come from (all on [0, 1] images, ε in [0, 1] pixel units):

=================  ============================================================================
``clean``          no attack: clean predictions (always computed, once).
``fgsm``           ``torchattacks.FGSM`` (Goodfellow et al. 2015, https://arxiv.org/abs/1412.6572).
``pgd7/20/40/100`` :class:`~cure_eval.attacks.pgd.MultiStepPGD`: torchattacks' ℓ∞ PGD (Madry et
                   al. 2018, https://arxiv.org/abs/1706.06083), step ``pgd_alpha`` (default
                   2/255), random start; all requested step counts from one trajectory.
``deepfool_linf``  ``foolbox.attacks.LinfDeepFoolAttack`` (Moosavi-Dezfooli et al. 2016,
                   https://arxiv.org/abs/1511.04599), minimal-perturbation.
``deepfool_l2``    ``foolbox.attacks.L2DeepFoolAttack``, minimal-perturbation, ℓ2 radius
                   ``eps_l2``.
``spsa``           :class:`~cure_eval.attacks.spsa.LinfSPSAAttack` (Uesato et al. 2018,
                   https://arxiv.org/abs/1802.05666), gradient-free.
``autoattack``     the original AutoAttack (Croce and Hein 2020, https://arxiv.org/abs/2003.01690),
                   package ``pyautoattack``, ``standard`` version; ``autoattack-rand`` its
                   ``rand`` version (:mod:`cure_eval.attacks.autoattack`). Not in the default
                   selection (minutes per model); compared with the suite's own worst case in
                   ``autoattack_comparison``.
=================  ============================================================================

Rules every number obeys:

* Points misclassified clean count as non-robust and are never attacked.
* Every returned adversarial point is checked to lie in the attack's ε-ball (tolerance
  :data:`EPS_TOL`) and in [0, 1]; a violation raises :class:`~cure_eval.errors.CureEvalError`.
* ``robust`` is decided by evaluating the model (eval mode) at the returned point, which is also
  where the per-point margin (CURE Fig. 7's "adversarial loss": true logit minus the largest
  other logit) and the ℓ∞/ℓ2 perturbation norms are measured.
* DeepFool runs with ``epsilons=None`` (minimal perturbation, recorded per point in
  ``extra["min_norm"]``, ``inf`` where DeepFool found no adversarial example). The returned point
  is that minimal adversarial example projected onto the ε-ball (foolbox's own clipping), so a
  point is robust at ε iff it is clean-correct and the projected point is still classified
  correctly — i.e. its minimal perturbation is larger than ε (or, rarely, larger than ε but the
  projection happens to be adversarial too, which is a genuine adversarial example within ε).
* The worst case per point is "robust under every attack run" and worst-case accuracy is the
  mean over points of that (never the minimum of the per-attack accuracies).
* ℓ2 radius: ``eps_l2`` defaults to ``eps``. The ℓ2 ball of radius ε lies inside the ℓ∞ ε-ball,
  so ℓ2-DeepFool's adversarial examples at that radius are valid ℓ∞ ones and the worst case
  stays a sound ℓ∞-ε number. A larger ``eps_l2`` is a different threat model: deepfool_l2 is then
  reported on its own and left out of the worst case (``worst_case_attacks`` lists what went in).
  The minimal ℓ2 perturbation per point is recorded whatever the radius.
* ``cascade=True`` computes only the worst case, AutoAttack style: attacks run cheap → expensive
  (:data:`CASCADE_ORDER`), each only on the points still robust after the previous ones, always
  from the clean input. The PGD family then stops each point at the first recorded step count
  that fools it. Per-attack accuracies of a cascade are cumulative ("robust after this attack
  and all earlier ones") and reported as ``cumulative_robust_accuracy``.

Randomness: each PGD run starts from ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``
(the caller's RNG state is left untouched) and draws its random starts batch by batch exactly as
``torchattacks.PGD`` does. SPSA draws counter-based random numbers from ``(seed, point index)``,
so its result for a point does not depend on the other points. FGSM and DeepFool are
deterministic.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import foolbox
import torch
import torchattacks
from torch import nn

from ..errors import CureEvalError, UsageError
from ..modes import check_device, eval_mode
from .base import (
    Attack,
    AttackConfig,
    AttackContext,
    AttackResult,
    Norm,
    adversarial_margin,
    require_input_gradients,
)
from .deepfool import DeepFoolConfig
from .pgd import PGD, PGDConfig, run_pgd_steps
from .registry import attack_order, get_attack
from .spsa import SPSAConfig

log = logging.getLogger(__name__)

#: The built-in attacks, in report order: the default selection of :func:`run_suite` and of
#: ``audit --attacks``. Every installed attack (built-in or plugin) is in :func:`list_attacks`.
ATTACKS: tuple[str, ...] = (
    "fgsm", "pgd7", "pgd20", "pgd40", "pgd100", "apgd-ce", "apgd-dlr", "deepfool_linf", "deepfool_l2", "spsa",
)
#: The built-in names accepted by :func:`run_suite` (``clean`` adds nothing: clean accuracy is
#: always there).
ATTACK_NAMES: tuple[str, ...] = ("clean", *ATTACKS)
#: Slack allowed when checking that adversarial points lie in the ε-ball and in [0, 1].
EPS_TOL = 1e-5


def __getattr__(name: str) -> Any:
    """``CASCADE_ORDER``: the built-ins cheap → expensive, from the registry's ``cost``s."""
    if name == "CASCADE_ORDER":
        return tuple(attack_order(ATTACKS, cascade=True))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def threat_norm(name: str) -> str:
    """The norm of the registered attack ``name`` (``"l2"`` for deepfool_l2, ``"linf"`` for the
    other built-ins)."""
    return get_attack(name).norm


# --------------------------------------------------------------------------------------------
# Results.
# --------------------------------------------------------------------------------------------
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

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def clean_correct(self) -> torch.Tensor:
        return self.clean_pred == self.labels

    @property
    def clean_accuracy(self) -> float:
        return _fraction(self.clean_correct)

    @property
    def worst_case_accuracy(self) -> float:
        return _fraction(self.worst_case)

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


def _fraction(mask: torch.Tensor) -> float:
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
            "robust_accuracy": _fraction(ref_robust),
            "suite_worst_case_accuracy": _fraction(suite_robust),
            "suite_attacks": own,
            "gap": _fraction(suite_robust) - _fraction(ref_robust),
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
            "robust_accuracy": None if result.cascade else _fraction(res.robust),
            "seconds": res.seconds,
            "attacked": int(res.attacked.sum()),
        }
        if result.cascade:
            entry["cumulative_robust_accuracy"] = _fraction(res.worst_case_robust)
        if "min_norm" in res.extra:
            # over the attacked points; inf (DeepFool found nothing) counts as large
            mn = res.extra["min_norm"][res.attacked]
            med = float(mn.median()) if len(mn) else math.nan
            entry["median_min_norm"] = med if math.isfinite(med) else None
        if "best_fooled" in res.extra and not result.cascade:
            entry["any_iterate_robust_accuracy"] = _fraction(res.worst_case_robust)
        subs = get_attack(name).sub_attacks()
        if "broken_by" in res.extra and subs:
            codes = res.extra["broken_by"]
            entry["broken_by"] = {s: int((codes == k).sum()) for k, s in enumerate(subs)}
        attacks[name] = entry
    return {
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


def suite_rows(result: SuiteResult) -> list[dict[str, Any]]:
    """One row per (point, attack), the ``clean`` rows first, then attacks in run order.

    Columns: ``index`` (dataset index), ``label``, ``clean_pred``, ``attack``, ``attacked``,
    ``adv_pred``, ``success`` (attacked and misclassified at the returned point), ``robust``,
    ``adv_loss`` (true logit minus largest other logit at the returned point, CURE Fig. 7),
    ``linf``, ``l2`` (perturbation norms) and ``min_norm`` (DeepFool's minimal perturbation, in
    its own norm; ``None`` for other attacks and where DeepFool found nothing) and ``broken_by``
    (AutoAttack: the sub-attack that broke the point, e.g. ``apgd-ce``; ``None`` elsewhere) and
    ``best_fooled`` (PGD: fooled at the returned point or at an earlier iterate, what the worst
    case counts; ``None`` elsewhere).
    """
    idx = result.indices.tolist()
    labels = result.labels.tolist()
    clean = result.clean_pred.tolist()
    rows: list[dict[str, Any]] = []
    margin = result.clean_margin.tolist()
    correct = result.clean_correct.tolist()
    for i in range(result.n):
        rows.append({"index": idx[i], "label": labels[i], "clean_pred": clean[i], "attack": "clean",
                     "attacked": False, "adv_pred": clean[i], "success": False, "robust": correct[i],
                     "adv_loss": margin[i], "linf": 0.0, "l2": 0.0, "min_norm": None, "broken_by": None,
                     "best_fooled": None})
    for name, res in result.attacks.items():
        cols = {k: getattr(res, k).tolist() for k in ("attacked", "adv_pred", "success", "robust",
                                                       "margin", "linf", "l2")}
        mn = res.extra["min_norm"].tolist() if "min_norm" in res.extra else None
        subs = get_attack(name).sub_attacks()
        by = res.extra["broken_by"].tolist() if "broken_by" in res.extra and subs else None
        best = res.extra["best_fooled"].tolist() if "best_fooled" in res.extra else None
        for i in range(result.n):
            m = None if mn is None or not math.isfinite(mn[i]) else mn[i]
            b = None if by is None else _broken_by_name(subs, by[i])
            rows.append({"index": idx[i], "label": labels[i], "clean_pred": clean[i], "attack": name,
                         "attacked": cols["attacked"][i], "adv_pred": cols["adv_pred"][i],
                         "success": cols["success"][i], "robust": cols["robust"][i],
                         "adv_loss": cols["margin"][i], "linf": cols["linf"][i], "l2": cols["l2"][i],
                         "min_norm": m, "broken_by": b,
                         "best_fooled": None if best is None or math.isnan(best[i]) else bool(best[i])})
    return rows


# --------------------------------------------------------------------------------------------
# Checks.
# --------------------------------------------------------------------------------------------
def perturbation_norms(x: torch.Tensor, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point ℓ∞ and ℓ2 norms of ``x_adv - x`` (float64 for exact comparisons)."""
    d = (x_adv.detach().double() - x.detach().double()).flatten(1)
    if d.shape[0] == 0 or d.shape[1] == 0:
        z = torch.zeros(len(x), dtype=torch.float64)
        return z, z
    return d.abs().amax(dim=1), d.norm(dim=1)


def check_adversarial(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    name: str = "attack",
    tol: float = EPS_TOL,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> None:
    """Raise :class:`CureEvalError` unless every ``x_adv[i]`` is finite, within ``eps`` of
    ``x[i]`` in ``norm`` (``"linf"`` or ``"l2"``) and inside ``bounds``, each up to ``tol``.

    An attack that returns points outside its threat model would silently inflate its success
    rate; the suite runs this on every attack's output.
    """
    if x_adv.shape != x.shape:
        raise CureEvalError(f"{name} returned shape {tuple(x_adv.shape)} for inputs {tuple(x.shape)}: the attack is broken")
    if not torch.isfinite(x_adv).all():
        raise CureEvalError(f"{name} returned NaN or infinite adversarial points: the attack is broken")
    if norm not in ("linf", "l2"):
        raise UsageError(f"unknown norm {norm!r}: use linf or l2")
    if len(x) == 0:
        return
    linf, l2 = perturbation_norms(x, x_adv)
    dist = linf if norm == "linf" else l2
    bad = dist > eps + tol
    if bool(bad.any()):
        raise CureEvalError(
            f"{name} returned {int(bad.sum())} of {len(x)} points outside the {norm} ε-ball "
            f"(largest distance {float(dist.max()):.6g} > ε = {eps:.6g}): the attack is broken, "
            f"its numbers cannot be used"
        )
    lo, hi = float(x_adv.min()), float(x_adv.max())
    if lo < bounds[0] - tol or hi > bounds[1] + tol:
        raise CureEvalError(
            f"{name} returned points outside [{bounds[0]:g}, {bounds[1]:g}] (found [{lo:.6g}, {hi:.6g}]): "
            f"the attack is broken, its numbers cannot be used"
        )


# --------------------------------------------------------------------------------------------
# The runner: every attack through the same contract (cure_eval.attacks.base.Attack).
# --------------------------------------------------------------------------------------------
def cascade_update(robust_now: torch.Tensor, robust: torch.Tensor, attacked: torch.Tensor) -> torch.Tensor:
    """The cascade's rule, the only copy: a point stays robust unless this attack attacked it
    and fooled it. (For an attack that attacked exactly the still-robust points this is its
    ``robust``; the PGD family's later step counts attack only the points not yet fooled.)"""
    return robust_now & (robust | ~attacked)


def _result(
    ctx: AttackContext,
    name: str,
    norm: Norm,
    x: torch.Tensor,
    y: torch.Tensor,
    clean_pred: torch.Tensor,
    clean_margin: torch.Tensor,
    attacked: torch.Tensor,
    x_adv_attacked: torch.Tensor,
    seconds: float,
    extra: dict[str, torch.Tensor] | None = None,
    x_best_attacked: torch.Tensor | None = None,
) -> AttackResult:
    """Check the returned points and measure everything at them (model in eval mode); the same
    for the run's best points, if given (extra ``best_fooled``: 1 fooled at the returned or the
    best point, 0 not, NaN not attacked)."""
    eps = ctx.radius(norm)
    idx = attacked.nonzero().flatten()
    x_adv = x.clone()
    x_adv[idx] = x_adv_attacked.detach().to(x_adv.dtype).cpu()
    check_adversarial(x, x_adv, eps=eps, norm=norm, name=name)
    adv_pred = clean_pred.clone()
    margin = clean_margin.clone()
    if len(idx):
        logits = ctx.logits(x_adv[idx])
        adv_pred[idx] = logits.argmax(dim=1)
        margin[idx] = adversarial_margin(logits, y[idx]).to(margin.dtype)
    success = attacked & (adv_pred != y)
    robust = attacked & (adv_pred == y)
    extra = dict(extra or {})
    if x_best_attacked is not None:
        extra["best_fooled"] = _best_fooled(ctx, name, norm, x, y, idx, x_adv, x_best_attacked, success)
    linf, l2 = perturbation_norms(x, x_adv)
    res = AttackResult(
        name=name, eps=eps, x_adv=x_adv, adv_pred=adv_pred, success=success, robust=robust,
        margin=margin, linf=linf.float(), l2=l2.float(), attacked=attacked.clone(),
        seconds=seconds, extra=extra,
    )
    log.info("%s: robust accuracy %.4f (%d attacked, %.2fs)", name, res.robust_accuracy,
             len(idx), seconds)
    return res


def _best_fooled(ctx: AttackContext, name: str, norm: Norm, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                 x_adv: torch.Tensor, x_best_attacked: torch.Tensor, success: torch.Tensor) -> torch.Tensor:
    """1 where the returned point or the run's best point fools the model, 0 where neither does,
    NaN where not attacked. The best points are checked against the ε-ball and [0, 1] and the
    model is evaluated there (only where they differ from the returned point)."""
    x_best = x_adv.clone()
    x_best[idx] = x_best_attacked.detach().to(x_best.dtype).cpu()
    check_adversarial(x, x_best, eps=ctx.radius(norm), norm=norm, name=f"{name} (best iterate)")
    fooled = success.clone()
    other = idx[(x_best[idx] != x_adv[idx]).flatten(1).any(dim=1)] if len(idx) else idx
    if len(other):
        fooled[other] |= ctx.logits(x_best[other]).argmax(dim=1) != y[other]
    out = torch.full((len(x),), math.nan)
    out[idx] = fooled[idx].float()
    return out


def _warn_short_pgd(steps: Sequence[int], eps: float, alpha: float) -> None:
    short = [k for k in steps if k * alpha < eps]
    if short:
        log.warning(
            "PGD(%s) with step %.4g cannot travel the ε = %.4g radius (steps × alpha < eps): those "
            "numbers overstate robustness; use a larger pgd_alpha (e.g. 2.5·eps/steps)",
            ",".join(map(str, short)), alpha, eps)


def _split(attacks: Sequence[str] | str) -> list[str]:
    if isinstance(attacks, str):
        return [a for a in attacks.replace(",", " ").split() if a]
    return list(attacks)


def _instances(order: Sequence[str], configs: Mapping[str, AttackConfig], defaults: Sequence[AttackConfig],
               ) -> dict[str, Attack[Any]]:
    """One attack object per name: its config from ``configs[name]``, else the default config of
    its config class (the suite's keyword settings), else the class's own defaults."""
    by_type = {type(c): c for c in defaults}
    out: dict[str, Attack[Any]] = {}
    for name in order:
        cls = get_attack(name)
        out[name] = cls(configs.get(name, by_type.get(cls.Config)))
    return out


def _groups(order: Sequence[str], instances: Mapping[str, Attack[Any]]) -> list[list[Attack[Any]]]:
    """Run groups in order: an attack alone, or every requested member of its family at the
    place of the first one."""
    groups: list[list[Attack[Any]]] = []
    done: set[str] = set()
    for name in order:
        if name in done:
            continue
        family = instances[name].family
        group = [instances[a] for a in order if a == name or (family is not None and instances[a].family == family)]
        done.update(a.name for a in group)
        groups.append(group)
    return groups


def _check_inputs(x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int) -> None:
    if not torch.is_floating_point(x) or x.ndim < 2:
        raise UsageError(f"x must be a float batch (N, ...), got {x.dtype} {tuple(x.shape)}")
    if len(x) == 0:
        raise UsageError("no points to evaluate: x is empty")
    if y.ndim != 1 or len(y) != len(x) or torch.is_floating_point(y):
        raise UsageError(f"y must be integer labels of shape ({len(x)},), got {y.dtype} {tuple(y.shape)}")
    if len(x) and (not torch.isfinite(x).all() or float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise CureEvalError("images must be finite and lie in [0, 1]: divide by 255 and move normalisation into the model")
    if not 0.0 < eps <= 1.0:
        raise UsageError(f"eps must be in (0, 1] ([0, 1] pixel units; 8/255 ≈ 0.0314), got {eps}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")


def run_suite(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    device: torch.device | str,
    attacks: Sequence[str] | str = ATTACKS,
    batch_size: int = 256,
    seed: int = 0,
    cascade: bool = False,
    eps_l2: float | None = None,
    pgd_alpha: float = 2 / 255,
    spsa_iterations: int = 100,
    spsa_samples: int = 128,
    spsa_max_batch: int = 1024,
    deepfool_steps: int = 50,
    deepfool_candidates: int = 10,
    deepfool_overshoot: float = 0.02,
    indices: torch.Tensor | Sequence[int] | None = None,
    progress: bool = True,
    configs: Mapping[str, AttackConfig] | None = None,
) -> SuiteResult:
    """Run the attack suite on ``(x, y)`` and return per-point results.

    Args:
        model: classifier mapping [0, 1] images to logits, already on ``device`` (never moved);
            evaluated in eval mode; its train/eval modes are restored afterwards, also on error.
        x: images ``(N, C, H, W)`` in [0, 1] (any device; results are on the CPU).
        y: integer labels ``(N,)``.
        eps: ℓ∞ radius in [0, 1] pixel units (e.g. 8/255).
        device: where the model runs (``"cpu"``, ``"cuda:0"``...). Required, never guessed.
        attacks: registered attack names (:func:`~cure_eval.attacks.registry.list_attacks`; a list
            or a comma/space separated string; ``clean`` adds nothing). Default: the built-ins,
            :data:`ATTACKS`. They run in report order, or cheap → expensive for a cascade.
        batch_size: points per attack call and per evaluation batch. Default 256.
        seed: seed of PGD's random starts and SPSA's random streams. Default 0.
        cascade: compute only the worst case, AutoAttack style (see module docs). Default False.
        eps_l2: ℓ2 radius of the ℓ2 attacks (``deepfool_l2``). Default ``eps`` (see module docs).
        pgd_alpha: PGD step size (the default :class:`~cure_eval.attacks.pgd.PGDConfig`). Default 2/255.
        spsa_iterations: SPSA Adam steps. Default 100.
        spsa_samples: SPSA loss evaluations per point and iteration. Default 128.
        spsa_max_batch: most inputs per SPSA model call. Default 1024.
        deepfool_steps, deepfool_candidates, deepfool_overshoot: foolbox DeepFool settings.
            Defaults 50, 10, 0.02 (foolbox's).
        indices: dataset index of each point (row labels and SPSA's per-point seeds). Default
            ``0..N-1``.
        progress: show a tqdm bar per attack. Default True.
        configs: per attack name, its config object (overrides the keyword settings above; a
            plugin attack without one uses its ``Config()`` defaults).
    """
    start = time.perf_counter()
    order = attack_order(_split(attacks), cascade=cascade)  # unknown names list the valid ones
    _check_inputs(x, y, eps, batch_size)
    eps_l2_ = float(eps if eps_l2 is None else eps_l2)
    if eps_l2_ <= 0:
        raise UsageError(f"eps_l2 must be positive, got {eps_l2}")
    if spsa_iterations < 0:
        raise UsageError(f"spsa_iterations must be >= 0, got {spsa_iterations}")
    defaults = (PGDConfig(alpha=pgd_alpha), DeepFoolConfig(steps=deepfool_steps, candidates=deepfool_candidates,
                                                           overshoot=deepfool_overshoot),
                SPSAConfig(iterations=spsa_iterations, samples=spsa_samples, max_batch=spsa_max_batch))
    instances = _instances(order, configs or {}, defaults)
    l2_in_worst = eps_l2_ <= eps + 1e-12
    l2_names = [a for a in order if instances[a].norm == "l2"]
    if cascade and l2_names and not l2_in_worst:
        raise UsageError(
            f"a cascade computes the ℓ∞ worst case, but eps_l2 = {eps_l2_:.4g} > eps = {eps:.4g} "
            f"is a different threat model: drop {', '.join(l2_names)} or use eps_l2 <= eps"
        )
    pgds = [a for a in instances.values() if isinstance(a, PGD)]
    if pgds:
        _warn_short_pgd([a.steps for a in pgds], eps, pgds[0].config.alpha)
    dev = torch.device(device)
    n = len(x)
    ids = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if len(ids) != n:
        raise UsageError(f"got {len(ids)} indices for {n} points")
    x = x.detach().cpu()
    y = y.detach().cpu().long()

    ctx = AttackContext(model=model, device=dev, batch_size=batch_size, progress=progress, eps=float(eps),
                        eps_l2=eps_l2_, seed=seed)
    check_device(model, dev)
    with eval_mode(model):
        with torch.enable_grad():  # the gradient attacks need autograd even under no_grad
            logits = ctx.logits(x)
            clean_pred = logits.argmax(dim=1) if n else torch.zeros(0, dtype=torch.long)
            clean_margin = adversarial_margin(logits, y) if n else torch.zeros(0)
            correct = clean_pred == y
            results: dict[str, AttackResult] = {}
            family_seconds: dict[str, float] = {}  # one run serves a whole family (PGD)
            robust_now = correct.clone()  # cascade: points still robust
            for group in _groups(order, instances):
                target = robust_now if cascade else correct
                idx = target.nonzero().flatten()
                lead = group[0]
                if lead.family is not None:
                    outputs = type(lead).run_family(ctx, group, x[idx], y[idx], ids[idx], cascade=cascade)
                    family_seconds[lead.family] = max((o.seconds for o in outputs.values()), default=0.0)
                else:
                    outputs = {lead.name: lead.run(ctx, x[idx], y[idx], ids[idx])}
                for attack in group:
                    o = outputs[attack.name]
                    mine = idx if o.attacked is None else idx[o.attacked]
                    att = torch.zeros(n, dtype=torch.bool)
                    att[mine] = True
                    results[attack.name] = _result(ctx, attack.name, attack.norm, x, y, clean_pred, clean_margin,
                                                   att, o.x_adv, o.seconds, attack.per_sample(o.extra, mine, n, correct),
                                                   o.x_best)
                    if cascade:
                        res = results[attack.name]
                        robust_now = cascade_update(robust_now, res.worst_case_robust, res.attacked)
            in_worst = [a for a in results if instances[a].norm == "linf" or l2_in_worst]
            left_out = [a for a in results if a not in in_worst]
            if left_out:
                log.warning("%s at eps_l2=%.4g > eps=%.4g is a different threat model: it is "
                            "left out of the ℓ∞ worst case", ", ".join(left_out), eps_l2_, eps)
            worst = correct.clone()
            for a in in_worst:
                worst &= results[a].worst_case_robust
            if cascade:
                worst = robust_now & worst
    settings = {"batch_size": batch_size, "pgd_alpha": pgd_alpha, "spsa_iterations": spsa_iterations,
                "spsa_samples": spsa_samples, "deepfool_steps": deepfool_steps,
                "deepfool_candidates": deepfool_candidates, "deepfool_overshoot": deepfool_overshoot,
                "order": order, "pgd_family_seconds": family_seconds.get("pgd", 0.0)}
    return SuiteResult(
        eps=float(eps), eps_l2=eps_l2_, seed=seed, indices=ids, labels=y, clean_pred=clean_pred,
        clean_margin=clean_margin, attacks=results, worst_case=worst, worst_case_attacks=in_worst,
        cascade=cascade, settings=settings, seconds=time.perf_counter() - start,
    )


def run_attack(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    device: torch.device | str,
    batch_size: int = 256,
    seed: int = 0,
    **kwargs: Any,
) -> AttackResult:
    """Run one registered attack (clean-correct points only) and return its result.

    ``kwargs`` are passed on to :func:`run_suite` (``eps_l2``, ``pgd_alpha``,
    ``spsa_iterations``, ``indices``, ``progress``, ``configs``...).
    """
    get_attack(name)  # an unknown name lists the valid ones
    result = run_suite(model, x, y, eps=eps, device=device, attacks=[name], batch_size=batch_size,
                       seed=seed, **kwargs)
    return result.attacks[name]


def eps_sweep(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_list: Sequence[float],
    *,
    device: torch.device | str,
    steps: int = 20,
    alpha: float = 2 / 255,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> EpsSweepResult:
    """PGD(``steps``) robust accuracy at every ε of ``eps_list`` (the robust-accuracy curve).

    Each ε is a separate PGD run on the clean-correct points from ``torch.manual_seed(seed)``,
    step size ``alpha`` (default 2/255). ``monotone`` is False (and a warning is logged) if the
    accuracy rises with ε anywhere: a warning sign of gradient masking (Athalye et al. 2018).
    """
    if not eps_list:
        raise UsageError("eps_sweep needs at least one eps")
    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    _check_inputs(x, y, float(eps_list[0]), batch_size)
    bad = [e for e in eps_list if not 0.0 < e <= 1.0]
    if bad:
        raise UsageError(f"every eps must be in (0, 1] ([0, 1] pixel units), got {bad}")
    for e in eps_list:
        _warn_short_pgd([steps], e, alpha)
    dev = torch.device(device)
    x = x.detach().cpu()
    y = y.detach().cpu().long()
    n = len(x)
    ctx = AttackContext(model=model, device=dev, batch_size=batch_size, progress=progress, eps=0.0,
                        eps_l2=0.0, seed=seed)
    accs: list[float] = []
    robust: list[torch.Tensor] = []
    check_device(model, dev)
    require_input_gradients(model, x[:2].to(dev))
    with eval_mode(model):
        logits = ctx.logits(x)
        clean_pred = logits.argmax(dim=1)
        clean_margin = adversarial_margin(logits, y)
        correct = clean_pred == y
        idx = correct.nonzero().flatten()
        for e in eps_list:
            ctx.eps = float(e)
            with torch.enable_grad():
                run = run_pgd_steps(ctx, x[idx], y[idx], [steps], alpha=alpha, stop_on_success=False)
            res = _result(ctx, f"pgd{steps}", "linf", x, y, clean_pred, clean_margin, correct, run.adv[steps],
                          run.seconds[steps])
            accs.append(_fraction(res.robust))
            robust.append(res.robust)
    order = sorted(range(len(eps_list)), key=lambda i: eps_list[i])
    monotone = all(accs[order[i + 1]] <= accs[order[i]] for i in range(len(order) - 1))
    if not monotone:
        log.warning("robust accuracy rises with eps somewhere in %s: a sign of gradient masking", accs)
    return EpsSweepResult(eps=[float(e) for e in eps_list], robust_accuracy=accs,
                          clean_accuracy=float(correct.double().mean()) if n else float("nan"),
                          steps=steps, alpha=alpha, seed=seed, robust=robust, monotone=monotone)
