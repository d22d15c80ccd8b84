"""The whole masking check: run (or reuse) the attacks, every check, the report."""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from ..attacks import AttackResult, SuiteResult, eps_sweep, get_attack, run_suite
from ..attacks.base import require_input_gradients
from ..data import select_points
from ..errors import UsageError
from ..modes import check_device, preserved_mode
from .checks import (
    EPS_SWEEP_FACTORS,
    EPS_SWEEP_STEPS,
    NEEDED_ATTACKS,
    NOISE_DRAWS,
    SPSA_TOLERANCE,
    UNBOUNDED_STEPS,
    Finding,
    Verdict,
    check_eps_monotone,
    check_fgsm_vs_pgd,
    check_gradients,
    check_pgd_convergence,
    check_probability_outputs,
    check_random_noise,
    check_randomised_forward,
    check_spsa_vs_pgd,
    check_suite_vs_autoattack,
    check_unbounded,
    pgd_trajectory,
    random_noise_fooled,
    still_improving,
)
from .report import MaskingReport

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The whole check.
# --------------------------------------------------------------------------------------------
def _reusable(suite: SuiteResult | None, x: torch.Tensor, y: torch.Tensor, eps: float) -> list[str]:
    """Attacks of ``suite`` that can be reused for these points, or [] (with the reason logged)."""
    if suite is None:
        return []
    if suite.cascade:
        log.warning("masking check: the given suite is a cascade (per-attack results cover only the "
                    "points earlier attacks left): running its own attacks")
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
        seed: seed of the attacks' random starts, SPSA's streams and the noise. Default 0.
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

    What runs beyond the suite attacks (all on the clean-correct points): an ε sweep
    (PGD(20) at :data:`EPS_SWEEP_FACTORS` × ε via :func:`~cure_eval.attacks.eps_sweep`), PGD(100)
    at ε = 1 from the clean input (early stop), 100 noise draws per point, a PGD(100) trajectory
    of the points PGD(100) did not fool, input gradients and 5 + 1 forward passes.
    """
    start = time.perf_counter()
    dev = torch.device(device)
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
    x = x.detach().cpu()
    y = y.detach().cpu().long()
    reuse = _reusable(suite, x, y, eps)
    points = select_points(len(x), n, seed)
    x, y = x[points], y[points]
    indices = (suite.indices[points] if suite is not None and reuse else points)

    check_device(model, dev)
    require_input_gradients(model, x[:2].to(dev))  # PGD, FGSM and the gradient checks need them
    with preserved_mode(model):
        missing = [a for a in NEEDED_ATTACKS if a not in reuse]
        results: dict[str, AttackResult] = {}
        if reuse:
            assert suite is not None
            log.info("masking check: reusing %s from the given suite", ", ".join(reuse))
            results.update({a: _subset(suite.attacks[a], points) for a in reuse})
            clean_margin = suite.clean_margin[points]
        if missing:
            log.info("masking check: running %s on %d points", ", ".join(missing), len(x))
            own = run_suite(model, x, y, eps=eps, device=dev, attacks=missing, batch_size=batch_size,
                            seed=seed, pgd_alpha=pgd_alpha, spsa_iterations=spsa_iterations,
                            indices=indices, progress=progress)
            results.update(own.attacks)
            if not reuse:
                clean_margin = own.clean_margin
        # Points every attack attacked (= clean-correct; a randomised model may disagree with itself).
        attacked = torch.ones(len(x), dtype=torch.bool)
        for a in NEEDED_ATTACKS:
            attacked &= results[a].attacked
        pgd100, pgd40, fgsm, spsa = (results[a] for a in ("pgd100", "pgd40", "fgsm", "spsa"))
        pgd_fooled = pgd100.success
        nan = torch.full((len(x),), math.nan)
        pgd_margin = torch.where(attacked, pgd100.margin.float(), nan)
        spsa_margin = torch.where(attacked, spsa.margin.float(), nan)
        findings: list[Finding] = []
        findings.append(check_spsa_vs_pgd(pgd_margin=pgd100.margin.float(), spsa_margin=spsa.margin.float(),
                                          clean_margin=clean_margin.float(), attacked=attacked,
                                          tolerance=tolerance))
        findings.append(check_fgsm_vs_pgd(fgsm_fooled=fgsm.success, pgd_fooled=pgd_fooled,
                                          attacked=attacked))

        # ε sweep: PGD(20) with a step that can cross each radius.
        eps_list = sorted({min(1.0, f * eps) for f in EPS_SWEEP_FACTORS})
        accs: list[float] = []
        for e in eps_list:
            sw = eps_sweep(model, x, y, [e], device=dev, steps=EPS_SWEEP_STEPS,
                           alpha=max(pgd_alpha, 2.5 * e / EPS_SWEEP_STEPS), batch_size=batch_size,
                           seed=seed, progress=progress)
            accs.append(sw.robust_accuracy[0])
        findings.append(check_eps_monotone(eps=eps_list, robust_accuracy=accs, n=len(x)))

        idx = attacked.nonzero().flatten()
        xa, ya = x[idx], y[idx]
        unb = pgd_trajectory(model, xa, ya, eps=1.0, alpha=max(pgd_alpha, 2.5 / UNBOUNDED_STEPS),
                             steps=UNBOUNDED_STEPS, device=dev, seed=seed, random_start=False,
                             early_stop=True, batch_size=batch_size, progress=progress)
        unb_robust = torch.zeros(len(x), dtype=torch.bool)
        unb_robust[idx] = ~unb.fooled.any(dim=1)
        findings.append(check_unbounded(robust=unb_robust, attacked=attacked))

        noise = torch.zeros(len(x), dtype=torch.bool)
        noise[idx] = random_noise_fooled(model, xa, ya, eps=eps, device=dev, seed=seed,
                                         batch_size=batch_size)
        findings.append(check_random_noise(noise_fooled=noise, pgd_fooled=pgd_fooled, attacked=attacked))

        findings.append(check_gradients(model, xa, ya, device=dev, eps=eps, seed=seed,
                                        batch_size=batch_size))
        findings.append(check_randomised_forward(model, x, device=dev, batch_size=batch_size))
        findings.append(check_probability_outputs(model, x, device=dev, batch_size=batch_size))

        # Convergence: a fresh PGD(100) trajectory of the points PGD(100) did not fool.
        surv = (attacked & ~pgd_fooled).nonzero().flatten()
        improving = torch.zeros(len(x), dtype=torch.bool)
        restart_fooled = 0
        if len(surv):
            tr = pgd_trajectory(model, x[surv], y[surv], eps=eps, alpha=pgd_alpha, steps=100,
                                device=dev, seed=seed + 1, batch_size=batch_size, progress=progress)
            survived = ~tr.fooled.any(dim=1)
            improving[surv] = still_improving(tr.loss) & survived
            restart_fooled = int((~survived).sum())
        conv = check_pgd_convergence(pgd40_fooled=pgd40.success, pgd100_fooled=pgd_fooled,
                                     improving=improving, attacked=attacked)
        conv.details["restart_fooled"] = restart_fooled
        conv.details["restart_points"] = len(surv)
        findings.append(conv)
        if suite is not None and reuse:
            findings.extend(_autoattack_findings(suite, points, attacked))

    verdict: Verdict = "suspect" if any(f.status == "FAIL" for f in findings) else "pass"
    settings = {"pgd_alpha": pgd_alpha, "spsa_iterations": spsa_iterations, "seed": seed,
                "batch_size": batch_size, "reused_from_suite": reuse, "ran": missing,
                "eps_sweep": eps_list, "noise_draws": NOISE_DRAWS,
                "unbounded_steps": UNBOUNDED_STEPS, "indices": indices.tolist()}
    report = MaskingReport(
        verdict=verdict, findings=findings, eps=float(eps), n=len(x),
        clean_accuracy=float(attacked.double().mean()), clean_correct=attacked,
        clean_margin=clean_margin.float(), pgd_margin=pgd_margin, spsa_margin=spsa_margin,
        tolerance=tolerance, settings=settings, seconds=time.perf_counter() - start,
    )
    log.info("masking check: %s (%s) in %.1fs", verdict,
             ", ".join(f"{f.name}={f.status}" for f in findings), report.seconds)
    return report


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
