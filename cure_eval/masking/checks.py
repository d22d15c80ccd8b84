"""The gradient-masking checks: thresholds, :class:`Finding`, and one small function per
warning sign (see :mod:`cure_eval.masking` for the table of checks and their sources)."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..attacks.pgd import linf_random_start, linf_step
from ..device import seeded_rng
from ..errors import UsageError
from ..io import to_jsonable
from ..modes import check_device, eval_mode

log = logging.getLogger(__name__)

Status = Literal["PASS", "WARN", "FAIL"]
Verdict = Literal["pass", "suspect"]

#: The attacks of the suite the checks need (reused from a given :class:`SuiteResult`).
NEEDED_ATTACKS: tuple[str, ...] = ("fgsm", "pgd40", "pgd100", "spsa")

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
        out: dict[str, Any] = {"name": self.name, "status": self.status, "value": _json_float(self.value),
                               "threshold": _json_float(self.threshold), "message": self.message}
        if details:
            out["details"] = to_jsonable(self.details)
        return out


def _status(value: float, threshold: float, *, warn: bool, count: int | None = None) -> Status:
    """FAIL when ``value > threshold`` (and, for per-point fractions, ``count >= MIN_POINTS``);
    else WARN if ``warn`` (some evidence), else PASS. NaN (nothing to measure) is a WARN."""
    if math.isnan(value):
        return "WARN"
    if value > threshold and (count is None or count >= MIN_POINTS):
        return "FAIL"
    return "WARN" if warn else "PASS"


def _json_float(v: float) -> float | None:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _frac(mask: torch.Tensor, among: torch.Tensor) -> float:
    """Share of the ``among`` points where ``mask`` holds (NaN when there are none)."""
    k = int(among.sum())
    return float((mask & among).sum()) / k if k else float("nan")


# --------------------------------------------------------------------------------------------
# Small helpers that run the model.
# --------------------------------------------------------------------------------------------
@contextmanager
def _model_on(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Model on ``device`` in eval mode; the caller's train/eval modes restored afterwards."""
    check_device(model, device)
    with eval_mode(model):
        yield model


def _logits(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            out.append(model(x[s:s + batch_size].to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@dataclass
class PGDTrajectory:
    """Per-point record of one ℓ∞ PGD run (CPU tensors).

    ``loss[:, t]`` is the cross-entropy at the iterate after ``t`` steps (``t = 0``: the start),
    ``fooled[:, t]`` whether that iterate is misclassified, ``x_adv`` the last iterate.
    """

    loss: torch.Tensor
    fooled: torch.Tensor
    x_adv: torch.Tensor


def pgd_trajectory(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    device: torch.device | str,
    seed: int = 0,
    random_start: bool = True,
    early_stop: bool = False,
    batch_size: int = 256,
    progress: bool = False,
) -> PGDTrajectory:
    """ℓ∞ PGD (Madry et al. 2018) that records every iterate's per-point loss (the PGD core of
    :mod:`cure_eval.attacks.pgd`: :func:`~cure_eval.attacks.pgd.linf_random_start`,
    :func:`~cure_eval.attacks.pgd.linf_step`).

    Exactly ``torchattacks.PGD``'s operations (uniform random start drawn with
    ``torch.empty_like(x).uniform_(-eps, eps)`` after ``torch.manual_seed(seed)``, gradient of the
    batch-mean cross-entropy, step ``alpha·sign(grad)``, projection onto the ε-ball ∩ [0, 1]);
    the per-point losses are read off the same forward passes, plus one forward at the last
    iterate. With ``early_stop`` a point stops at its first misclassified iterate (its later
    columns repeat that iterate's values). Model in eval mode, its modes restored afterwards.
    """
    if steps < 1:
        raise UsageError(f"PGD steps must be >= 1, got {steps}")
    dev = torch.device(device)
    n = len(x)
    loss_all = torch.zeros(n, steps + 1)
    fooled_all = torch.zeros(n, steps + 1, dtype=torch.bool)
    x_out = x.detach().cpu().clone()
    with _model_on(model, dev), seeded_rng(seed, dev), torch.enable_grad(), \
            tqdm(total=n, desc=f"pgd{steps} ε={eps * 255:.3g}/255", unit="pt", disable=not progress,
                 leave=False) as bar:
        for s in range(0, n, batch_size):
            xb = x[s:s + batch_size].detach().to(dev)
            yb = y[s:s + batch_size].to(dev)
            adv = xb.clone()
            if random_start:
                adv = linf_random_start(adv, eps)
            active = torch.arange(len(xb), device=dev)
            rows = torch.arange(s, s + len(xb))
            for t in range(steps + 1):
                a = adv[active].clone().requires_grad_(t < steps)
                with torch.set_grad_enabled(t < steps):
                    out = model(a)
                lvec = F.cross_entropy(out, yb[active], reduction="none")
                fooled = out.argmax(dim=1) != yb[active]
                idx = rows[active.cpu()]
                loss_all[idx, t:] = lvec.detach().float().cpu()[:, None]
                fooled_all[idx, t:] = fooled.cpu()[:, None]
                if t == steps:
                    break
                (grad,) = torch.autograd.grad(lvec.mean(), a)
                adv[active] = linf_step(a, grad, xb[active], eps=eps, alpha=alpha)
                if early_stop:
                    keep = ~fooled
                    adv[active[fooled]] = a.detach()[fooled]  # keep the fooling iterate
                    active = active[keep]
                    if len(active) == 0:
                        break
            x_out[s:s + len(xb)] = adv.detach().cpu()
            bar.update(len(xb))
    return PGDTrajectory(loss=loss_all, fooled=fooled_all, x_adv=x_out)


# --------------------------------------------------------------------------------------------
# The checks.
# --------------------------------------------------------------------------------------------
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
    att = attacked.bool()
    pgd_fooled = pgd_margin < 0
    spsa_fooled = spsa_margin < 0
    beats = att & spsa_fooled & ~pgd_fooled
    stronger = att & (spsa_margin < pgd_margin - tolerance * clean_margin.abs())
    value = _frac(stronger, att)
    beats_frac = _frac(beats, att)
    rho_all = _spearman(pgd_margin[att], spsa_margin[att])
    both = att & ~pgd_fooled
    rho_robust = _spearman(pgd_margin[both], spsa_margin[both])
    pgd_acc = _frac(~pgd_fooled, att)
    spsa_acc = _frac(~spsa_fooled, att)
    details = {"spsa_stronger": int(stronger.sum()), "spsa_beats_pgd": int(beats.sum()),
               "spsa_beats_pgd_fraction": beats_frac, "attacked": int(att.sum()),
               "spearman": rho_all, "spearman_pgd_robust": rho_robust,
               "pgd100_robust_accuracy": pgd_acc, "spsa_robust_accuracy": spsa_acc,
               "tolerance": tolerance}
    status = _status(value, threshold, warn=bool(beats.any()), count=int(stronger.sum()))
    message = (f"SPSA loss clearly below PGD(100)'s on {_pct(value)} of the points, SPSA fools "
               f"{_pct(beats_frac)} PGD does not (robust PGD {_pct(pgd_acc)}, SPSA {_pct(spsa_acc)}; "
               f"Spearman {rho_all:.2f})")
    message += {"FAIL": ": the gradient-free attack beats the gradient attack, gradients are masked",
                "WARN": ": a few points where PGD overstates robustness, as on honest models",
                "PASS": ": both attacks agree (CURE Fig. 7)"}[status]
    return Finding("spsa_vs_pgd", status, value, threshold, message, details)


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


def _pct(v: float) -> str:
    return "nan" if math.isnan(v) else f"{100 * v:.1f} %"


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
    value = _frac(beats, att)
    fgsm_acc = _frac(~fgsm_fooled, att)
    pgd_acc = _frac(~pgd_fooled, att)
    status = _status(value, threshold, warn=bool(beats.any()), count=int(beats.sum()))
    message = (f"FGSM fools {_pct(value)} of the attacked points PGD(100) does not "
               f"(robust: FGSM {_pct(fgsm_acc)}, PGD {_pct(pgd_acc)})")
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
    value = _frac(only_aa, att)
    suite_acc = _frac(suite_robust, att)
    aa_acc = _frac(autoattack_robust, att)
    status = _status(value, threshold, warn=bool(only_aa.any()), count=int(only_aa.sum()))
    message = (f"{attack} breaks {_pct(value)} of the attacked points the suite's attacks do not "
               f"(robust: suite worst case {_pct(suite_acc)}, {attack} {_pct(aa_acc)}; "
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
    status = _status(value, threshold, warn=value > 0,
                     count=None if n is None else round(value * n))
    curve = ", ".join(f"{e * 255:.3g}:{100 * a:.0f}" for e, a in zip(es, accs, strict=True))
    message = (f"PGD robust accuracy vs ε/255 [{curve}] %: largest rise {_pct(value)}")
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
    value = _frac(robust.bool(), att)
    survivors = int((robust.bool() & att).sum())
    status = _status(value, threshold, warn=survivors > 0, count=survivors)
    message = f"PGD({steps}) at ε = 1 from the clean input leaves {_pct(value)} of the attacked points correct"
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
    value = _frac(beats, att)
    noise_rate = _frac(noise_fooled.bool(), att)
    status = _status(value, threshold, warn=bool(beats.any()), count=int(beats.sum()))
    message = (f"{draws} uniform noise draws fool {_pct(value)} of the attacked points PGD(100) does not "
               f"(noise fools {_pct(noise_rate)} overall)")
    message += {"FAIL": ": random search beats gradient search, gradients are masked",
                "WARN": ": a stray point; PGD should find everything noise finds",
                "PASS": ": noise finds nothing PGD misses"}[status]
    return Finding("random_noise", status, value, threshold, message,
                   {"noise_beats_pgd": int(beats.sum()), "noise_fooled_fraction": noise_rate,
                    "attacked": int(att.sum()), "draws": draws})


def check_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device | str,
    eps: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
    threshold: float = GRADIENTS_FAIL,
) -> Finding:
    """Zero, NaN or infinite input gradients of the cross-entropy, per point.

    The gradient of the per-point cross-entropy (the loss PGD and FGSM follow) is taken at the
    clean input and, if ``eps`` is given, at one uniform random point of the ε-ball. A point is
    *unavailable* when either gradient is all zeros or contains NaN/inf; if the model's output is
    not connected to its input at all (``.detach()``, numpy inside), every point is. ``value``:
    share of the given points that are unavailable (pass the attacked points). FAIL above
    ``threshold``; WARN on any.

    Zero gradients can be honest: a softmax saturated beyond float32 (margin > ~104 logits)
    gives an exact 0 — a real obstacle for cross-entropy attacks all the same.
    """
    dev = torch.device(device)
    n = len(x)
    zero = torch.zeros(n, dtype=torch.bool)
    nonfinite = torch.zeros(n, dtype=torch.bool)
    broken = ""
    with _model_on(model, dev), seeded_rng(seed, dev), torch.enable_grad():
        for s in range(0, n, batch_size):
            xb = x[s:s + batch_size].detach().to(dev)
            yb = y[s:s + batch_size].to(dev)
            starts = [xb]
            if eps is not None:
                starts.append(torch.clamp(xb + torch.empty_like(xb).uniform_(-eps, eps), 0, 1))
            for xs in starts:
                xs = xs.clone().requires_grad_(True)
                out = model(xs)
                if not out.requires_grad:  # output not connected to the input
                    broken = "the model's output does not require grad (detach, no_grad or numpy inside)"
                    zero[s:s + len(xb)] = True
                    continue
                loss = F.cross_entropy(out, yb, reduction="sum")
                (g,) = torch.autograd.grad(loss, xs, allow_unused=True)
                if g is None:  # the loss depends on parameters only, not on the input
                    broken = "the output does not depend on the input in the autograd graph"
                    zero[s:s + len(xb)] = True
                    continue
                g = g.detach().flatten(1).cpu()
                zero[s:s + len(xb)] |= (g == 0).all(dim=1)
                nonfinite[s:s + len(xb)] |= ~torch.isfinite(g).all(dim=1)
    bad = zero | nonfinite
    value = float(bad.double().mean()) if n else float("nan")
    status = _status(value, threshold, warn=bool(bad.any()), count=int(bad.sum()))
    what = "graph broken" if broken else f"{int(zero.sum())} zero, {int(nonfinite.sum())} NaN/inf"
    message = f"input gradient of the cross-entropy unavailable on {_pct(value)} of the points ({what})"
    message += {"FAIL": ": gradient attacks cannot move, robustness under them means nothing",
                "WARN": ": a few points (e.g. a softmax saturated beyond float32)",
                "PASS": ": gradients are usable"}[status]
    return Finding("gradients", status, value, threshold, message,
                   {"zero": int(zero.sum()), "nonfinite": int(nonfinite.sum()), "points": n,
                    "graph_broken": broken or None, "random_point_too": eps is not None})


def check_randomised_forward(
    model: nn.Module,
    x: torch.Tensor,
    *,
    device: torch.device | str,
    passes: int = RANDOM_FORWARD_PASSES,
    batch_size: int = 256,
    threshold: float = RANDOM_FORWARD_FAIL,
) -> Finding:
    """The same input must give the same logits: ``passes`` forward passes in eval mode.

    AutoAttack's check (logits differing by more than 1e-4 across passes mean a randomised
    defence, which needs EOT-style attacks). ``value``: the largest absolute logit difference
    between passes divided by ``max(1, max |logit|)`` — AutoAttack's absolute 1e-4 for ordinary
    logits, but float round-off of logits ×10⁴ (non-deterministic GPU kernels) does not trip it.
    Batches are identical in every pass. FAIL above ``threshold``.
    """
    if passes < 2:
        raise UsageError(f"randomised-forward check needs >= 2 passes, got {passes}")
    dev = torch.device(device)
    with _model_on(model, dev):
        outs = torch.stack([_logits(model, x, dev, batch_size) for _ in range(passes)])
    spread = (outs.amax(dim=0) - outs.amin(dim=0)).flatten(1).amax(dim=1)  # per point
    scale = max(1.0, float(outs.abs().max())) if outs.numel() else 1.0
    value = float(spread.max()) / scale if len(spread) else float("nan")
    differ = spread / scale > threshold
    flips = (outs.argmax(dim=2) != outs[0].argmax(dim=1)[None]).any(dim=0)
    status = _status(value, threshold, warn=False)
    message = (f"{passes} passes on the same input: logits differ by up to {value:.3g} "
               f"(relative), on {_pct(float(differ.double().mean()))} of the points, "
               f"prediction flips on {_pct(float(flips.double().mean()))}")
    message += (": randomised model, gradients are noisy; attack it with EOT" if status == "FAIL"
                else ": deterministic")
    return Finding("randomised_forward", status, value, threshold, message,
                   {"points_differing": int(differ.sum()), "prediction_flips": int(flips.sum()),
                    "passes": passes, "logit_scale": scale, "max_abs_difference": float(spread.max())
                    if len(spread) else float("nan")})


def check_probability_outputs(
    model: nn.Module,
    x: torch.Tensor,
    *,
    device: torch.device | str,
    batch_size: int = 256,
    atol: float = PROBABILITY_ATOL,
    threshold: float = PROBABILITY_FAIL,
) -> Finding:
    """The model must return logits, not probabilities (AutoAttack's check).

    A row "looks like probabilities" when it is non-negative and sums to 1 within ``atol``.
    Cross-entropy of softmax(probabilities) is nearly flat, so PGD and FGSM get weak gradients,
    and the margins of Fig. 7 lose their meaning. ``value``: share of rows that look like
    probabilities. FAIL above ``threshold`` (a logit model essentially never gives such rows).
    """
    dev = torch.device(device)
    with _model_on(model, dev):
        out = _logits(model, x, dev, batch_size).double()
    probs = (out >= 0).all(dim=1) & ((out.sum(dim=1) - 1).abs() <= atol)
    value = float(probs.double().mean()) if len(out) else float("nan")
    status = _status(value, threshold, warn=bool(probs.any()))
    message = f"{_pct(value)} of the output rows are non-negative and sum to 1"
    message += {"FAIL": ": the model returns probabilities; remove the softmax, attacks need logits",
                "WARN": ": a few rows by coincidence; outputs are logits",
                "PASS": ": outputs are logits"}[status]
    return Finding("probability_outputs", status, value, threshold, message,
                   {"probability_rows": int(probs.sum()), "points": len(out), "atol": atol})


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
    value = _frac(late | moving, att)
    acc40, acc100 = _frac(~pgd40_fooled, att), _frac(~pgd100_fooled, att)
    status = _status(value, threshold, warn=bool((late | moving).any()), count=int((late | moving).sum()))
    message = (f"robust PGD(40) {_pct(acc40)} → PGD(100) {_pct(acc100)}; {int(late.sum())} points "
               f"fooled only after step 40, {int(moving.sum())} survivors with loss still rising")
    message += {"FAIL": ": the attack has not converged, more iterations change the result",
                "WARN": ": a stray point, as on honest models",
                "PASS": ": PGD has converged"}[status]
    return Finding("pgd_convergence", status, value, threshold, message,
                   {"fooled_after_40": int(late.sum()), "still_improving": int(moving.sum()),
                    "pgd40_robust_accuracy": acc40, "pgd100_robust_accuracy": acc100,
                    "attacked": int(att.sum()), "window": CONVERGENCE_WINDOW,
                    "delta": CONVERGENCE_DELTA})


def random_noise_fooled(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    device: torch.device | str,
    draws: int = NOISE_DRAWS,
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Per point: is any of ``draws`` uniform draws ``clip(x + U(-ε, ε), 0, 1)`` misclassified?

    Draws come from a CPU generator seeded with ``seed`` (same noise on any device); points are
    processed ``max(1, 4·batch_size // draws)`` at a time, all their draws in one model call.
    """
    if draws < 1:
        raise UsageError(f"noise draws must be >= 1, got {draws}")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    fooled = torch.zeros(n, dtype=torch.bool)
    per = max(1, (4 * batch_size) // draws)
    with _model_on(model, dev), torch.no_grad():
        for s in range(0, n, per):
            xb = x[s:s + per].detach().cpu()
            noise = (torch.rand((len(xb), draws, *xb.shape[1:]), generator=gen) * 2 - 1) * eps
            xn = torch.clamp(xb[:, None] + noise, 0, 1).flatten(0, 1)
            pred = torch.cat([model(xn[i:i + 4 * batch_size].to(dev)).argmax(dim=1).cpu()
                              for i in range(0, len(xn), 4 * batch_size)])
            fooled[s:s + len(xb)] = (pred.view(len(xb), draws) != y[s:s + per, None].cpu()).any(dim=1)
    return fooled
