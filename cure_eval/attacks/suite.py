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

Layout: :mod:`.units` (the plan, the unit runner, the worst case: every rule above, once),
:mod:`.measure` (one attack's output measured), :mod:`.validity` (the ε-ball checks),
:mod:`.results` (:class:`SuiteResult`, JSON summary, per-point rows), :mod:`.sweep` (the ε
sweep); this module holds the entry points :func:`run_suite` and :func:`run_attack`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .base import AttackConfig, AttackResult
from .registry import attack_order, get_attack
from .results import (
    EpsSweepResult,
    SuiteResult,
    autoattack_comparison,
    library_versions,
    suite_rows,
    suite_summary,
)
from .sweep import eps_sweep
from .units import SUITE_DEFAULTS, MemoryStore, assemble, cascade_update, make_plan, run_units
from .validity import EPS_TOL, check_adversarial, check_inputs, perturbation_norms

__all__ = [
    "ATTACKS", "ATTACK_NAMES", "ATTACK_PRESETS", "DEFAULT_ATTACKS", "EPS_TOL", "THOROUGH_ATTACKS", "expand_presets", "EpsSweepResult", "SuiteResult", "autoattack_comparison",
    "cascade_update", "check_adversarial", "eps_sweep", "library_versions", "perturbation_norms", "run_attack",
    "run_suite", "suite_rows", "suite_summary", "threat_norm",
]

#: The built-in attacks, in report order: the default selection of :func:`run_suite` and of
#: ``audit --attacks``. Every installed attack (built-in or plugin) is in :func:`list_attacks`.
ATTACKS: tuple[str, ...] = (
    "fgsm", "pgd7", "pgd20", "pgd40", "pgd100", "apgd-ce", "apgd-dlr", "deepfool_linf", "deepfool_l2", "spsa",
)
#: The audit's default suite (``audit --attacks default``), cheap → strong by measured strength per
#: pass (docs/attacks.md: FGSM > PGD(20) > APGD-CE (2 starts) > APGD-T(MALT, 5 targets) >
#: Square(750) is within one point of AutoAttack's worst case on every model measured, at 0.23×
#: its passes as a cascade on the 360-point digits models). PGD(20) is the only step-limited
#: member: the dataset's PGD step (digits 4/255 = 2.5·ε/20 at ε = 32/255, Madry et al.; CIFAR
#: 2/255 ≥ 2.5·(8/255)/20) lets its 20 steps cross the ε-ball, so a default audit never warns of
#: a short PGD. The masking check runs the attacks it needs beyond these itself (PGD(40/100),
#: SPSA, its own Square), the features stage replays PGD(20).
DEFAULT_ATTACKS: tuple[str, ...] = ("fgsm", "pgd20", "apgd-ce", "apgd-t", "square")
#: ``audit --attacks thorough``: every built-in (:data:`ATTACKS`, the old default list) plus APGD-T
#: and Square; AutoAttack is not in it (ask for ``autoattack`` by name).
THOROUGH_ATTACKS: tuple[str, ...] = (*ATTACKS, "apgd-t", "square")
#: Names that stand for a list of attacks in an ``attacks`` selection.
ATTACK_PRESETS: dict[str, tuple[str, ...]] = {"default": DEFAULT_ATTACKS, "thorough": THOROUGH_ATTACKS}


def expand_presets(attacks: Sequence[str]) -> list[str]:
    """``attacks`` with each preset name (:data:`ATTACK_PRESETS`) replaced by its attacks, first
    occurrences kept in order."""
    out: list[str] = []
    for a in attacks:
        for b in ATTACK_PRESETS.get(a, (a,)):
            if b not in out:
                out.append(b)
    return out


#: The built-in names accepted by :func:`run_suite` (``clean`` adds nothing: clean accuracy is
#: always there).
ATTACK_NAMES: tuple[str, ...] = ("clean", *ATTACKS)


def __getattr__(name: str) -> Any:
    """``CASCADE_ORDER``: the built-ins cheap → expensive, from the registry's ``cost``s."""
    if name == "CASCADE_ORDER":
        return tuple(attack_order(ATTACKS, cascade=True))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def threat_norm(name: str) -> str:
    """The norm of the registered attack ``name`` (``"l2"`` for deepfool_l2, ``"linf"`` for the
    other built-ins)."""
    return get_attack(name).norm


def _split(attacks: Sequence[str] | str) -> list[str]:
    if isinstance(attacks, str):
        return [a for a in attacks.replace(",", " ").split() if a]
    return list(attacks)


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
    pgd_alpha: float = SUITE_DEFAULTS["pgd_alpha"],
    spsa_iterations: int = SUITE_DEFAULTS["spsa_iterations"],
    spsa_samples: int = SUITE_DEFAULTS["spsa_samples"],
    spsa_max_batch: int = SUITE_DEFAULTS["spsa_max_batch"],
    deepfool_steps: int = SUITE_DEFAULTS["deepfool_steps"],
    deepfool_candidates: int = SUITE_DEFAULTS["deepfool_candidates"],
    deepfool_overshoot: float = SUITE_DEFAULTS["deepfool_overshoot"],
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

    The keyword defaults are :data:`~cure_eval.attacks.units.SUITE_SETTINGS`. The run is every
    unit of the plan (one chunk holding every point) into an in-memory store
    (:mod:`cure_eval.attacks.units`), exactly as a resumable audit runs them into its file store.
    """
    start = time.perf_counter()
    names = _split(attacks)
    attack_order(names, cascade=cascade)  # unknown names list the valid ones, before the inputs
    check_inputs(x, y, eps, batch_size)
    plan = make_plan(names, eps=eps, eps_l2=eps_l2, seed=seed, cascade=cascade, batch_size=batch_size,
                     configs=configs, pgd_alpha=pgd_alpha, spsa_iterations=spsa_iterations,
                     spsa_samples=spsa_samples, spsa_max_batch=spsa_max_batch, deepfool_steps=deepfool_steps,
                     deepfool_candidates=deepfool_candidates, deepfool_overshoot=deepfool_overshoot)
    n = len(x)
    ids = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if len(ids) != n:
        raise UsageError(f"got {len(ids)} indices for {n} points")
    x = x.detach().cpu()
    y = y.detach().cpu().long()
    store = MemoryStore()
    run_units(model, x, y, ids, plan, store, device=torch.device(device), progress=progress)
    return assemble(plan, store, y, ids, seconds=time.perf_counter() - start)


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
