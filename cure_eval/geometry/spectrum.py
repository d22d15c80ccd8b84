"""Curvature profiles: eigenvalues of the input Hessian (CURE paper §2, Fig. 2, 9, 12).

For every point we compute

* the ``k`` largest and ``k`` smallest eigenvalues by Lanczos — SciPy's ARPACK ``eigsh`` with
  ``which="BE"`` on an :class:`~cure_eval.geometry.hessian.InputHessianOperator`, so both ends
  come from one Krylov run — followed by a symmetrised Rayleigh–Ritz refinement: with ``Q`` the
  orthonormalised Ritz vectors, the reported eigenpairs are those of ``sym(QᵀAQ)`` where
  ``sym(T) = (T + Tᵀ)/2``. For a symmetric operator this changes nothing; for the FD operator,
  which is symmetric only to ``O(h²)`` on smooth nets and only approximately on ReLU nets, it
  makes the reported values those of the symmetric part of the operator on that subspace, the
  same convention as the full spectrum below. The largest residual ``||Aq − θq||`` is reported.
* the full spectrum when ``d ≤ full_spectrum_max_dim`` (default 3072, a CIFAR image): the matrix
  from ``d`` batched HVPs against the identity, symmetrised, ``eigvalsh``.

ARPACK is a reverse-communication solver that asks for one vector at a time, so a single
``eigsh`` cannot batch. We batch *across points* instead: up to ``points_per_batch`` ``eigsh``
solves run in threads (current SciPy's ARPACK keeps its state per call; with an older SciPy that
still has a global ARPACK lock we fall back to one point at a time), and each round, when
every running solve is waiting for its next product, all requested vectors go through one
batched forward/backward (:mod:`cure_eval.geometry.lanczos`). Rounds are formed deterministically (sorted by point), so results do
not depend on thread timing.

The *sorted profile* of a set of points is the mean over points of each point's eigenvalues
sorted in descending order (the curves of Fig. 2).

**Lanczos and the full spectrum disagree on ReLU networks at finite h — by construction.** On a
smooth network with small ``h`` the FD operator is a symmetric matrix up to ``O(h²)`` and both
methods give the same numbers (the tests check agreement to 1e-8 against autograd's Hessian).
On a piecewise-linear network with the paper's finite ``h`` the FD operator
``v ↦ ||v||·(∇ℓ(x + hv̂) − ∇ℓ(x − hv̂))/2h`` is *not linear*: the full matrix probes it along
single pixels (steps of length ``h`` on one pixel), Lanczos along dense Krylov directions
(length ``h`` spread over all pixels), and the two see different parts of the landscape. On
the digits CNN at ``h = 0.5`` the mean Lanczos top eigenvalue is about 3× the top eigenvalue
of the symmetrised pixel-basis matrix, and Rayleigh–Ritz residuals are of the order of the
eigenvalues themselves. Both are reported: ``top``/``bottom`` (and ν, u for Theorem 1) from
Lanczos — curvature at scale ``h`` along dense directions, the kind of direction CURE
regularises — and ``full``/``sorted_profile`` from the pixel-basis matrix. The per-point
``lanczos_vs_full``, ``residual`` and ``rayleigh`` (``uᵀA(u)`` for the returned top vector)
quantify the gap; with ``scheme="exact"`` the two coincide (the Gauss-Newton matrix
``Jᵀ(diag p − ppᵀ)J``, rank ≤ classes − 1).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CureEvalError, UsageError
from ._util import check_batch, check_device, check_positive, eval_mode
from .hessian import Scheme, _check_scheme, _grads, _hvp_pairs
from .lanczos import arpack_is_reentrant, lanczos_group

log = logging.getLogger(__name__)


@dataclass
class PointSpectrum:
    """Curvature of one point. Eigenvalues in loss units per (ℓ2 pixel length)²."""

    index: int
    #: k largest eigenvalues, descending (Lanczos; from the full spectrum if Lanczos was skipped)
    top: np.ndarray
    #: k smallest eigenvalues, ascending (most negative first)
    bottom: np.ndarray
    #: unit eigenvector of the largest eigenvalue, flattened (d,)
    top_vector: np.ndarray
    #: all d eigenvalues, descending, when the full spectrum was computed
    full: np.ndarray | None
    #: Hessian-vector products spent on this point (Lanczos + refinement + full matrix)
    hvps: int
    #: wall time attributed to this point (batched work is split evenly), seconds
    seconds: float
    #: largest Rayleigh–Ritz residual ||Aq − θq|| among the reported Lanczos pairs (nan if none)
    residual: float = float("nan")
    #: max |Lanczos − full| over the top/bottom k, when both were computed
    lanczos_vs_full: float = float("nan")
    #: directional curvature ``uᵀA(u)`` along the returned top eigenvector, from one more
    #: product (equals ``top[0]`` when the operator is linear and symmetric; NaN without Lanczos)
    rayleigh: float = float("nan")


@dataclass
class CurvatureProfile:
    """Per-point spectra and their averages over points."""

    points: list[PointSpectrum]
    h: float
    scheme: str
    k: int
    dim: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def top_eigenvalues(self) -> np.ndarray:
        """Mean over points of the descending top-k vectors."""
        return np.mean(np.stack([p.top for p in self.points]), axis=0)

    @property
    def bottom_eigenvalues(self) -> np.ndarray:
        """Mean over points of the ascending bottom-k vectors."""
        return np.mean(np.stack([p.bottom for p in self.points]), axis=0)

    @property
    def sorted_profile(self) -> np.ndarray | None:
        """Mean over points of the descending full spectra (length d), or None."""
        if any(p.full is None for p in self.points):
            return None
        return np.mean(np.stack([p.full for p in self.points if p.full is not None]), axis=0)

    @property
    def lambda_max(self) -> np.ndarray:
        """ν = λ_max per point, shape (N,)."""
        return np.array([p.top[0] for p in self.points])

    @property
    def top_vectors(self) -> np.ndarray:
        """Top eigenvectors per point, shape (N, d)."""
        return np.stack([p.top_vector for p in self.points])

    @property
    def hvps(self) -> int:
        return int(sum(p.hvps for p in self.points))

    @property
    def seconds(self) -> float:
        return float(sum(p.seconds for p in self.points))

    def to_dict(self, *, per_point: bool = True) -> dict[str, Any]:
        n = len(self.points)
        out: dict[str, Any] = {
            "h": self.h, "scheme": self.scheme, "k": self.k, "dim": self.dim, "n_points": n,
            "top_eigenvalues": self.top_eigenvalues.tolist(),
            "bottom_eigenvalues": self.bottom_eigenvalues.tolist(),
            "sorted_profile": None if self.sorted_profile is None else self.sorted_profile.tolist(),
            "hvps": self.hvps, "hvps_per_point": self.hvps / n,
            "seconds": self.seconds, "seconds_per_point": self.seconds / n,
            "max_residual": float(np.nanmax([p.residual for p in self.points]))
            if any(math.isfinite(p.residual) for p in self.points) else None,
            "max_lanczos_vs_full": float(np.nanmax([p.lanczos_vs_full for p in self.points]))
            if any(math.isfinite(p.lanczos_vs_full) for p in self.points) else None,
            "mean_top_rayleigh": float(np.nanmean([p.rayleigh for p in self.points]))
            if any(math.isfinite(p.rayleigh) for p in self.points) else None,
            "settings": dict(self.settings),
        }
        if per_point:
            out["per_point"] = [
                {"index": p.index, "top": p.top.tolist(), "bottom": p.bottom.tolist(),
                 "hvps": p.hvps, "seconds": p.seconds, "residual": p.residual,
                 "lanczos_vs_full": p.lanczos_vs_full, "top_rayleigh": p.rayleigh}
                for p in self.points
            ]
        return out


def curvature_profile(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    h: float,
    k: int = 10,
    device: torch.device | str,
    scheme: Scheme = "central",
    lanczos: bool = True,
    full_spectrum: bool | None = None,
    full_spectrum_max_dim: int = 3072,
    tol: float = 1e-4,
    maxiter: int | None = None,
    ncv: int | None = None,
    points_per_batch: int = 16,
    chunk_size: int = 512,
    seed: int = 0,
    progress: bool = True,
) -> CurvatureProfile:
    """Top-k / bottom-k eigenvalues (Lanczos) and optionally the full spectrum, per point.

    Args:
        model: maps [0, 1] images to logits; measured in eval mode (caller's mode restored).
        x: points ``(N, C, H, W)`` in [0, 1]; y: labels ``(N,)``.
        h: ℓ2 length of the FD step in [0, 1] pixel space (see :mod:`.hessian`).
        k: eigenvalues reported at each end of the spectrum.
        device: where to compute; the model must already be there.
        scheme: ``central`` (default), ``forward`` (paper Eq. 1) or ``exact`` (double backprop).
        lanczos: run ``eigsh`` for the top/bottom k. When ``2k ≥ d − 1`` Lanczos is not
            applicable and the full spectrum is used instead.
        full_spectrum: build and diagonalise the full d×d matrix; ``None`` means
            ``d ≤ full_spectrum_max_dim``.
        tol: ARPACK relative tolerance on the Ritz values (FD products in float32 carry noise
            of roughly ``1e-7·||∇ℓ||/h``; asking for much less than 1e-5 only costs iterations).
        maxiter, ncv: passed to ``eigsh`` (defaults: ``20·d`` and ARPACK's own).
        points_per_batch: concurrent ``eigsh`` solves whose products share one batch.
        chunk_size: images per forward/backward.
        seed: seeds the ARPACK start vectors (point ``i`` uses ``seed`` and ``i``).
        progress: show a tqdm bar over points.

    Returns:
        :class:`CurvatureProfile` with per-point top/bottom eigenvalues, top eigenvector, full
        spectrum (optional), HVP counts and wall times.
    """
    plan = _plan(model, x, y, h=h, k=k, device=device, scheme=scheme, lanczos=lanczos, full_spectrum=full_spectrum,
                 full_spectrum_max_dim=full_spectrum_max_dim, points_per_batch=points_per_batch)
    n, dev = len(x), plan.device
    x, y = x.to(dev), y.to(dev)
    acc = _Spectra(n)
    with eval_mode(model):
        grad_x = _grads(model, x, y, chunk_size)[1] if scheme == "forward" else None
        products = _BatchedProducts(model, x, y, plan, chunk_size=chunk_size, grad_x=grad_x, hvps=acc.hvps)
        bar = tqdm(total=n, desc="curvature profile", unit="pt", disable=not progress, leave=False)
        try:
            if plan.lanczos:
                _lanczos_points(products, plan, acc, tol=tol, maxiter=maxiter, ncv=ncv, seed=seed,
                                bar=None if plan.full_spectrum else bar)
            if plan.full_spectrum:
                _full_spectra(products, plan, acc, bar=bar)
        finally:
            bar.close()
    prof = CurvatureProfile(points=acc.points(), h=float(plan.h), scheme=scheme, k=k, dim=plan.d, settings={
        "lanczos": plan.lanczos, "full_spectrum": plan.full_spectrum, "tol": tol, "maxiter": maxiter,
        "ncv": ncv, "points_per_batch": plan.points_per_batch, "seed": seed})
    log.info("curvature profile of %d points: %.1f HVPs/point, %.3f s/point, top-1 %.4g",
             n, prof.hvps / n, prof.seconds / n, float(prof.top_eigenvalues[0]))
    return prof


@dataclass
class _Plan:
    """The checked settings of one :func:`curvature_profile` call."""

    device: torch.device
    h: float
    scheme: Scheme
    k: int
    shape: tuple[int, ...]
    d: int
    lanczos: bool
    full_spectrum: bool
    points_per_batch: int


def _plan(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, h: float, k: int, device: torch.device | str,
          scheme: Scheme, lanczos: bool, full_spectrum: bool | None, full_spectrum_max_dim: int,
          points_per_batch: int) -> _Plan:
    """Check the arguments and decide what to compute (Lanczos, the full matrix, or both)."""
    _check_scheme(scheme)
    check_batch(x, y)
    if scheme != "exact":
        h = check_positive("h", h)
    if k < 1:
        raise UsageError(f"k must be at least 1, got {k}")
    if points_per_batch < 1:
        raise UsageError(f"points_per_batch must be at least 1, got {points_per_batch}")
    dev = check_device(model, device)
    shape = tuple(x.shape[1:])
    d = int(np.prod(shape))
    if full_spectrum is None:
        full_spectrum = d <= full_spectrum_max_dim
    if lanczos and 2 * k >= d - 1:
        log.info("2k = %d is too close to d = %d for Lanczos: using the full spectrum", 2 * k, d)
        lanczos, full_spectrum = False, True
    if not lanczos and not full_spectrum:
        raise UsageError("nothing to compute: enable lanczos or full_spectrum")
    if k > d:
        raise UsageError(f"k = {k} exceeds the input dimension {d}")
    if lanczos and points_per_batch > 1 and not arpack_is_reentrant():
        log.info("this SciPy's ARPACK is not re-entrant: running eigsh one point at a time")
        points_per_batch = 1
    return _Plan(device=dev, h=h, scheme=scheme, k=k, shape=shape, d=d, lanczos=lanczos,
                 full_spectrum=bool(full_spectrum), points_per_batch=points_per_batch)


class _Spectra:
    """Per-point results as they are computed (Lanczos and the full matrix fill them in)."""

    def __init__(self, n: int) -> None:
        self.tops: list[np.ndarray | None] = [None] * n
        self.bottoms: list[np.ndarray | None] = [None] * n
        self.vectors: list[np.ndarray | None] = [None] * n
        self.residuals = [float("nan")] * n
        self.rayleighs = [float("nan")] * n
        self.fulls: list[np.ndarray | None] = [None] * n
        self.hvps = [0] * n
        self.seconds = [0.0] * n
        self.diffs = [float("nan")] * n

    def points(self) -> list[PointSpectrum]:
        points = []
        for i in range(len(self.tops)):
            t, b, v = self.tops[i], self.bottoms[i], self.vectors[i]
            if t is None or b is None or v is None:
                raise CureEvalError(f"no eigenvalues for point {i}")
            points.append(PointSpectrum(index=i, top=t, bottom=b, top_vector=v, full=self.fulls[i],
                                        hvps=self.hvps[i], seconds=self.seconds[i], residual=self.residuals[i],
                                        lanczos_vs_full=self.diffs[i], rayleigh=self.rayleighs[i]))
        return points


class _BatchedProducts:
    """Hessian-vector products of many points in one batched call; counts them per point."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: _Plan, *, chunk_size: int,
                 grad_x: torch.Tensor | None, hvps: list[int]) -> None:
        self.model, self.x, self.y, self.plan = model, x, y, plan
        self.chunk_size, self.grad_x, self.hvps = chunk_size, grad_x, hvps

    def columns(self, pts: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        """``A_{pts[j]} dirs[j]`` for every row ``j`` (images of the input's shape)."""
        return _hvp_pairs(self.model, self.x, self.y, pts, dirs, h=self.plan.h, scheme=self.plan.scheme,
                          chunk_size=self.chunk_size, grad_x=self.grad_x)

    def __call__(self, batch: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        """One round of the Lanczos solves: ``[(point, block (d, m))]`` -> ``[A block]``."""
        pts, blocks = [], []
        for i, block in batch:
            pts.append(torch.full((block.shape[1],), i, dtype=torch.long))
            blocks.append(block.T)
            self.hvps[i] += block.shape[1]
        dev = self.plan.device
        dirs = torch.as_tensor(np.ascontiguousarray(np.concatenate(blocks)), device=dev)
        dirs = dirs.to(self.x.dtype).reshape(-1, *self.plan.shape)
        out = self.columns(torch.cat(pts).to(dev), dirs)
        flat = out.reshape(len(out), -1).double().cpu().numpy()
        res, s = [], 0
        for _, block in batch:
            res.append(flat[s:s + block.shape[1]].T)
            s += block.shape[1]
        return res


def _lanczos_points(products: _BatchedProducts, plan: _Plan, acc: _Spectra, *, tol: float, maxiter: int | None,
                    ncv: int | None, seed: int, bar: Any) -> None:
    """Top/bottom-k by Lanczos, ``points_per_batch`` points at a time."""
    n = len(acc.tops)
    for g0 in range(0, n, plan.points_per_batch):
        group = list(range(g0, min(n, g0 + plan.points_per_batch)))
        t0 = time.perf_counter()
        found = lanczos_group(group, products, d=plan.d, k=plan.k, tol=tol, maxiter=maxiter, ncv=ncv,
                              seed=seed, bar=bar)
        for i, r in found.items():
            acc.tops[i], acc.bottoms[i], acc.vectors[i] = r.top, r.bottom, r.vector
            acc.residuals[i], acc.rayleighs[i] = r.residual, r.rayleigh
        dt = (time.perf_counter() - t0) / len(group)
        for i in group:
            acc.seconds[i] += dt


def _full_spectra(products: _BatchedProducts, plan: _Plan, acc: _Spectra, *, bar: Any) -> None:
    """The full d×d matrix per point (d products against the identity), symmetrised, ``eigh``;
    compared with Lanczos when it ran, else the source of top/bottom-k and the top vector."""
    n, d, k, shape, x = len(acc.tops), plan.d, plan.k, plan.shape, products.x
    eye = torch.eye(d, dtype=x.dtype, device=plan.device).reshape(d, *shape)
    per_call = max(1, products.chunk_size // (2 * d))  # points whose d HVPs fit one chunk
    for g0 in range(0, n, per_call):
        group = list(range(g0, min(n, g0 + per_call)))
        t0 = time.perf_counter()
        pts = torch.arange(g0, g0 + len(group), device=plan.device).repeat_interleave(d)
        cols = products.columns(pts, eye.repeat(len(group), *([1] * len(shape))))
        mats = cols.reshape(len(group), d, d).transpose(1, 2).double()
        mats = 0.5 * (mats + mats.transpose(1, 2))
        evals, evecs = torch.linalg.eigh(mats)
        dt = (time.perf_counter() - t0) / len(group)
        for j, i in enumerate(group):
            spec = evals[j].flip(0).cpu().numpy()
            acc.fulls[i] = spec
            acc.hvps[i] += d
            acc.seconds[i] += dt
            if plan.lanczos:
                t, b = acc.tops[i], acc.bottoms[i]
                if t is None or b is None:
                    raise CureEvalError(f"no Lanczos eigenvalues for point {i}")
                acc.diffs[i] = float(max(np.max(np.abs(t - spec[:k])), np.max(np.abs(b - spec[::-1][:k]))))
            else:
                acc.tops[i] = spec[:k].copy()
                acc.bottoms[i] = spec[::-1][:k].copy()
                acc.vectors[i] = evecs[j, :, -1].cpu().numpy()
            bar.update(1)
