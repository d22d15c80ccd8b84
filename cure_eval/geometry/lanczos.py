"""Lanczos for many points at once: concurrent ARPACK ``eigsh`` solves whose Hessian-vector
products share one batched forward/backward per round (used by
:func:`cure_eval.geometry.spectrum.curvature_profile`; the method is described there).

Not part of the public API.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

from ..errors import CureEvalError
from .hessian import BlockOperator

log = logging.getLogger("cure_eval.geometry.spectrum")

#: one round of products: ``[(point, block (d, m))]`` -> ``[A_point · block]`` in the same order
Compute = Callable[[list[tuple[int, np.ndarray]]], list[np.ndarray]]


@dataclass
class LanczosPoint:
    """The Lanczos result of one point (see :class:`~cure_eval.geometry.spectrum.PointSpectrum`)."""

    top: np.ndarray
    bottom: np.ndarray
    vector: np.ndarray
    residual: float
    rayleigh: float


class _Cancelled(Exception):
    pass


class HVPBatcher:
    """Rendezvous for concurrent ``eigsh`` solves: one batched HVP call per round.

    A round runs when every still-active client has posted its block of vectors; the last
    client to arrive computes the whole round (under the lock, in point order) and wakes the
    others. ``leave`` must be called by each client when it is done (it may complete a round).
    """

    def __init__(self, compute: Compute, n_clients: int) -> None:
        self._compute = compute
        self._cond = threading.Condition()
        self._active = n_clients
        self._pending: dict[int, np.ndarray] = {}
        self._results: dict[int, np.ndarray] = {}
        self._error: BaseException | None = None
        self.rounds = 0

    def request(self, client: int, block: np.ndarray) -> np.ndarray:
        with self._cond:
            if self._error is not None:
                raise _Cancelled() from self._error
            self._pending[client] = block
            self._maybe_run()
            while client not in self._results:
                if self._error is not None:
                    raise _Cancelled() from self._error
                self._cond.wait()
            return self._results.pop(client)

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._maybe_run()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def cancel(self, error: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()

    def _maybe_run(self) -> None:
        if not self._pending or len(self._pending) < self._active or self._error is not None:
            return
        batch = sorted(self._pending.items())
        self._pending.clear()
        try:
            outs = self._compute(batch)
        except BaseException as exc:  # propagate to every waiting client
            self._error = exc
            self._cond.notify_all()
            return
        self.rounds += 1
        for (client, _), out in zip(batch, outs, strict=True):
            self._results[client] = out
        self._cond.notify_all()


def arpack_is_reentrant() -> bool:
    """SciPy < 1.15 guards its Fortran ARPACK with a global lock: concurrent solves would deadlock."""
    try:
        from scipy.sparse.linalg._eigen.arpack import arpack as _arpack_module
    except ImportError:  # layout changed: assume the modern, per-call implementation
        return True
    return getattr(_arpack_module, "_ARPACK_LOCK", None) is None


def sym_rayleigh_ritz(
    apply: Callable[[np.ndarray], np.ndarray], vecs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigenpairs of ``sym(QᵀAQ)`` on the span of ``vecs``; returns (values asc, vectors, residuals)."""
    q, _ = np.linalg.qr(vecs)
    aq = apply(q)
    t = q.T @ aq
    t = 0.5 * (t + t.T)
    theta, s = np.linalg.eigh(t)
    ritz = q @ s
    res = np.linalg.norm(aq @ s - ritz * theta[None, :], axis=0)
    return theta, ritz, res


def lanczos_group(group: list[int], compute: Compute, *, d: int, k: int, tol: float, maxiter: int | None,
                  ncv: int | None, seed: int, bar: Any) -> dict[int, LanczosPoint]:
    """Run one ``eigsh(which='BE')`` per point of ``group`` concurrently over a shared batcher."""
    batcher = HVPBatcher(compute, len(group))
    errors: dict[int, BaseException] = {}
    results: dict[int, LanczosPoint] = {}

    def solve(i: int) -> None:
        try:
            def apply(block: np.ndarray) -> np.ndarray:
                return batcher.request(i, np.asarray(block, dtype=np.float64).reshape(d, -1))

            results[i] = _solve_point(i, apply, d=d, k=k, tol=tol, maxiter=maxiter, ncv=ncv, seed=seed)
        except _Cancelled:
            pass
        except BaseException as exc:
            errors[i] = exc
            batcher.cancel(exc)
        finally:
            batcher.leave()
            if bar is not None:
                bar.update(1)

    if len(group) == 1:
        solve(group[0])
    else:
        _run_threads(group, solve, batcher)
    _raise_first_error(group, errors, batcher.error)
    return results


def _solve_point(i: int, apply: Callable[[np.ndarray], np.ndarray], *, d: int, k: int, tol: float,
                 maxiter: int | None, ncv: int | None, seed: int) -> LanczosPoint:
    """``eigsh`` on point ``i``'s operator, then the symmetrised Rayleigh–Ritz refinement."""
    op = BlockOperator(d, apply)
    v0 = np.random.default_rng([seed, i]).standard_normal(d)
    try:
        _, vecs = eigsh(op, k=2 * k, which="BE", v0=v0, tol=tol, ncv=ncv,
                        maxiter=maxiter if maxiter is not None else 20 * d)
    except ArpackNoConvergence as exc:
        log.warning("point %d: eigsh converged for %d of %d eigenpairs; using those",
                    i, len(exc.eigenvalues), 2 * k)
        vecs = exc.eigenvectors
        if vecs.shape[1] == 0:
            raise CureEvalError(f"eigsh did not converge for point {i}: raise maxiter or tol") from exc
    theta, ritz, res = sym_rayleigh_ritz(apply, vecs)
    top = theta[::-1][:k]
    bottom = theta[:k]
    if len(theta) < 2 * k:  # partial convergence: pad with NaN
        top = np.pad(top, (0, k - len(top)), constant_values=np.nan)
        bottom = np.pad(bottom, (0, k - len(bottom)), constant_values=np.nan)
    v = ritz[:, -1] / np.linalg.norm(ritz[:, -1])
    return LanczosPoint(top=top.copy(), bottom=bottom.copy(), vector=v, residual=float(np.max(res)),
                        rayleigh=float(v @ apply(v[:, None])[:, 0]))


def _run_threads(group: list[int], solve: Callable[[int], None], batcher: HVPBatcher) -> None:
    threads = [threading.Thread(target=solve, args=(i,), daemon=True, name=f"eigsh-{i}") for i in group]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)
    except BaseException as exc:  # Ctrl-C in the main thread: release the workers
        batcher.cancel(exc)
        raise


def _raise_first_error(group: list[int], errors: dict[int, BaseException], failure: BaseException | None) -> None:
    if failure is not None and not isinstance(failure, Exception):
        raise failure  # KeyboardInterrupt / SystemExit inside a batched product
    if not errors and failure is not None:
        errors[group[0]] = failure
    if errors:
        first = errors[min(errors)]
        if isinstance(first, CureEvalError):
            raise first
        raise CureEvalError(f"curvature profile failed at point {min(errors)}: "
                            f"{type(first).__name__}: {first}") from first
