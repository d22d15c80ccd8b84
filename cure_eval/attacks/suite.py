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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import foolbox
import torch
import torchattacks
from torch import nn
from tqdm.auto import tqdm

from ..device import seeded_rng
from ..errors import CureEvalError, UsageError
from ..modes import check_device, eval_mode
from .base import AttackResult, adversarial_margin
from .pgd import MultiStepPGD
from .spsa import LinfSPSAAttack

log = logging.getLogger(__name__)

#: Every attack name the suite knows, in report order.
ATTACKS: tuple[str, ...] = (
    "fgsm", "pgd7", "pgd20", "pgd40", "pgd100", "deepfool_linf", "deepfool_l2", "spsa",
)
#: Names accepted by :func:`run_suite` (``clean`` adds nothing: clean accuracy is always there).
ATTACK_NAMES: tuple[str, ...] = ("clean", *ATTACKS)
#: Step count of each PGD attack.
PGD_STEPS: dict[str, int] = {"pgd7": 7, "pgd20": 20, "pgd40": 40, "pgd100": 100}
#: Order of a cascade: cheap → expensive.
CASCADE_ORDER: tuple[str, ...] = (
    "fgsm", "deepfool_linf", "deepfool_l2", "pgd7", "pgd20", "pgd40", "pgd100", "spsa",
)
#: Slack allowed when checking that adversarial points lie in the ε-ball and in [0, 1].
EPS_TOL = 1e-5
#: SPSA processes at most this many points at once (its per-point state is small; large groups
#: keep its model calls full while points finish early).
SPSA_POINTS_PER_CALL = 1024


def threat_norm(name: str) -> str:
    """``"l2"`` for deepfool_l2, ``"linf"`` for every other attack."""
    return "l2" if name == "deepfool_l2" else "linf"


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

    return {"torch": torch.__version__, "torchattacks": torchattacks.__version__,
            "foolbox": foolbox.__version__, "timm": timm.__version__}


def suite_summary(result: SuiteResult) -> dict[str, Any]:
    """A JSON-ready summary; accuracies are fractions in [0, 1], times in seconds.

    Keys: ``n``, ``eps``, ``eps_l2``, ``seed``, ``clean_accuracy``, ``attacks`` (per attack
    ``robust_accuracy``, ``seconds``, ``attacked`` and, for DeepFool, ``median_min_norm``; in a
    cascade ``robust_accuracy`` is ``None`` and ``cumulative_robust_accuracy`` is given instead),
    ``worst_case_accuracy``, ``worst_case_attacks``, ``cascade``, ``settings``, ``seconds`` and
    ``versions`` (torch, torchattacks, foolbox, timm). ``median_min_norm`` is the median minimal
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
            entry["cumulative_robust_accuracy"] = _fraction(res.robust)
        if "min_norm" in res.extra:
            # over the attacked points; inf (DeepFool found nothing) counts as large
            mn = res.extra["min_norm"][res.attacked]
            med = float(mn.median()) if len(mn) else math.nan
            entry["median_min_norm"] = med if math.isfinite(med) else None
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
    its own norm; ``None`` for other attacks and where DeepFool found nothing).
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
                     "adv_loss": margin[i], "linf": 0.0, "l2": 0.0, "min_norm": None})
    for name, res in result.attacks.items():
        cols = {k: getattr(res, k).tolist() for k in ("attacked", "adv_pred", "success", "robust",
                                                       "margin", "linf", "l2")}
        mn = res.extra["min_norm"].tolist() if "min_norm" in res.extra else None
        for i in range(result.n):
            m = None if mn is None or not math.isfinite(mn[i]) else mn[i]
            rows.append({"index": idx[i], "label": labels[i], "clean_pred": clean[i], "attack": name,
                         "attacked": cols["attacked"][i], "adv_pred": cols["adv_pred"][i],
                         "success": cols["success"][i], "robust": cols["robust"][i],
                         "adv_loss": cols["margin"][i], "linf": cols["linf"][i], "l2": cols["l2"][i],
                         "min_norm": m})
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
# The runner.
# --------------------------------------------------------------------------------------------
@dataclass
class _Ctx:
    model: nn.Module
    device: torch.device
    batch_size: int
    progress: bool
    eps: float
    eps_l2: float
    seed: int
    pgd_alpha: float
    spsa_iterations: int
    spsa_samples: int
    spsa_max_batch: int
    deepfool_steps: int
    deepfool_candidates: int
    deepfool_overshoot: float
    _fmodel: Any = None

    @property
    def fmodel(self) -> Any:
        if self._fmodel is None:
            self._fmodel = foolbox.PyTorchModel(self.model, bounds=(0, 1), device=self.device)
        return self._fmodel

    def batches(self, n: int) -> Iterator[slice]:
        for s in range(0, n, self.batch_size):
            yield slice(s, min(s + self.batch_size, n))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for sl in self.batches(len(x)):
                out.append(self.model(x[sl].to(self.device)).float().cpu())
        if not out:
            return torch.zeros(0, 0)
        return torch.cat(out)

    def bar(self, name: str, total: int, unit: str = "pt") -> Any:
        return tqdm(total=total, desc=name, unit=unit, disable=not self.progress, leave=False)


def _result(
    ctx: _Ctx,
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    clean_pred: torch.Tensor,
    clean_margin: torch.Tensor,
    attacked: torch.Tensor,
    x_adv_attacked: torch.Tensor,
    seconds: float,
    extra: dict[str, torch.Tensor] | None = None,
) -> AttackResult:
    """Check the returned points and measure everything at them (model in eval mode)."""
    eps = ctx.eps_l2 if threat_norm(name) == "l2" else ctx.eps
    idx = attacked.nonzero().flatten()
    x_adv = x.clone()
    x_adv[idx] = x_adv_attacked.detach().to(x_adv.dtype).cpu()
    check_adversarial(x, x_adv, eps=eps, norm=threat_norm(name), name=name)
    adv_pred = clean_pred.clone()
    margin = clean_margin.clone()
    if len(idx):
        logits = ctx.logits(x_adv[idx])
        adv_pred[idx] = logits.argmax(dim=1)
        margin[idx] = adversarial_margin(logits, y[idx]).to(margin.dtype)
    success = attacked & (adv_pred != y)
    robust = attacked & (adv_pred == y)
    linf, l2 = perturbation_norms(x, x_adv)
    res = AttackResult(
        name=name, eps=eps, x_adv=x_adv, adv_pred=adv_pred, success=success, robust=robust,
        margin=margin, linf=linf.float(), l2=l2.float(), attacked=attacked.clone(),
        seconds=seconds, extra=dict(extra or {}),
    )
    log.info("%s: robust accuracy %.4f (%d attacked, %.2fs)", name, res.robust_accuracy,
             len(idx), seconds)
    return res


def _scatter(n: int, idx: torch.Tensor, values: torch.Tensor, fill: float) -> torch.Tensor:
    out = torch.full((n,), fill, dtype=values.dtype if values.is_floating_point() else torch.float32)
    out[idx] = values.to(out.dtype).cpu()
    return out


def _run_fgsm(ctx: _Ctx, xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    attack = torchattacks.FGSM(ctx.model, eps=ctx.eps)
    out = []
    with ctx.bar("fgsm", len(xs)) as bar:
        for sl in ctx.batches(len(xs)):
            out.append(attack(xs[sl].to(ctx.device), ys[sl].to(ctx.device)).detach().cpu())
            bar.update(sl.stop - sl.start)
    return (torch.cat(out) if out else xs.clone()), time.perf_counter() - start


def _run_pgd(
    ctx: _Ctx, xs: torch.Tensor, ys: torch.Tensor, steps: Sequence[int], *, eps: float,
    stop_on_success: bool,
) -> tuple[dict[int, torch.Tensor], dict[int, float], torch.Tensor]:
    """One MultiStepPGD trajectory per batch: ``({k: x_adv}, {k: seconds}, stopped_at)``."""
    counts = sorted(set(steps))
    adv: dict[int, list[torch.Tensor]] = {k: [] for k in counts}
    secs: dict[int, float] = dict.fromkeys(counts, 0.0)
    stopped: list[torch.Tensor] = []
    attack = MultiStepPGD(ctx.model, eps=eps, alpha=ctx.pgd_alpha, steps=counts,
                          stop_on_success=stop_on_success)
    desc = "pgd" + "/".join(str(k) for k in counts)
    with seeded_rng(ctx.seed, ctx.device), ctx.bar(desc, len(xs)) as bar:
        for sl in ctx.batches(len(xs)):
            rec = attack(xs[sl].to(ctx.device), ys[sl].to(ctx.device))
            for k in counts:
                adv[k].append(rec[k].cpu())
                secs[k] += attack.checkpoint_seconds[k]
            assert attack.stopped_at is not None
            stopped.append(attack.stopped_at)
            bar.update(sl.stop - sl.start)
    if not stopped:
        return ({k: xs.clone() for k in counts}, secs, torch.zeros(0, dtype=torch.long))
    return {k: torch.cat(v) for k, v in adv.items()}, secs, torch.cat(stopped)


def _run_deepfool(
    ctx: _Ctx, name: str, xs: torch.Tensor, ys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(ε-projected minimal adversarial points, minimal perturbation norms, seconds)``."""
    start = time.perf_counter()
    cls = foolbox.attacks.L2DeepFoolAttack if name == "deepfool_l2" else foolbox.attacks.LinfDeepFoolAttack
    attack = cls(steps=ctx.deepfool_steps, candidates=ctx.deepfool_candidates,
                 overshoot=ctx.deepfool_overshoot)
    eps = ctx.eps_l2 if name == "deepfool_l2" else ctx.eps
    out, norms = [], []
    with ctx.bar(name, len(xs)) as bar:
        for sl in ctx.batches(len(xs)):
            xb, yb = xs[sl].to(ctx.device), ys[sl].to(ctx.device)
            raw, clipped, success = attack(ctx.fmodel, xb, yb, epsilons=[None, eps])
            dist = attack.distance(xb, raw[0]).detach()
            dist = torch.where(success[0], dist, torch.full_like(dist, math.inf))
            out.append(clipped[1].detach().cpu())
            norms.append(dist.cpu())
            bar.update(sl.stop - sl.start)
    if not out:
        return xs.clone(), torch.zeros(0), time.perf_counter() - start
    return torch.cat(out), torch.cat(norms), time.perf_counter() - start


def _run_spsa(
    ctx: _Ctx, xs: torch.Tensor, ys: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    start = time.perf_counter()
    chunks = range(0, len(xs), SPSA_POINTS_PER_CALL)
    out: list[torch.Tensor] = []
    margins: list[torch.Tensor] = []
    iters: list[torch.Tensor] = []
    with ctx.bar("spsa", len(chunks) * (ctx.spsa_iterations + 1), unit="it") as bar:
        def callback(_t: int, running: int) -> None:
            bar.update(1)
            bar.set_postfix(running=running, refresh=False)

        attack = LinfSPSAAttack(iterations=ctx.spsa_iterations, samples=ctx.spsa_samples,
                                max_batch=ctx.spsa_max_batch, seed=ctx.seed, callback=callback)
        for s in chunks:
            before = bar.n
            sl = slice(s, s + SPSA_POINTS_PER_CALL)
            _, clipped, _ = attack(ctx.fmodel, xs[sl].to(ctx.device), ys[sl].to(ctx.device),
                                   epsilons=[ctx.eps], point_ids=ids[sl].to(ctx.device))
            bar.update(before + ctx.spsa_iterations + 1 - bar.n)  # early finish: fill the bar
            assert attack.last_output is not None
            out.append(clipped[0].detach().cpu())
            margins.append(attack.last_output.best_margin.cpu())
            iters.append(attack.last_output.iterations.cpu())
    if not out:
        return xs.clone(), {"spsa_margin": torch.zeros(0), "iterations": torch.zeros(0)}, 0.0
    extra = {"spsa_margin": torch.cat(margins), "iterations": torch.cat(iters)}
    return torch.cat(out), extra, time.perf_counter() - start


def _warn_short_pgd(steps: Sequence[int], eps: float, alpha: float) -> None:
    short = [k for k in steps if k * alpha < eps]
    if short:
        log.warning(
            "PGD(%s) with step %.4g cannot travel the ε = %.4g radius (steps × alpha < eps): those "
            "numbers overstate robustness; use a larger pgd_alpha (e.g. 2.5·eps/steps)",
            ",".join(map(str, short)), alpha, eps)


def _normalise_attacks(attacks: Sequence[str] | str) -> list[str]:
    if isinstance(attacks, str):
        attacks = [a for a in attacks.replace(",", " ").split() if a]
    unknown = [a for a in attacks if a not in ATTACK_NAMES]
    if unknown:
        raise UsageError(f"unknown attack(s) {', '.join(map(repr, unknown))}: choose from {', '.join(ATTACK_NAMES)}")
    wanted = set(attacks)
    return [a for a in ATTACKS if a in wanted]


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
) -> SuiteResult:
    """Run the attack suite on ``(x, y)`` and return per-point results.

    Args:
        model: classifier mapping [0, 1] images to logits, already on ``device`` (never moved);
            evaluated in eval mode; its train/eval modes are restored afterwards, also on error.
        x: images ``(N, C, H, W)`` in [0, 1] (any device; results are on the CPU).
        y: integer labels ``(N,)``.
        eps: ℓ∞ radius in [0, 1] pixel units (e.g. 8/255).
        device: where the model runs (``"cpu"``, ``"cuda:0"``...). Required, never guessed.
        attacks: names from :data:`ATTACK_NAMES` (a list or a comma/space separated string).
            Default: all of :data:`ATTACKS`. They run in :data:`ATTACKS` order, or
            :data:`CASCADE_ORDER` for a cascade.
        batch_size: points per attack call and per evaluation batch. Default 256.
        seed: seed of PGD's random starts and SPSA's random streams. Default 0.
        cascade: compute only the worst case, AutoAttack style (see module docs). Default False.
        eps_l2: ℓ2 radius of ``deepfool_l2``. Default ``eps`` (see module docs).
        pgd_alpha: PGD step size. Default 2/255.
        spsa_iterations: SPSA Adam steps. Default 100.
        spsa_samples: SPSA loss evaluations per point and iteration. Default 128.
        spsa_max_batch: most inputs per SPSA model call. Default 1024.
        deepfool_steps, deepfool_candidates, deepfool_overshoot: foolbox DeepFool settings.
            Defaults 50, 10, 0.02 (foolbox's).
        indices: dataset index of each point (row labels and SPSA's per-point seeds). Default
            ``0..N-1``.
        progress: show a tqdm bar per attack. Default True.
    """
    start = time.perf_counter()
    names = _normalise_attacks(attacks)
    _check_inputs(x, y, eps, batch_size)
    eps_l2_ = float(eps if eps_l2 is None else eps_l2)
    if eps_l2_ <= 0:
        raise UsageError(f"eps_l2 must be positive, got {eps_l2}")
    l2_in_worst = eps_l2_ <= eps + 1e-12
    if cascade and "deepfool_l2" in names and not l2_in_worst:
        raise UsageError(
            f"a cascade computes the ℓ∞ worst case, but eps_l2 = {eps_l2_:.4g} > eps = {eps:.4g} "
            f"is a different threat model: drop deepfool_l2 or use eps_l2 <= eps"
        )
    if spsa_iterations < 0:
        raise UsageError(f"spsa_iterations must be >= 0, got {spsa_iterations}")
    _warn_short_pgd([PGD_STEPS[a] for a in names if a in PGD_STEPS], eps, pgd_alpha)
    dev = torch.device(device)
    n = len(x)
    ids = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if len(ids) != n:
        raise UsageError(f"got {len(ids)} indices for {n} points")
    x = x.detach().cpu()
    y = y.detach().cpu().long()

    ctx = _Ctx(model=model, device=dev, batch_size=batch_size, progress=progress, eps=float(eps),
               eps_l2=eps_l2_, seed=seed, pgd_alpha=pgd_alpha, spsa_iterations=spsa_iterations,
               spsa_samples=spsa_samples, spsa_max_batch=spsa_max_batch,
               deepfool_steps=deepfool_steps, deepfool_candidates=deepfool_candidates,
               deepfool_overshoot=deepfool_overshoot)
    check_device(model, dev)
    with eval_mode(model):
        with torch.enable_grad():  # the gradient attacks need autograd even under no_grad
            logits = ctx.logits(x)
            clean_pred = logits.argmax(dim=1) if n else torch.zeros(0, dtype=torch.long)
            clean_margin = adversarial_margin(logits, y) if n else torch.zeros(0)
            correct = clean_pred == y
            results: dict[str, AttackResult] = {}
            family_seconds = 0.0  # one MultiStepPGD trajectory serves every requested PGD
            robust_now = correct.clone()  # cascade: points still robust
            order = [a for a in (CASCADE_ORDER if cascade else ATTACKS) if a in names]
            pgd_names = [a for a in order if a in PGD_STEPS]
            for name in order:
                if name in results:
                    continue  # a PGD done as part of its family
                target = robust_now if cascade else correct
                idx = target.nonzero().flatten()
                xs, ys = x[idx], y[idx]
                if name == "fgsm":
                    adv, secs = _run_fgsm(ctx, xs, ys)
                    results[name] = _result(ctx, name, x, y, clean_pred, clean_margin, target, adv, secs)
                elif name in PGD_STEPS:
                    steps = [PGD_STEPS[a] for a in pgd_names]
                    recs, secs_k, stopped = _run_pgd(ctx, xs, ys, steps, eps=ctx.eps, stop_on_success=cascade)
                    family_seconds = max(secs_k.values(), default=0.0)
                    for a in pgd_names:
                        k = PGD_STEPS[a]
                        still = (stopped == 0) | (stopped >= k)  # not fooled at an earlier checkpoint
                        att = torch.zeros(n, dtype=torch.bool)
                        att[idx[still]] = True
                        results[a] = _result(ctx, a, x, y, clean_pred, clean_margin, att, recs[k][still], secs_k[k])
                        if cascade:  # fooled at its own checkpoint: no longer robust
                            robust_now = robust_now & (results[a].robust | ~att)
                    continue
                elif name in ("deepfool_linf", "deepfool_l2"):
                    adv, norms, secs = _run_deepfool(ctx, name, xs, ys)
                    min_norm = _scatter(n, idx, norms, math.nan)  # NaN: not attacked (cascade)
                    min_norm[~correct] = 0.0  # misclassified clean: nothing to perturb
                    results[name] = _result(ctx, name, x, y, clean_pred, clean_margin, target, adv, secs,
                                            {"min_norm": min_norm})
                elif name == "spsa":
                    adv, extra, secs = _run_spsa(ctx, xs, ys, ids[idx])
                    full = {"spsa_margin": _scatter(n, idx, extra["spsa_margin"], math.nan),
                            "iterations": _scatter(n, idx, extra["iterations"], 0.0).long()}
                    results[name] = _result(ctx, name, x, y, clean_pred, clean_margin, target, adv, secs, full)
                if cascade:
                    robust_now = results[name].robust
            in_worst = [a for a in results if a != "deepfool_l2" or l2_in_worst]
            if "deepfool_l2" in results and not l2_in_worst:
                log.warning("deepfool_l2 at eps_l2=%.4g > eps=%.4g is a different threat model: it is "
                            "left out of the ℓ∞ worst case", eps_l2_, eps)
            worst = correct.clone()
            for a in in_worst:
                worst &= results[a].robust
            if cascade:
                worst = robust_now & worst
    settings = {"batch_size": batch_size, "pgd_alpha": pgd_alpha, "spsa_iterations": spsa_iterations,
                "spsa_samples": spsa_samples, "deepfool_steps": deepfool_steps,
                "deepfool_candidates": deepfool_candidates, "deepfool_overshoot": deepfool_overshoot,
                "order": order, "pgd_family_seconds": family_seconds}
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
    """Run one attack of the suite (clean-correct points only) and return its result.

    ``kwargs`` are passed on to :func:`run_suite` (``eps_l2``, ``pgd_alpha``,
    ``spsa_iterations``, ``indices``, ``progress``...).
    """
    if name not in ATTACKS:
        raise UsageError(f"unknown attack {name!r}: choose from {', '.join(ATTACKS)}")
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
    ctx = _Ctx(model=model, device=dev, batch_size=batch_size, progress=progress, eps=0.0, eps_l2=0.0,
               seed=seed, pgd_alpha=alpha, spsa_iterations=0, spsa_samples=2, spsa_max_batch=1,
               deepfool_steps=0, deepfool_candidates=2, deepfool_overshoot=0.0)
    accs: list[float] = []
    robust: list[torch.Tensor] = []
    check_device(model, dev)
    with eval_mode(model):
        logits = ctx.logits(x)
        clean_pred = logits.argmax(dim=1)
        clean_margin = adversarial_margin(logits, y)
        correct = clean_pred == y
        idx = correct.nonzero().flatten()
        for e in eps_list:
            ctx.eps = float(e)
            with torch.enable_grad():
                recs, secs, _ = _run_pgd(ctx, x[idx], y[idx], [steps], eps=float(e), stop_on_success=False)
            res = _result(ctx, f"pgd{steps}", x, y, clean_pred, clean_margin, correct, recs[steps], secs[steps])
            accs.append(_fraction(res.robust))
            robust.append(res.robust)
    order = sorted(range(len(eps_list)), key=lambda i: eps_list[i])
    monotone = all(accs[order[i + 1]] <= accs[order[i]] for i in range(len(order) - 1))
    if not monotone:
        log.warning("robust accuracy rises with eps somewhere in %s: a sign of gradient masking", accs)
    return EpsSweepResult(eps=[float(e) for e in eps_list], robust_accuracy=accs,
                          clean_accuracy=float(correct.double().mean()) if n else float("nan"),
                          steps=steps, alpha=alpha, seed=seed, robust=robust, monotone=monotone)
