"""Theorem 1 of the CURE paper (§3): bounds on the minimal perturbation from the curvature.

Setting. Under the quadratic model ``ℓ(x + r) ≈ ℓ(x) + gᵀr + ½ rᵀHr`` with ``g = ∇ℓ(x)``,
``r* = argmin ||r||₂ s.t. ℓ(x) + gᵀr + ½ rᵀHr ≥ t``. With ``c = t − ℓ(x) ≥ 0``, ``ν = λ_max(H)``
and ``u`` its unit eigenvector, Theorem 1 states (Eq. 2, 3)::

    (||g||/ν)(sqrt(1 + 2νc/||g||²) − 1)  ≤  ||r*||  ≤  (|gᵀu|/ν)(sqrt(1 + 2νc/(gᵀu)²) − 1)

Both sides are ``α(a) = min{α ≥ 0 : aα + ½να² ≥ c}`` with ``a = ||g||`` (lower: no direction
gains more than ``||g||α + ½να²`` at radius α) and ``a = |gᵀu|`` (upper: the step ``±αu``
reaches the threshold). We evaluate ``α(a)`` in the cancellation-free form
``2c / (a + sqrt(a² + 2νc))``, equal to the paper's for ``ν > 0``.

Edge cases, handled explicitly (``case`` per point):

* ``beyond`` — ``c ≤ 0``: ``ℓ(x) ≥ t`` already, so ``r* = 0`` and both bounds are 0.
* ``convex`` — ``ν > 0``: Eq. (2), (3) as stated.
* ``flat`` — ``ν = 0``: the linear limit, ``c/||g|| ≤ ||r*|| ≤ c/|gᵀu|`` (the ``ν → 0`` limit of
  both formulas); ``+inf`` where the corresponding slope is 0.
* ``concave`` — ``ν < 0`` (outside the theorem's assumption): the same two arguments still hold
  because ``rᵀHr ≤ ν||r||²`` and the step along ``u`` is exact, so we keep ``α(a)`` with ``ν < 0``.
  It is ≥ the linear limit ``c/||g||`` (reported separately as ``linear``), which would also be a
  valid but looser lower bound; the linear ``c/|gᵀu|`` would *not* be a valid upper bound here.
  When ``a² + 2νc < 0`` the quadratic model never reaches ``t`` along the bounding direction and
  the bound is ``+inf``.

Multi-class reading. ``ℓ`` is the cross-entropy of the true class, ``ℓ = −log p_y``, and
``t = log 2``: ``ℓ < log 2 ⇔ p_y > 1/2``, which implies that ``x`` is classified as ``y``
(sufficient, not necessary, with more than two classes). So ``{ℓ = t}`` lies inside the true
class region and the quadratic-model ``||r*||`` estimates the distance to the *threshold*, which
is at most the distance to the decision boundary; the measured DeepFool norm can legitimately
exceed the upper bound. Points correctly classified with ``p_y ≤ 1/2`` have ``c ≤ 0`` (case
``beyond``). Binary classification (the paper's setting) is exact.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ._util import as_numpy, check_batch, check_device, eval_mode
from .hessian import _grads

log = logging.getLogger(__name__)

#: Loss threshold: cross-entropy at p_y = 1/2 (nats).
LOG2 = math.log(2.0)


def threshold_distance(a: np.ndarray | float, nu: np.ndarray | float, c: np.ndarray | float) -> np.ndarray:
    """``min{α ≥ 0 : aα + ½να² ≥ c}`` elementwise (``a ≥ 0``); ``+inf`` when unreachable.

    Units: ``a`` loss per pixel-space ℓ2 length, ``ν`` loss per length², ``c`` loss; the result
    is an ℓ2 length in [0, 1] pixel space.
    """
    a_, nu_, c_ = np.broadcast_arrays(np.abs(np.asarray(a, dtype=np.float64)),
                                      np.asarray(nu, dtype=np.float64),
                                      np.asarray(c, dtype=np.float64))
    out = np.full(a_.shape, np.inf)
    done = c_ <= 0
    out[done] = 0.0
    disc = a_ * a_ + 2.0 * nu_ * c_
    ok = ~done & (disc >= 0)
    denom = a_ + np.sqrt(np.where(ok, disc, 0.0))
    ok &= denom > 0
    out[ok] = 2.0 * c_[ok] / denom[ok]
    return out


def theorem1_bounds(
    *,
    grad_norm: np.ndarray | float,
    grad_dot_u: np.ndarray | float,
    nu: np.ndarray | float,
    c: np.ndarray | float,
) -> dict[str, np.ndarray]:
    """Lower (Eq. 2) and upper (Eq. 3) bounds on ``||r*||`` elementwise, with the edge cases.

    Args:
        grad_norm: ``||∇ℓ(x)||₂``.
        grad_dot_u: ``∇ℓ(x)ᵀu`` with ``u`` the unit top eigenvector (sign irrelevant).
        nu: ``λ_max(H)``.
        c: ``t − ℓ(x)``.

    Returns:
        ``lower``, ``upper``, ``linear`` (``c/||g||``, the ``ν = 0`` lower bound) and ``case``
        (``beyond``, ``convex``, ``flat``, ``concave``), as arrays.
    """
    g, gu, nu_, c_ = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64)
                                           for v in (grad_norm, grad_dot_u, nu, c)))
    lower = threshold_distance(g, nu_, c_)
    upper = threshold_distance(np.abs(gu), nu_, c_)
    with np.errstate(divide="ignore", invalid="ignore"):
        linear = np.where(c_ <= 0, 0.0, np.where(g > 0, c_ / np.where(g > 0, g, 1.0), np.inf))
    case = np.where(c_ <= 0, "beyond", np.where(nu_ > 0, "convex", np.where(nu_ == 0, "flat", "concave")))
    return {"lower": lower, "upper": upper, "linear": linear, "case": case}


def theorem1_points(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    nu: np.ndarray | torch.Tensor,
    u: np.ndarray | torch.Tensor,
    device: torch.device | str,
    t: float = LOG2,
    chunk_size: int = 512,
) -> dict[str, Any]:
    """Theorem 1 bounds for real points, from their gradient and a top eigenpair (ν, u).

    ``nu`` (shape ``(N,)``) and ``u`` (``(N, d)``) come from
    :func:`cure_eval.geometry.curvature_profile` (the FD Hessian at step ``h``; the bounds then
    describe the quadratic model at that scale). ``g`` and ``ℓ(x)`` are exact (autograd), in eval
    mode. Returns per-point arrays ``loss``, ``c``, ``grad_norm``, ``grad_dot_u``, ``alignment``,
    ``nu``, ``lower``, ``upper``, ``linear``, ``case`` (see the module docstring).
    """
    check_batch(x, y)
    dev = check_device(model, device)
    with eval_mode(model):
        loss, grad = _grads(model, x.to(dev), y.to(dev), chunk_size)
    g = grad.reshape(len(x), -1).double().cpu().numpy()
    uu = as_numpy(u).reshape(len(x), -1)
    uu = uu / np.linalg.norm(uu, axis=1, keepdims=True)
    nu_ = as_numpy(nu).reshape(-1)
    gnorm = np.linalg.norm(g, axis=1)
    gu = np.sum(g * uu, axis=1)
    c = t - loss.double().cpu().numpy()
    res: dict[str, Any] = theorem1_bounds(grad_norm=gnorm, grad_dot_u=gu, nu=nu_, c=c)
    with np.errstate(invalid="ignore", divide="ignore"):
        align = np.where(gnorm > 0, np.abs(gu) / np.where(gnorm > 0, gnorm, 1.0), np.nan)
    res.update({"loss": loss.double().cpu().numpy(), "c": c, "grad_norm": gnorm, "grad_dot_u": gu,
                "alignment": align, "nu": nu_, "t": t})
    return res
