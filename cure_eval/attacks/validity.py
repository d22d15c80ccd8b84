"""Validity of adversarial points: every point an attack returns lies in its ε-ball and in [0, 1].

An attack that returns points outside its threat model would silently inflate its success rate;
the suite runs :func:`check_adversarial` on every attack's output (and on the PGD family's best
iterates), with the slack :data:`EPS_TOL`.
"""

from __future__ import annotations

import torch

from ..errors import CureEvalError, UsageError

#: Slack allowed when checking that adversarial points lie in the ε-ball and in [0, 1].
EPS_TOL = 1e-5


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


def check_inputs(x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int) -> None:
    """Refuse inputs the suite cannot measure: not a float batch in [0, 1], labels of another
    length, ε outside (0, 1], a batch size below 1."""
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
