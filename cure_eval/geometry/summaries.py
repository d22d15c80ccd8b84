"""Cheap curvature summaries (CURE paper Fig. 10 and 14, Remark 3).

* ``||Hz||`` along the CURE direction ``z = sign(∇ℓ)/||sign(∇ℓ)||₂`` (paper §4, the quantity the
  regulariser penalises, up to the factor ``h``);
* the Frobenius norm ``||H||_F = sqrt(E_z ||Hz||²)``, ``z ~ N(0, I_d)``, estimated with
  ``n_gaussian`` draws per point (the paper uses 100). Each draw is unbiased for
  ``||H||_F²``; the estimate's relative standard deviation is ``sqrt(2 Σλ⁴)/Σλ²/sqrt(n)``
  for the squared norm, at most ``sqrt(2/n)`` (14 % for ``n = 100``, about half that for the
  norm itself);
* the alignment ``|∇ℓᵀu|/||∇ℓ||`` between the gradient and the top eigenvector (Remark 3:
  0.43 before and 0.90 after adversarial fine-tuning on CIFAR-10; ≈ 1/sqrt(d) for random
  directions).

All products use the batched HVPs of :mod:`cure_eval.geometry.hessian`: the FD step is
``h·ẑ`` (``h`` = ℓ2 length in [0, 1] pixel space) and ``Hz = ||z||·FD(ẑ)``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ._util import check_batch, check_device, check_positive, eval_mode, generator
from .hessian import Scheme, _check_scheme, _grads, _hvp_pairs

log = logging.getLogger(__name__)


def cure_direction(grad: torch.Tensor) -> torch.Tensor:
    """``z = sign(g) / ||sign(g)||₂`` per sample, detached (zero where the gradient is zero):
    CURE's direction, used by the regulariser (:mod:`cure_eval.training.cure`) and measured here."""
    s = torch.sign(grad.detach())
    norm = s.flatten(1).norm(dim=1).clamp_min(1e-12)
    return s / norm.view(-1, *([1] * (s.dim() - 1)))


def gradient_alignment(grad: torch.Tensor | np.ndarray, u: torch.Tensor | np.ndarray) -> np.ndarray:
    """``|gᵀu| / (||g||·||u||)`` per row (Remark 3); NaN where ``g = 0``. Shape ``(N,)``."""
    g = np.asarray(grad.detach().cpu().double() if isinstance(grad, torch.Tensor) else grad,
                   dtype=np.float64).reshape(len(grad), -1)
    v = np.asarray(u.detach().cpu().double() if isinstance(u, torch.Tensor) else u,
                   dtype=np.float64).reshape(len(u), -1)
    num = np.abs(np.sum(g * v, axis=1))
    den = np.linalg.norm(g, axis=1) * np.linalg.norm(v, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def curvature_summaries(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    h: float,
    n_gaussian: int = 100,
    device: torch.device | str,
    scheme: Scheme = "central",
    chunk_size: int = 1024,
    seed: int = 0,
) -> dict[str, Any]:
    """``||Hz||`` (CURE direction) and the Frobenius estimate on a small probe batch.

    Cheap enough to log every epoch: one batched call of ``N·(1 + n_gaussian)`` HVPs, i.e.
    ``N·(2·n_gaussian + 3)`` gradient evaluations with the central scheme (``N·(n_gaussian +
    2)`` with ``forward``, the paper's Eq. 1). The model is measured in eval mode and the
    caller's mode is restored; the Gaussian draws come from a CPU generator seeded by ``seed``,
    so the probe is identical every epoch and on every device.

    Args:
        model: maps [0, 1] images to logits.
        x, y: probe batch ``(N, C, H, W)`` in [0, 1] and labels ``(N,)``.
        h: ℓ2 length of the FD step in [0, 1] pixel space (ignored by ``scheme='exact'``).
        n_gaussian: Gaussian draws per point for the Frobenius estimate (0 skips it).
        device: where to compute; the model must already be there.
        scheme: ``central`` (default), ``forward`` or ``exact``.
        chunk_size: images per forward/backward.
        seed: seed of the Gaussian draws.

    Returns:
        ``hz_norm`` (mean over points of ``||Hz||``), ``frobenius`` (mean over points of the
        per-point estimate of ``||H||_F``; NaN if ``n_gaussian = 0``), ``hz_norm_per_point``,
        ``frobenius_per_point`` (lists), ``loss`` (mean clean loss), ``hvps`` and ``seconds``.
        Units: loss per (ℓ2 pixel length)².
    """
    _check_scheme(scheme)
    check_batch(x, y)
    if scheme != "exact":
        h = check_positive("h", h)
    if n_gaussian < 0:
        raise UsageError(f"n_gaussian must be >= 0, got {n_gaussian}")
    dev = check_device(model, device)
    t0 = time.perf_counter()
    n = len(x)
    shape = tuple(x.shape[1:])
    x, y = x.to(dev), y.to(dev)
    with eval_mode(model):
        loss, grad_x = _grads(model, x, y, chunk_size)
        z = cure_direction(grad_x)
        gauss = torch.randn(n, n_gaussian, *shape, generator=generator(seed), dtype=torch.float64)
        dirs = torch.cat([z[:, None], gauss.to(device=dev, dtype=x.dtype)], dim=1)
        kk = 1 + n_gaussian
        point = torch.arange(n, device=dev).repeat_interleave(kk)
        hv = _hvp_pairs(model, x, y, point, dirs.reshape(n * kk, *shape), h=h, scheme=scheme,
                        chunk_size=chunk_size, grad_x=grad_x)
    sq = hv.reshape(n, kk, -1).double().pow(2).sum(dim=2)
    hz = sq[:, 0].sqrt()
    fro = sq[:, 1:].mean(dim=1).sqrt() if n_gaussian > 0 else torch.full((n,), float("nan"))
    out = {
        "hz_norm": float(hz.mean()),
        "frobenius": float(fro.mean()),
        "hz_norm_per_point": hz.cpu().tolist(),
        "frobenius_per_point": fro.cpu().tolist(),
        "loss": float(loss.mean()),
        "hvps": n * kk,
        "seconds": time.perf_counter() - t0,
    }
    log.debug("curvature summaries on %d points: ||Hz|| %.4g, ||H||_F %.4g (%.2f s)",
              n, out["hz_norm"], out["frobenius"], out["seconds"])
    return out
