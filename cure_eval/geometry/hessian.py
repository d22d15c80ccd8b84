"""Hessian-vector products of the per-sample loss with respect to the *input* image.

Throughout, ``ℓ(x) = XEnt(f(x), y)`` is the cross-entropy of the true class of one image
``x ∈ [0, 1]^{C×H×W}`` (CURE paper, Moosavi-Dezfooli et al. 2019, §2), and ``H = ∇²_x ℓ(x)`` its
``d × d`` input Hessian (``d = C·H·W``). Three ways to apply ``H`` to a direction ``v``:

* ``"forward"`` — the paper's finite difference, Eq. (1): ``Hv ≈ (∇ℓ(x + h v̂) − ∇ℓ(x)) / h``;
* ``"central"`` (default) — ``Hv ≈ (∇ℓ(x + h v̂) − ∇ℓ(x − h v̂)) / (2h)``; error ``O(h²)``
  instead of ``O(h)`` on smooth networks;
* ``"exact"`` — double backpropagation, ``∇_x (∇_x ℓ · v)``; ignores ``h``.

**Units of h.** The step is always ``h·v̂`` with ``v̂ = v/||v||₂`` and the result is scaled
back by ``||v||₂``, i.e. ``Hv ≈ ||v|| · (∇ℓ(x + h v̂) − ∇ℓ(x − h v̂)) / (2h)``. So ``h`` is the ℓ2
length of the step in [0, 1] pixel space, whatever the norm of ``v`` (the unit used by
:class:`cure_eval.data.DatasetSpec.default_h` and by the CURE regulariser, where ``z`` is a unit
vector). Units of the result: loss per (pixel-space ℓ2 length)², times the units of ``v``.

**What the finite-difference operator is.** With finite ``h`` it measures the variation of the
gradient over a segment of length ``2h`` (``h`` for forward), the paper's "larger-scale"
curvature: ``(1/2h)∫_{−h}^{h} H(x + t v̂) v dt``. On a smooth network it equals ``Hv + O(h²)``
(central). On a piecewise-linear (ReLU) network the exact Hessian is ``Jᵀ(diag p − ppᵀ)J``
(rank ≤ classes − 1) and the FD operator differs from it as soon as the segment crosses an
activation boundary; it is then neither exactly linear in ``v`` nor exactly symmetric (see
:mod:`cure_eval.geometry.spectrum` for how eigen-solvers deal with that).

**Batching.** All functions take many (point, direction) pairs at once, build the perturbed
copies and push them through the network in chunks of ``chunk_size`` images: one forward and
one backward per chunk. Per-sample gradients come from the gradient of the *summed* loss, which
is exact only when the network treats samples independently — true in eval mode (BatchNorm uses
running statistics), which every function here enforces.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator
from torch import nn

from ..errors import UsageError
from ._util import check_batch, check_device, check_positive, eval_mode

log = logging.getLogger(__name__)

Scheme = Literal["central", "forward", "exact"]
SCHEMES: tuple[str, ...] = ("central", "forward", "exact")

#: Gradient evaluations (forward+backward of one image) per HVP, by scheme. ``exact`` is one
#: double backward, roughly the cost of two gradient evaluations.
GRADIENT_EVALS_PER_HVP = {"central": 2.0, "forward": 1.0, "exact": 2.0}


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise UsageError(f"unknown HVP scheme {scheme!r}: use one of {', '.join(SCHEMES)}")


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the true class for every sample, shape ``(N,)`` (nats)."""
    return F.cross_entropy(model(x), y, reduction="none")


def _grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses and input gradients, chunked. Model must already be in eval mode."""
    losses, grads = [], []
    for s in range(0, len(x), chunk_size):
        xb = x[s:s + chunk_size].detach().requires_grad_(True)
        with torch.enable_grad():
            loss = per_sample_loss(model, xb, y[s:s + chunk_size])
            (g,) = torch.autograd.grad(loss.sum(), xb)
        losses.append(loss.detach())
        grads.append(g.detach())
    return torch.cat(losses), torch.cat(grads)


def input_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device | str,
    chunk_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss ``ℓ(x)`` (nats, shape ``(N,)``) and input gradient ``∇ℓ(x)`` (``x``'s shape).

    Evaluated in eval mode (the caller's mode is restored); tensors are returned on ``device``.
    """
    check_batch(x, y)
    dev = check_device(model, device)
    with eval_mode(model):
        return _grads(model, x.to(dev), y.to(dev), chunk_size)


def _hvp_pairs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    point: torch.Tensor,
    dirs: torch.Tensor,
    *,
    h: float,
    scheme: str,
    chunk_size: int,
    grad_x: torch.Tensor | None = None,
) -> torch.Tensor:
    """``H(x[point[j]]) dirs[j]`` for every pair ``j``; shape of ``dirs``.

    Model in eval mode and every tensor on the model's device (the caller ensures both).
    ``grad_x`` (gradients at the points) is only used by the forward scheme.
    """
    m = len(dirs)
    shape = x.shape[1:]
    flat = dirs.reshape(m, -1)
    out = torch.zeros_like(dirs)
    if m == 0:
        return out
    if scheme == "exact":
        for s in range(0, m, chunk_size):
            idx = point[s:s + chunk_size]
            xb = x[idx].detach().requires_grad_(True)
            vb = dirs[s:s + chunk_size]
            with torch.enable_grad():
                loss = per_sample_loss(model, xb, y[idx]).sum()
                (g,) = torch.autograd.grad(loss, xb, create_graph=True)
                if not g.requires_grad:  # the loss is (locally) linear in x: H = 0
                    continue
                (hv,) = torch.autograd.grad((g * vb).sum(), xb, allow_unused=True)
            if hv is not None:
                out[s:s + chunk_size] = hv.detach()
        return out
    norms = flat.norm(dim=1)
    nonzero = norms > 0
    unit = dirs / torch.where(nonzero, norms, torch.ones_like(norms)).view(m, *([1] * len(shape)))
    if scheme == "forward":
        if grad_x is None:
            _, grad_x = _grads(model, x, y, chunk_size)
        step = max(1, chunk_size)
        for s in range(0, m, step):
            idx = point[s:s + step]
            _, gp = _grads(model, x[idx] + h * unit[s:s + step], y[idx], chunk_size)
            out[s:s + step] = (gp - grad_x[idx]) / h
    else:  # central: the +h and −h copies of a pair share one chunk
        step = max(1, chunk_size // 2)
        for s in range(0, m, step):
            idx = point[s:s + step]
            u = unit[s:s + step]
            xb = torch.cat([x[idx] + h * u, x[idx] - h * u])
            _, g = _grads(model, xb, y[idx].repeat(2), len(xb))
            k = len(idx)
            out[s:s + step] = (g[:k] - g[k:]) / (2.0 * h)
    scale = torch.where(nonzero, norms, torch.zeros_like(norms)).view(m, *([1] * len(shape)))
    return out * scale


def input_hvp(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    v: torch.Tensor,
    *,
    h: float,
    scheme: Scheme = "central",
    device: torch.device | str,
    chunk_size: int = 512,
    grad_x: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batched input Hessian-vector products ``H(x_i) v_ik`` for N points × K directions.

    Args:
        model: maps [0, 1] images to logits; evaluated in eval mode (caller's mode restored).
        x: points, shape ``(N, C, H, W)`` (any ``(N, *S)``), [0, 1] pixel space.
        y: true labels, shape ``(N,)``.
        v: directions, shape ``(N, K, *S)``; any norm (see the module docstring: the FD step is
            ``h·v/||v||`` and the result is scaled by ``||v||``, so the map is homogeneous).
        h: ℓ2 length of the finite-difference step in [0, 1] pixel space (ignored by ``exact``).
        scheme: ``central`` (default), ``forward`` (paper Eq. 1) or ``exact`` (double backprop).
        device: where to compute; the model must already be there.
        chunk_size: images per forward/backward pass.
        grad_x: optional precomputed ``∇ℓ(x)`` (forward scheme only; saves N gradient evals).

    Returns:
        ``(N, K, *S)`` tensor on ``device``, detached. Costs ``N·K`` HVPs, i.e. ``2·N·K``
        gradient evaluations for ``central``, ``N·K + N`` for ``forward``.
    """
    _check_scheme(scheme)
    check_batch(x, y)
    if scheme != "exact":
        h = check_positive("h", h)
    if v.ndim != x.ndim + 1 or v.shape[0] != x.shape[0] or v.shape[2:] != x.shape[1:]:
        raise UsageError(f"directions must have shape (N, K, *x.shape[1:]), got {tuple(v.shape)} for x {tuple(x.shape)}")
    dev = check_device(model, device)
    n, k = v.shape[:2]
    x, y = x.to(dev), y.to(dev)
    dirs = v.to(device=dev, dtype=x.dtype).reshape(n * k, *x.shape[1:])
    point = torch.arange(n, device=dev).repeat_interleave(k)
    with eval_mode(model):
        out = _hvp_pairs(model, x, y, point, dirs, h=h, scheme=scheme, chunk_size=chunk_size,
                         grad_x=None if grad_x is None else grad_x.to(dev))
    return out.reshape(v.shape)


def hvp_jvp(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *, device: torch.device | str
) -> torch.Tensor:
    """Exact HVP of ONE point and ONE direction by forward-over-reverse ``jvp(grad(ℓ))``.

    ``x`` and ``v`` have shape ``(C, H, W)``; ``y`` is a 0-d label tensor. This is the
    unbatched reference that ``benchmarks/bench_geometry.py`` compares the batched finite
    differences against (it is slow on CPU: one call per vector).
    """
    from torch.func import grad, jvp

    dev = check_device(model, device)
    x, y, v = x.to(dev), y.to(dev).reshape(1), v.to(device=dev, dtype=x.dtype)

    def loss(xi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(xi[None]), y)

    with eval_mode(model):
        out = jvp(grad(loss), (x,), (v,))
    return out[1].detach()


def input_hessian_matrix(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    h: float,
    scheme: Scheme = "central",
    device: torch.device | str,
    symmetrize: bool = True,
    chunk_size: int = 512,
) -> torch.Tensor:
    """The full ``d × d`` input Hessian of every point, from ``d`` batched HVPs against ``I``.

    Column ``j`` is ``H e_j`` (a finite difference along pixel ``j`` for the FD schemes). The FD
    matrix is not exactly symmetric; with ``symmetrize`` (default) the result is ``(A + Aᵀ)/2``,
    the symmetric matrix closest to ``A`` in Frobenius norm, whose eigenvalues are the curvature
    profile. Shape ``(N, d, d)``, dtype of ``x``, on ``device``. Costs ``N·d`` HVPs.
    """
    check_batch(x, y)
    n = len(x)
    d = int(np.prod(x.shape[1:]))
    eye = torch.eye(d, dtype=x.dtype, device=x.device).reshape(1, d, *x.shape[1:])
    cols = input_hvp(model, x, y, eye.expand(n, d, *x.shape[1:]), h=h, scheme=scheme,
                     device=device, chunk_size=chunk_size)
    a = cols.reshape(n, d, d).transpose(1, 2)  # a[:, :, j] = H e_j
    if symmetrize:
        a = 0.5 * (a + a.transpose(1, 2))
    return a.contiguous()


class BlockOperator(LinearOperator):
    """A float64 SciPy operator defined by a block map ``(d, m) -> (d, m)``; counts products."""

    def __init__(self, d: int, apply: Callable[[np.ndarray], np.ndarray]) -> None:
        super().__init__(dtype=np.dtype(np.float64), shape=(d, d))
        self._apply = apply
        self.n_hvps = 0

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X[:, None]
        self.n_hvps += X.shape[1]
        return self._apply(X)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.asarray(x).reshape(-1, 1))[:, 0]


class InputHessianOperator(BlockOperator):
    """The input Hessian of one point as a SciPy :class:`~scipy.sparse.linalg.LinearOperator`.

    ``matvec`` is one HVP; ``matmat`` pushes all columns through one batched forward/backward
    (used by block methods such as ``lobpcg`` and by the Rayleigh–Ritz refinement in
    :func:`cure_eval.geometry.curvature_profile`; ARPACK's ``eigsh`` itself asks for one vector
    at a time). Float64 on the SciPy side; the network runs in the dtype of ``x``.
    ``n_hvps`` counts the products applied so far.

    Symmetry: with ``central`` and a smooth network the operator is symmetric to ``O(h²)``; on
    ReLU networks the FD operator is only approximately symmetric (and linear), and Lanczos
    then returns Ritz values of what it sees on its Krylov vectors — refine them with a
    symmetrised Rayleigh–Ritz step as ``curvature_profile`` does.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        h: float,
        scheme: Scheme = "central",
        device: torch.device | str,
        chunk_size: int = 512,
    ) -> None:
        _check_scheme(scheme)
        if x.ndim >= 2 and x.shape[0] == 1:
            x = x[0]
        self.sample_shape = tuple(x.shape)
        dev = check_device(model, device)
        xb = x.reshape(1, *self.sample_shape).to(dev)
        yb = y.reshape(1).to(dev)
        step = check_positive("h", h) if scheme != "exact" else float(h)
        grad_x = None
        if scheme == "forward":
            with eval_mode(model):
                _, grad_x = _grads(model, xb, yb, 1)

        def apply(cols: np.ndarray) -> np.ndarray:
            k = cols.shape[1]
            dirs = torch.as_tensor(np.ascontiguousarray(cols.T), device=dev).to(xb.dtype)
            dirs = dirs.reshape(k, *self.sample_shape)
            with eval_mode(model):
                out = _hvp_pairs(model, xb, yb, torch.zeros(k, dtype=torch.long, device=dev), dirs,
                                 h=step, scheme=scheme, chunk_size=chunk_size, grad_x=grad_x)
            return out.reshape(k, -1).double().cpu().numpy().T

        super().__init__(int(np.prod(self.sample_shape)), apply)
