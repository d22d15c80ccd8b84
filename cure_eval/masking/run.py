"""The whole masking check: run (or reuse) the attacks, every check, the report."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attacks import AttackResult, SuiteResult, eps_sweep, get_attack, run_suite
from ..attacks.base import require_input_gradients
from ..attacks.square import SquareConfig
from ..attacks.trajectory import pgd_trajectory
from ..core.modes import check_device, preserved_mode
from ..data import select_points
from ..errors import UsageError
from .findings import (
    EPS_SWEEP_FACTORS,
    EPS_SWEEP_STEPS,
    GRADIENT_FREE_ATTACKS,
    NEEDED_ATTACKS,
    NOISE_DRAWS,
    SPSA_TOLERANCE,
    SQUARE_QUERIES,
    UNBOUNDED_STEPS,
    Finding,
    Verdict,
    gradient_free_points,
)
from .probes import (
    check_gradients,
    check_probability_outputs,
    check_randomised_forward,
    random_noise_fooled,
)
from .report import MaskingReport
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

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The whole check.
# --------------------------------------------------------------------------------------------
def _reusable(suite: SuiteResult | None, x: torch.Tensor, y: torch.Tensor, eps: float) -> list[str]:
    """Attacks of ``suite`` that can be reused for these points, or [] (with the reason logged)."""
    if suite is None:
        return []
    if suite.cascade:
        log.info("masking check: the suite is a cascade (per-attack results cover only the points "
                 "earlier attacks left): running its own attacks")
        return []
    if suite.n != len(x) or not torch.equal(suite.labels.cpu(), y.cpu().long()):
        log.warning("masking check: the given suite was run on other points: running its own attacks")
        return []
    if abs(suite.eps - eps) > 1e-12:
        log.warning("masking check: the given suite used ε = %g, not %g: running its own attacks",
                    suite.eps, eps)
        return []
    return [a for a in NEEDED_ATTACKS if a in suite.attacks]


def run_masking_check(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    device: torch.device | str,
    n: int | None = None,
    spsa_n: int | str = "auto",
    seed: int = 0,
    pgd_alpha: float = 2 / 255,
    spsa_iterations: int = 100,
    batch_size: int = 256,
    suite: SuiteResult | None = None,
    progress: bool = True,
    tolerance: float = SPSA_TOLERANCE,
) -> MaskingReport:
    """Run every gradient-masking check on ``(x, y)`` and return the report with its verdict.

    Args:
        model: classifier mapping [0, 1] images to logits, already on ``device`` (never moved), run in eval
            mode; its (and every submodule's) train/eval mode is restored afterwards, also on
            error.
        x: images ``(N, C, H, W)`` in [0, 1]; y: integer labels ``(N,)``.
        eps: ℓ∞ radius in [0, 1] pixel units.
        device: where the model runs (``"cpu"``, ``"cuda:0"``...). Required, never guessed.
        n: check only a seeded subset of ``n`` points (:func:`cure_eval.data.select_points`).
            Default: all.
        spsa_n: how many of the checked points the gradient-free attacks (SPSA, Square) attack, a
            seeded subset (:func:`~.findings.gradient_free_points`): a number, ``"all"``, or
            ``"auto"`` (default: one in 16, at least 10). SPSA's streams are seeded per point index,
            so a point's SPSA result does not depend on the subset.
        seed: seed of the attacks' random starts, SPSA's streams, the subsets and the noise. Default 0.
        pgd_alpha: PGD step size (FGSM, PGD(40/100), the trajectory). Default 2/255.
        spsa_iterations: SPSA Adam steps (128 samples each, early stop). Default 100, the CURE
            paper's setting; fewer make SPSA weaker, which can only hide masking.
        batch_size: points per attack call. Default 256.
        suite: a non-cascade :class:`~cure_eval.attacks.SuiteResult` on the same points and ε:
            its ``fgsm``, ``pgd40``, ``pgd100`` and ``spsa`` results are reused and only the
            missing ones are run (SPSA with the suite's point indices).
        progress: tqdm bars. Default True.
        tolerance: SPSA is "stronger" on a point when its adversarial loss is below PGD(100)'s
            by more than ``tolerance`` × the point's clean margin. Default
            :data:`SPSA_TOLERANCE`.

    What runs beyond the suite attacks (all on the clean-correct points): Square
    (:data:`~cure_eval.masking.findings.SQUARE_QUERIES` queries, 1000) on the gradient-free
    subset, an ε sweep (PGD(20) at :data:`EPS_SWEEP_FACTORS` × ε via
    :func:`~cure_eval.attacks.eps_sweep`), PGD(100) at ε = 1 from the clean input (early stop),
    100 noise draws per point, a PGD(100) trajectory of the points PGD(100) did not fool, input
    gradients and 5 + 1 forward passes.
    """
    start = time.perf_counter()
    dev = torch.device(device)
    _check_args(x, y, eps=eps, spsa_iterations=spsa_iterations, tolerance=tolerance)
    x = x.detach().cpu()
    y = y.detach().cpu().long()
    reuse = _reusable(suite, x, y, eps)
    points = select_points(len(x), n, seed)
    x, y = x[points], y[points]
    indices = (suite.indices[points] if suite is not None and reuse else points)
    # positions (in the checked points) of the gradient-free attacks' subset
    sub = select_points(len(x), gradient_free_points(len(x), spsa_n), seed)

    check_device(model, dev)
    require_input_gradients(model, x[:2].to(dev))  # PGD, FGSM and the gradient checks need them
    with preserved_mode(model):
        results, clean_margin, ran = _attack_results(
            model, x, y, suite, reuse, points, indices, sub, eps=eps, device=dev, seed=seed, pgd_alpha=pgd_alpha,
            spsa_iterations=spsa_iterations, batch_size=batch_size, progress=progress)
        # Points every gradient attack attacked (= clean-correct; a randomised model may disagree
        # with itself); the gradient-free ones attacked those of them in ``sub``.
        attacked = torch.ones(len(x), dtype=torch.bool)
        for a in NEEDED_ATTACKS:
            if a not in GRADIENT_FREE_ATTACKS:
                attacked &= results[a].attacked
        run = MaskingRun(model=model, x=x, y=y, eps=eps, device=dev, seed=seed, pgd_alpha=pgd_alpha,
                         batch_size=batch_size, progress=progress, tolerance=tolerance, results=results,
                         clean_margin=clean_margin, attacked=attacked, sub=sub)
        findings = [check(run) for _, check in MASKING_CHECKS]
        if suite is not None and reuse:
            findings.extend(_autoattack_findings(suite, points, attacked))

    verdict: Verdict = "suspect" if any(f.status == "FAIL" for f in findings) else "pass"
    settings = {"pgd_alpha": pgd_alpha, "spsa_iterations": spsa_iterations, "seed": seed,
                "batch_size": batch_size, "reused_from_suite": reuse, "ran": ran,
                "gradient_free_points": len(sub), "gradient_free_indices": indices[sub].tolist(),
                "square_queries": SQUARE_QUERIES,
                "eps_sweep": run.eps_list, "noise_draws": NOISE_DRAWS,
                "unbounded_steps": UNBOUNDED_STEPS, "indices": indices.tolist()}
    nan = torch.full((len(x),), math.nan)
    report = MaskingReport(
        verdict=verdict, findings=findings, eps=float(eps), n=len(x),
        clean_accuracy=float(attacked.double().mean()), clean_correct=attacked,
        clean_margin=clean_margin.float(), pgd_margin=torch.where(attacked, results["pgd100"].margin.float(), nan),
        spsa_margin=_spread(results["spsa"], sub, len(x)), square_margin=_spread(results["square"], sub, len(x)),
        tolerance=tolerance, settings=settings, seconds=time.perf_counter() - start,
    )
    log.info("masking check: %s (%s) in %.1fs", verdict,
             ", ".join(f"{f.name}={f.status}" for f in findings), report.seconds)
    return report


def _spread(res: AttackResult, sub: torch.Tensor, n: int) -> torch.Tensor:
    """A subset attack's adversarial losses at their places among ``n`` points (NaN elsewhere and
    where it did not attack)."""
    out = torch.full((n,), math.nan)
    out[sub] = torch.where(res.attacked, res.margin.float(), torch.tensor(math.nan))
    return out


def _check_args(x: torch.Tensor, y: torch.Tensor, *, eps: float, spsa_iterations: int, tolerance: float) -> None:
    if not torch.is_floating_point(x) or x.ndim < 2 or len(x) == 0:
        raise UsageError(f"x must be a non-empty float batch (N, ...), got {x.dtype} {tuple(x.shape)}")
    if y.ndim != 1 or len(y) != len(x):
        raise UsageError(f"y must be labels of shape ({len(x)},), got {tuple(y.shape)}")
    if not 0.0 < eps <= 1.0:
        raise UsageError(f"eps must be in (0, 1] ([0, 1] pixel units), got {eps}")
    if spsa_iterations < 1:
        raise UsageError(f"the masking check needs SPSA: spsa_iterations must be >= 1, got {spsa_iterations}")
    if tolerance < 0:
        raise UsageError(f"tolerance must be >= 0, got {tolerance}")


def _attack_results(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, suite: SuiteResult | None, reuse: list[str],
    points: torch.Tensor, indices: torch.Tensor, sub: torch.Tensor, *, eps: float, device: torch.device,
    seed: int, pgd_alpha: float, spsa_iterations: int, batch_size: int, progress: bool,
) -> tuple[dict[str, AttackResult], torch.Tensor, list[str]]:
    """The attacks' results, reused from ``suite`` or run: FGSM and PGD(40/100) on all checked
    points, SPSA and Square on the subset ``sub`` (their results have ``len(sub)`` rows); the
    clean margins; the attacks that ran."""
    results: dict[str, AttackResult] = {}
    clean_margin = torch.zeros(0)
    if reuse:
        assert suite is not None
        log.info("masking check: reusing %s from the given suite", ", ".join(reuse))
        for a in reuse:
            res = _subset(suite.attacks[a], points)
            results[a] = _subset(res, sub) if a in GRADIENT_FREE_ATTACKS else res
        clean_margin = suite.clean_margin[points]
    full = [a for a in NEEDED_ATTACKS if a not in reuse and a not in GRADIENT_FREE_ATTACKS]
    # Square is never reused: AutoAttack's Square draws its random squares per batch, so a
    # suite's Square on other batches would not be this subset's
    free = [a for a in (*NEEDED_ATTACKS, "square") if a in GRADIENT_FREE_ATTACKS and a not in results]
    common: dict[str, Any] = {"eps": eps, "device": device, "batch_size": batch_size, "seed": seed,
                              "pgd_alpha": pgd_alpha, "spsa_iterations": spsa_iterations, "progress": progress}
    if full:
        log.info("masking check: running %s on %d points", ", ".join(full), len(x))
        own = run_suite(model, x, y, attacks=full, indices=indices, **common)
        results.update(own.attacks)
        if not reuse:
            clean_margin = own.clean_margin
    if free:
        log.info("masking check: running %s on %d of the %d points", ", ".join(free), len(sub), len(x))
        own = run_suite(model, x[sub], y[sub], attacks=free, indices=indices[sub],
                        configs={"square": SquareConfig(queries=SQUARE_QUERIES)}, **common)
        results.update(own.attacks)
    return results, clean_margin, full + free


# --------------------------------------------------------------------------------------------
# The checks, as a table: each reads the run and returns its finding.
# --------------------------------------------------------------------------------------------
@dataclass
class MaskingRun:
    """What every check may read: the model, the checked points, the attacks' results on them."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    eps: float
    device: torch.device
    seed: int
    pgd_alpha: float
    batch_size: int
    progress: bool
    tolerance: float
    results: dict[str, AttackResult]
    clean_margin: torch.Tensor
    attacked: torch.Tensor
    #: positions of the gradient-free attacks' points (their results have one row per position)
    sub: torch.Tensor

    @property
    def idx(self) -> torch.Tensor:
        return self.attacked.nonzero().flatten()

    @property
    def pgd_fooled(self) -> torch.Tensor:
        return self.results["pgd100"].success

    @property
    def eps_list(self) -> list[float]:
        """The ε sweep's radii: :data:`EPS_SWEEP_FACTORS` × ε, at most 1."""
        return sorted({min(1.0, f * self.eps) for f in EPS_SWEEP_FACTORS})


def _spsa_vs_pgd(r: MaskingRun) -> Finding:
    spsa = r.results["spsa"]
    return check_spsa_vs_pgd(pgd_margin=r.results["pgd100"].margin[r.sub].float(), spsa_margin=spsa.margin.float(),
                             clean_margin=r.clean_margin[r.sub].float(), attacked=r.attacked[r.sub] & spsa.attacked,
                             tolerance=r.tolerance)


def _square_vs_pgd(r: MaskingRun) -> Finding:
    sq = r.results["square"]
    return check_square_vs_pgd(pgd_margin=r.results["pgd100"].margin[r.sub].float(), square_margin=sq.margin.float(),
                               clean_margin=r.clean_margin[r.sub].float(), attacked=r.attacked[r.sub] & sq.attacked,
                               tolerance=r.tolerance)


def _fgsm_vs_pgd(r: MaskingRun) -> Finding:
    return check_fgsm_vs_pgd(fgsm_fooled=r.results["fgsm"].success, pgd_fooled=r.pgd_fooled, attacked=r.attacked)


def _eps_monotone(r: MaskingRun) -> Finding:
    """ε sweep: PGD(20) with a step that can cross each radius."""
    accs: list[float] = []
    for e in r.eps_list:
        sw = eps_sweep(r.model, r.x, r.y, [e], device=r.device, steps=EPS_SWEEP_STEPS,
                       alpha=max(r.pgd_alpha, 2.5 * e / EPS_SWEEP_STEPS), batch_size=r.batch_size,
                       seed=r.seed, progress=r.progress)
        accs.append(sw.robust_accuracy[0])
    return check_eps_monotone(eps=r.eps_list, robust_accuracy=accs, n=len(r.x))


def _unbounded(r: MaskingRun) -> Finding:
    unb = pgd_trajectory(r.model, r.x[r.idx], r.y[r.idx], eps=1.0, alpha=max(r.pgd_alpha, 2.5 / UNBOUNDED_STEPS),
                         steps=UNBOUNDED_STEPS, device=r.device, seed=r.seed, random_start=False,
                         early_stop=True, batch_size=r.batch_size, progress=r.progress)
    robust = torch.zeros(len(r.x), dtype=torch.bool)
    robust[r.idx] = ~unb.fooled.any(dim=1)
    return check_unbounded(robust=robust, attacked=r.attacked)


def _random_noise(r: MaskingRun) -> Finding:
    noise = torch.zeros(len(r.x), dtype=torch.bool)
    noise[r.idx] = random_noise_fooled(r.model, r.x[r.idx], r.y[r.idx], eps=r.eps, device=r.device, seed=r.seed,
                                       batch_size=r.batch_size)
    return check_random_noise(noise_fooled=noise, pgd_fooled=r.pgd_fooled, attacked=r.attacked)


def _gradients(r: MaskingRun) -> Finding:
    return check_gradients(r.model, r.x[r.idx], r.y[r.idx], device=r.device, eps=r.eps, seed=r.seed,
                           batch_size=r.batch_size)


def _randomised_forward(r: MaskingRun) -> Finding:
    return check_randomised_forward(r.model, r.x, device=r.device, batch_size=r.batch_size)


def _probability_outputs(r: MaskingRun) -> Finding:
    return check_probability_outputs(r.model, r.x, device=r.device, batch_size=r.batch_size)


def _convergence(r: MaskingRun) -> Finding:
    """A fresh PGD(100) trajectory of the points PGD(100) did not fool: still improving?"""
    surv = (r.attacked & ~r.pgd_fooled).nonzero().flatten()
    improving = torch.zeros(len(r.x), dtype=torch.bool)
    restart_fooled = 0
    if len(surv):
        tr = pgd_trajectory(r.model, r.x[surv], r.y[surv], eps=r.eps, alpha=r.pgd_alpha, steps=100,
                            device=r.device, seed=r.seed + 1, batch_size=r.batch_size, progress=r.progress)
        survived = ~tr.fooled.any(dim=1)
        improving[surv] = still_improving(tr.loss) & survived
        restart_fooled = int((~survived).sum())
    conv = check_pgd_convergence(pgd40_fooled=r.results["pgd40"].success, pgd100_fooled=r.pgd_fooled,
                                 improving=improving, attacked=r.attacked)
    conv.details["restart_fooled"] = restart_fooled
    conv.details["restart_points"] = len(surv)
    return conv


#: The checks, in report order (the AutoAttack comparison follows when the suite ran AutoAttack).
MASKING_CHECKS: tuple[tuple[str, Callable[[MaskingRun], Finding]], ...] = (
    ("spsa_vs_pgd", _spsa_vs_pgd),
    ("square_vs_pgd", _square_vs_pgd),
    ("fgsm_vs_pgd", _fgsm_vs_pgd),
    ("eps_monotone", _eps_monotone),
    ("unbounded", _unbounded),
    ("random_noise", _random_noise),
    ("gradients", _gradients),
    ("randomised_forward", _randomised_forward),
    ("probability_outputs", _probability_outputs),
    ("convergence", _convergence),
)


def _autoattack_findings(suite: SuiteResult, points: torch.Tensor, attacked: torch.Tensor) -> list[Finding]:
    """``suite_vs_autoattack`` for every reference attack (AutoAttack) in the suite, on the
    checked points; none when the suite ran no AutoAttack or nothing beside it."""
    refs = [a for a in suite.attacks if get_attack(a).reference]
    own = [a for a in suite.worst_case_attacks if a not in refs]
    if not refs or not own:
        return []
    suite_robust = suite.clean_correct[points].clone()
    for a in own:
        suite_robust &= suite.attacks[a].worst_case_robust[points]
    return [check_suite_vs_autoattack(suite_robust=suite_robust, autoattack_robust=suite.attacks[r].robust[points],
                                      attacked=attacked, attack=r) for r in refs]


def _subset(res: AttackResult, points: torch.Tensor) -> AttackResult:
    """An :class:`~cure_eval.attacks.AttackResult` restricted to ``points``."""
    from dataclasses import replace

    extra = {k: v[points] for k, v in res.extra.items()}
    return replace(res, x_adv=res.x_adv[points], adv_pred=res.adv_pred[points],
                   success=res.success[points], robust=res.robust[points], margin=res.margin[points],
                   linf=res.linf[points], l2=res.l2[points], attacked=res.attacked[points], extra=extra)
