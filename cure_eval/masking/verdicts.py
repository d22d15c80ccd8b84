"""Masking checks over recorded numbers: each turns per-point results the suite and the probes
already measured (margins, fooled masks, accuracies, loss trajectories) into a :class:`Finding`;
none runs the model."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import UsageError
from .findings import (
    AUTOATTACK_GAP_FAIL,
    CONVERGENCE_DELTA,
    CONVERGENCE_FAIL,
    CONVERGENCE_WINDOW,
    EPS_RISE_FAIL,
    FGSM_BEATS_PGD_FAIL,
    NOISE_BEATS_PGD_FAIL,
    NOISE_DRAWS,
    SPSA_STRONGER_FAIL,
    SPSA_TOLERANCE,
    UNBOUNDED_FAIL,
    UNBOUNDED_STEPS,
    Finding,
    Status,
    frac,
    pct,
    status_of,
)


def _versus_pgd(pgd_margin: torch.Tensor, other_margin: torch.Tensor, clean_margin: torch.Tensor,
                attacked: torch.Tensor, tolerance: float,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float, float, float]:
    """The per-point rule both gradient-free comparisons share: over the attacked points, where the
    other attack fools and PGD(100) does not (``beats``), where its loss lies below PGD's by more
    than ``tolerance`` × the clean margin (``stronger``, scale-free), their shares and both robust
    accuracies. Returns ``(attacked, pgd_fooled, beats, stronger, value, beats_frac, pgd_acc,
    other_acc)``."""
    att = attacked.bool()
    pgd_fooled = pgd_margin < 0
    other_fooled = other_margin < 0
    beats = att & other_fooled & ~pgd_fooled
    stronger = att & (other_margin < pgd_margin - tolerance * clean_margin.abs())
    return (att, pgd_fooled, beats, stronger, frac(stronger, att), frac(beats, att),
            frac(~pgd_fooled, att), frac(~other_fooled, att))


def check_spsa_vs_pgd(
    *,
    pgd_margin: torch.Tensor,
    spsa_margin: torch.Tensor,
    clean_margin: torch.Tensor,
    attacked: torch.Tensor,
    tolerance: float = SPSA_TOLERANCE,
    threshold: float = SPSA_STRONGER_FAIL,
) -> Finding:
    """The CURE paper's check (Fig. 7), per point: does gradient-free SPSA beat PGD(100)?

    Inputs are per point: the adversarial loss (true logit minus largest other logit) at the
    points PGD(100) and SPSA returned, and at the clean input. Over the attacked points:

    * ``value``: the share of *red* points — SPSA's loss below PGD(100)'s by more than
      ``tolerance`` × the point's clean margin (scale-free: a model whose logits are multiplied
      by 10⁴ is judged as the original). On an honest model both attacks land on y = x;
      where the gradients lie, PGD stays near its start and SPSA goes far below the line.
    * ``spsa_beats_pgd``: the share SPSA fools (loss < 0) while PGD(100) does not;
    * the Spearman rank correlation of the two losses (``scipy.stats.spearmanr``), over all
      attacked points and over those PGD did not fool;
    * both robust accuracies over the attacked points.

    FAIL when ``value > threshold`` (and at least :data:`MIN_POINTS` red points); WARN when SPSA
    fools any point PGD did not (robust accuracy under PGD overstates by that much). Why the red share decides, measured
    on digits at ε = 32/255 (200 points, SPSA 100 iterations): honest models (normal, four CURE
    variants) have 0-2.9 % red points at tolerance 0.2, the masked ones 88-100 %; "SPSA fools,
    PGD does not" separates less (honest up to 4.1 %, shattered as low as 6.5 % with 40 SPSA
    iterations, because quantisation hampers SPSA's finite differences too); the Spearman
    correlation does not separate at all (honest 0.87-0.96, masked 0.74-0.90), since SPSA
    stops at the first misclassified iterate while PGD keeps pushing the loss down.
    """
    att, pgd_fooled, beats, stronger, value, beats_frac, pgd_acc, spsa_acc = _versus_pgd(
        pgd_margin, spsa_margin, clean_margin, attacked, tolerance)
    rho_all = _spearman(pgd_margin[att], spsa_margin[att])
    both = att & ~pgd_fooled
    rho_robust = _spearman(pgd_margin[both], spsa_margin[both])
    details = {"spsa_stronger": int(stronger.sum()), "spsa_beats_pgd": int(beats.sum()),
               "spsa_beats_pgd_fraction": beats_frac, "attacked": int(att.sum()),
               "spearman": rho_all, "spearman_pgd_robust": rho_robust,
               "pgd100_robust_accuracy": pgd_acc, "spsa_robust_accuracy": spsa_acc,
               "tolerance": tolerance}
    status = status_of(value, threshold, warn=bool(beats.any()), count=int(stronger.sum()))
    message = (f"SPSA loss clearly below PGD(100)'s on {pct(value)} of the points, SPSA fools "
               f"{pct(beats_frac)} PGD does not (robust PGD {pct(pgd_acc)}, SPSA {pct(spsa_acc)}; "
               f"Spearman {rho_all:.2f})")
    message += {"FAIL": ": the gradient-free attack beats the gradient attack, gradients are masked",
                "WARN": ": a few points where PGD overstates robustness, as on honest models",
                "PASS": ": both attacks agree (CURE Fig. 7)"}[status]
    return Finding("spsa_vs_pgd", status, value, threshold, message, details)


def check_square_vs_pgd(
    *,
    pgd_margin: torch.Tensor,
    square_margin: torch.Tensor,
    clean_margin: torch.Tensor,
    attacked: torch.Tensor,
    tolerance: float = SPSA_TOLERANCE,
    threshold: float = SPSA_STRONGER_FAIL,
) -> Finding:
    """The second per-point gradient-free comparison: Square (Andriushchenko et al. 2020,
    https://arxiv.org/abs/1912.00049) against PGD(100), as :func:`check_spsa_vs_pgd` compares
    SPSA: ``value`` is the share of attacked points where Square's adversarial loss lies below
    PGD(100)'s by more than ``tolerance`` × the clean margin; details give the share Square fools
    while PGD(100) does not, and both robust accuracies.

    Never FAIL (no threshold of its own has been measured on honest and masked models yet, so
    the verdict stays the SPSA check's): WARN when ``value > threshold`` with at least
    :data:`MIN_POINTS` such points, or when Square fools a point PGD(100) did not; else PASS.
    """
    att, _, beats, stronger, value, beats_frac, pgd_acc, sq_acc = _versus_pgd(
        pgd_margin, square_margin, clean_margin, attacked, tolerance)
    details = {"square_stronger": int(stronger.sum()), "square_beats_pgd": int(beats.sum()),
               "square_beats_pgd_fraction": beats_frac, "attacked": int(att.sum()),
               "pgd100_robust_accuracy": pgd_acc, "square_robust_accuracy": sq_acc, "tolerance": tolerance}
    flagged = status_of(value, threshold, warn=bool(beats.any()), count=int(stronger.sum())) != "PASS"
    status: Status = "WARN" if flagged else "PASS"
    message = (f"Square loss clearly below PGD(100)'s on {pct(value)} of the points, Square fools "
               f"{pct(beats_frac)} PGD does not (robust PGD {pct(pgd_acc)}, Square {pct(sq_acc)})")
    message += (": the gradient-free attack finds what PGD misses (informative; the SPSA check decides)"
                if flagged else ": both attacks agree")
    return Finding("square_vs_pgd", status, value, threshold, message, details)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    if len(a) < 3:
        return float("nan")
    from scipy.stats import spearmanr

    an, bn = a.double().numpy(), b.double().numpy()
    ok = np.isfinite(an) & np.isfinite(bn)
    if ok.sum() < 3 or np.ptp(an[ok]) == 0 or np.ptp(bn[ok]) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = spearmanr(an[ok], bn[ok]).statistic
    return float(rho)

def check_fgsm_vs_pgd(
    *,
    fgsm_fooled: torch.Tensor,
    pgd_fooled: torch.Tensor,
    attacked: torch.Tensor,
    threshold: float = FGSM_BEATS_PGD_FAIL,
) -> Finding:
    """Single-step beats iterative: FGSM fools points PGD(100) does not (per point).

    PGD with many small steps explores the ε-ball far better than FGSM's single step; where
    FGSM still wins, PGD's steps were misled by the local gradient (a hallmark of masking,
    Athalye et al. 2018, §3). ``value``: share of attacked points FGSM fools and PGD(100) does
    not. FAIL above ``threshold``, WARN on any such point.
    """
    att = attacked.bool()
    beats = att & fgsm_fooled & ~pgd_fooled
    value = frac(beats, att)
    fgsm_acc = frac(~fgsm_fooled, att)
    pgd_acc = frac(~pgd_fooled, att)
    status = status_of(value, threshold, warn=bool(beats.any()), count=int(beats.sum()))
    message = (f"FGSM fools {pct(value)} of the attacked points PGD(100) does not "
               f"(robust: FGSM {pct(fgsm_acc)}, PGD {pct(pgd_acc)})")
    message += {"FAIL": ": single step beats 100 steps, PGD's gradients mislead it",
                "WARN": ": a stray point, as on honest models",
                "PASS": ": as expected, PGD is the stronger attack"}[status]
    return Finding("fgsm_vs_pgd", status, value, threshold, message,
                   {"fgsm_beats_pgd": int(beats.sum()), "attacked": int(att.sum()),
                    "fgsm_robust_accuracy": fgsm_acc, "pgd100_robust_accuracy": pgd_acc})

def check_suite_vs_autoattack(
    *,
    suite_robust: torch.Tensor,
    autoattack_robust: torch.Tensor,
    attacked: torch.Tensor,
    attack: str = "autoattack",
    threshold: float = AUTOATTACK_GAP_FAIL,
) -> Finding:
    """The suite's own worst case against the original AutoAttack (Croce and Hein 2020,
    https://arxiv.org/abs/2003.01690), per point.

    ``suite_robust``: robust under every attack of the suite other than AutoAttack;
    ``autoattack_robust``: robust under AutoAttack. ``value``: share of the attacked points that
    AutoAttack breaks and the suite does not — by how much the suite's worst case overstates
    robustness against the field's yardstick. FAIL above ``threshold`` (and at least
    :data:`MIN_POINTS` points): the suite's attacks are too weak for this model, its numbers are
    not to be trusted without AutoAttack's. WARN on any such point. Points the suite breaks and
    AutoAttack does not are counted too (``only_suite``): they show where the suite adds to
    AutoAttack, not masking.
    """
    att = attacked.bool()
    only_aa = att & suite_robust & ~autoattack_robust
    only_suite = att & autoattack_robust & ~suite_robust
    value = frac(only_aa, att)
    suite_acc = frac(suite_robust, att)
    aa_acc = frac(autoattack_robust, att)
    status = status_of(value, threshold, warn=bool(only_aa.any()), count=int(only_aa.sum()))
    message = (f"{attack} breaks {pct(value)} of the attacked points the suite's attacks do not "
               f"(robust: suite worst case {pct(suite_acc)}, {attack} {pct(aa_acc)}; "
               f"{int(only_suite.sum())} points only the suite breaks)")
    message += {"FAIL": ": the suite's worst case sits far above AutoAttack's, its attacks are too weak for this model",
                "WARN": ": a few points only AutoAttack finds",
                "PASS": ": the suite finds everything AutoAttack finds"}[status]
    return Finding("suite_vs_autoattack", status, value, threshold, message,
                   {"only_autoattack": int(only_aa.sum()), "only_suite": int(only_suite.sum()),
                    "attacked": int(att.sum()), "suite_robust_accuracy": suite_acc,
                    "autoattack_robust_accuracy": aa_acc, "attack": attack})

def check_eps_monotone(
    *,
    eps: Sequence[float],
    robust_accuracy: Sequence[float],
    n: int | None = None,
    threshold: float = EPS_RISE_FAIL,
) -> Finding:
    """Robust accuracy must not rise as ε grows (a larger ball contains the smaller one).

    ``value``: the largest rise of robust accuracy between two successive radii (0 when the
    curve never rises). FAIL above ``threshold``, WARN on any rise (a different random start per
    radius can cost a point on honest models; with ``n``, the number of points, a FAIL also needs
    a rise of :data:`MIN_POINTS` points or more). Feed it :func:`~cure_eval.attacks.eps_sweep`'s
    ``eps`` and ``robust_accuracy``.
    """
    if len(eps) != len(robust_accuracy) or not eps:
        raise UsageError("check_eps_monotone needs one robust accuracy per eps")
    order = sorted(range(len(eps)), key=lambda i: eps[i])
    es = [float(eps[i]) for i in order]
    accs = [float(robust_accuracy[i]) for i in order]
    rises = [accs[i + 1] - accs[i] for i in range(len(accs) - 1)]
    value = max([0.0, *rises])
    status = status_of(value, threshold, warn=value > 0,
                     count=None if n is None else round(value * n))
    curve = ", ".join(f"{e * 255:.3g}:{100 * a:.0f}" for e, a in zip(es, accs, strict=True))
    message = (f"PGD robust accuracy vs ε/255 [{curve}] %: largest rise {pct(value)}")
    message += (": a larger ε helps the model, the attack is failing" if status == "FAIL"
                else ": falls with ε as it must" if value == 0 else ": small rise, attack noise")
    return Finding("eps_monotone", status, value, threshold, message,
                   {"eps": es, "robust_accuracy": accs})

def check_unbounded(
    *,
    robust: torch.Tensor,
    attacked: torch.Tensor,
    threshold: float = UNBOUNDED_FAIL,
    steps: int = UNBOUNDED_STEPS,
) -> Finding:
    """PGD with ε = 1 (any image in [0, 1]) must fool (almost) every point.

    ``robust``: per point, still correctly classified after PGD at ε = 1. ``value``: share of
    attacked points not fooled. The PGD here starts from the clean input (no random start):
    a random start at ε = 1 is close to a random image, which the digits CNN already
    misclassified 56 % of the time, so with it the shattered and vanishing models showed 44 %
    survivors instead of 100 %: a random start does part of the work the gradients should do.
    FAIL above ``threshold``; WARN on any surviving point.
    """
    att = attacked.bool()
    value = frac(robust.bool(), att)
    survivors = int((robust.bool() & att).sum())
    status = status_of(value, threshold, warn=survivors > 0, count=survivors)
    message = f"PGD({steps}) at ε = 1 from the clean input leaves {pct(value)} of the attacked points correct"
    message += {"FAIL": ": an unbounded attack must reach 100 % success, its gradients do not work",
                "WARN": ": a stray survivor; look at it",
                "PASS": ": the attack can reach any image, as it must"}[status]
    return Finding("unbounded", status, value, threshold, message,
                   {"survivors": int((robust.bool() & att).sum()), "attacked": int(att.sum()),
                    "steps": steps})

def check_random_noise(
    *,
    noise_fooled: torch.Tensor,
    pgd_fooled: torch.Tensor,
    attacked: torch.Tensor,
    draws: int = NOISE_DRAWS,
    threshold: float = NOISE_BEATS_PGD_FAIL,
) -> Finding:
    """Uniform random noise in the ε-ball finds adversarial examples PGD(100) missed.

    ``noise_fooled``: per point, at least one of ``draws`` uniform draws misclassified (see
    :func:`random_noise_fooled`). ``value``: share of attacked points noise fools and PGD(100)
    does not. FAIL above ``threshold``; WARN on any such point.
    """
    att = attacked.bool()
    beats = att & noise_fooled.bool() & ~pgd_fooled.bool()
    value = frac(beats, att)
    noise_rate = frac(noise_fooled.bool(), att)
    status = status_of(value, threshold, warn=bool(beats.any()), count=int(beats.sum()))
    message = (f"{draws} uniform noise draws fool {pct(value)} of the attacked points PGD(100) does not "
               f"(noise fools {pct(noise_rate)} overall)")
    message += {"FAIL": ": random search beats gradient search, gradients are masked",
                "WARN": ": a stray point; PGD should find everything noise finds",
                "PASS": ": noise finds nothing PGD misses"}[status]
    return Finding("random_noise", status, value, threshold, message,
                   {"noise_beats_pgd": int(beats.sum()), "noise_fooled_fraction": noise_rate,
                    "attacked": int(att.sum()), "draws": draws})

def still_improving(loss: torch.Tensor, *, window: int = CONVERGENCE_WINDOW,
                    delta: float = CONVERGENCE_DELTA) -> torch.Tensor:
    """Per point: is the attack's best loss still improving at the end of the trajectory?

    Pintor et al. 2022 ("incomplete optimisation"): the loss of each point is rescaled to [0, 1]
    over its trajectory (``(ℓ − min ℓ) / (max ℓ − min ℓ)``, 0 if flat); the point is still
    improving when the best rescaled loss so far rose by more than ``delta`` over the last
    ``window`` steps. The running best ignores the up-and-down of a fixed-step sign attack.
    ``loss``: ``(N, T + 1)``, as :attr:`PGDTrajectory.loss`.
    """
    if loss.shape[1] <= window:
        raise UsageError(f"a trajectory of {loss.shape[1] - 1} steps is too short for a {window}-step window")
    lo = loss.amin(dim=1, keepdim=True)
    rng = loss.amax(dim=1, keepdim=True) - lo
    norm = torch.where(rng > 0, (loss - lo) / rng.clamp_min(1e-30), torch.zeros_like(loss))
    best = torch.cummax(norm, dim=1).values
    return (best[:, -1] - best[:, -1 - window]) > delta

def check_pgd_convergence(
    *,
    pgd40_fooled: torch.Tensor,
    pgd100_fooled: torch.Tensor,
    improving: torch.Tensor,
    attacked: torch.Tensor,
    threshold: float = CONVERGENCE_FAIL,
) -> Finding:
    """More PGD iterations must not change the result: PGD(100) ≈ PGD(40), and converged.

    Per attacked point, "not converged" means either PGD(40) failed and PGD(100) fooled it
    (the result still moved with 60 more steps), or PGD(100) failed and its loss was still
    improving at the end (``improving``, from :func:`still_improving` on a PGD(100) trajectory
    of the points PGD(100) did not fool; Pintor et al. 2022). ``value``: share of attacked
    points not converged. FAIL above ``threshold``; WARN on any.
    """
    att = attacked.bool()
    late = att & ~pgd40_fooled & pgd100_fooled
    moving = att & ~pgd100_fooled & improving.bool()
    value = frac(late | moving, att)
    acc40, acc100 = frac(~pgd40_fooled, att), frac(~pgd100_fooled, att)
    status = status_of(value, threshold, warn=bool((late | moving).any()), count=int((late | moving).sum()))
    message = (f"robust PGD(40) {pct(acc40)} → PGD(100) {pct(acc100)}; {int(late.sum())} points "
               f"fooled only after step 40, {int(moving.sum())} survivors with loss still rising")
    message += {"FAIL": ": the attack has not converged, more iterations change the result",
                "WARN": ": a stray point, as on honest models",
                "PASS": ": PGD has converged"}[status]
    return Finding("pgd_convergence", status, value, threshold, message,
                   {"fooled_after_40": int(late.sum()), "still_improving": int(moving.sum()),
                    "pgd40_robust_accuracy": acc40, "pgd100_robust_accuracy": acc100,
                    "attacked": int(att.sum()), "window": CONVERGENCE_WINDOW,
                    "delta": CONVERGENCE_DELTA})
