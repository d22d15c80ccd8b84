"""Loss surface and decision regions in a normal cross-section (CURE paper Fig. 1, 3, 8, 13).

The plane through a data point ``x`` is spanned by

* ``r̂`` — the unit DeepFool ℓ2 direction (normal to the decision boundary at the closest
  boundary point found); the boundary then crosses the ``a`` axis near ``a = ||r_DF||``;
* ``v̂`` — a Gaussian direction (seeded) orthogonalised against ``r̂`` and normalised.

Grid point ``(a, b)`` is ``x + a·r̂ + b·v̂``; ``a``, ``b`` are ℓ2 lengths in [0, 1] pixel space.
The grid is *not* clipped to [0, 1]: clipping would bend the plane, and the model is defined
everywhere. If DeepFool finds no direction (point misclassified clean, or attack failure), ``r̂``
falls back to the normalised input gradient (the direction in which the loss rises fastest) and
``boundary_distance`` is NaN.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ._util import check_device, eval_mode, generator
from .deepfool import deepfool_l2
from .hessian import _grads

log = logging.getLogger(__name__)


@dataclass
class LossPlane:
    """Loss and prediction on a grid in the (r, v) plane of one point."""

    #: coordinates along r̂ and v̂ (ℓ2 pixel length), shapes (steps,)
    a: np.ndarray
    b: np.ndarray
    #: loss[i, j] = ℓ(x + a[j] r̂ + b[i] v̂) (nats); pred[i, j] its predicted class
    loss: np.ndarray
    pred: np.ndarray
    label: int
    #: DeepFool ||r|| (NaN if DeepFool gave no direction)
    boundary_distance: float
    #: the two unit directions, flattened (d,)
    r: np.ndarray
    v: np.ndarray
    num_classes: int
    index: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"index": self.index, "label": self.label, "boundary_distance": self.boundary_distance,
                "radius": float(np.max(np.abs(self.a))), "steps": len(self.a),
                "loss_at_center": float(self.loss[len(self.b) // 2, len(self.a) // 2]),
                "fraction_true_class": float(np.mean(self.pred == self.label))}


def loss_plane(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | int,
    *,
    device: torch.device | str,
    r: torch.Tensor | None = None,
    radius: float | None = None,
    steps: int = 41,
    seed: int = 0,
    chunk_size: int = 1024,
    index: int = 0,
) -> LossPlane:
    """Evaluate loss and prediction on a ``steps × steps`` grid of the (r, v) plane of one point.

    Args:
        model: maps [0, 1] images to logits; eval mode (caller's mode restored).
        x: one image ``(C, H, W)`` or ``(1, C, H, W)``; y: its label.
        device: where to compute; the model must already be there.
        r: boundary-normal direction (any norm); default: foolbox DeepFool ℓ2 (its perturbation).
        radius: half-width of the grid in ℓ2 pixel length; default ``2·||r_DF||`` (1.0 if
            DeepFool gave no direction).
        steps: grid points per axis (odd, so the data point is a grid point at the centre).
        seed: seeds the random direction v.
        chunk_size: grid points per forward pass (the grid is evaluated batched, no gradients).
    """
    if steps < 3 or steps % 2 == 0:
        raise UsageError(f"steps must be odd and >= 3, got {steps}")
    dev = check_device(model, device)
    xb = (x if x.ndim == 4 else x[None]).to(dev)
    yb = torch.as_tensor(y).reshape(1).to(device=dev, dtype=torch.long)
    shape = tuple(xb.shape[1:])
    d = int(np.prod(shape))
    dist = float("nan")
    if r is None:
        df = deepfool_l2(model, xb, yb, device=dev)
        if bool(df.success[0]) and bool(df.clean_correct[0]) and float(df.norm[0]) > 0:
            r = df.delta[0]
            dist = float(df.norm[0])
    else:
        dist = float(r.reshape(-1).norm())
    if r is None or float(r.reshape(-1).norm()) == 0:
        log.info("point %d: no DeepFool direction, using the input gradient for r", index)
        with eval_mode(model):
            _, g = _grads(model, xb, yb, 1)
        r = g[0]
        dist = float("nan")
        if float(r.reshape(-1).norm()) == 0:
            r = torch.randn(shape, generator=generator(seed + 1), dtype=torch.float64)
    rf = r.reshape(-1).to(torch.float64).cpu()
    rf = rf / rf.norm()
    vf = torch.randn(d, generator=generator(seed), dtype=torch.float64)
    vf = vf - (vf @ rf) * rf
    vf = vf / vf.norm()
    if radius is None:
        radius = 2.0 * dist if np.isfinite(dist) and dist > 0 else 1.0
    coords = np.linspace(-radius, radius, steps)
    aa, bb = np.meshgrid(coords, coords)  # aa[i, j] = coords[j], bb[i, j] = coords[i]
    grid = (torch.as_tensor(aa.reshape(-1, 1)) * rf[None] + torch.as_tensor(bb.reshape(-1, 1)) * vf[None])
    pts = xb.reshape(1, -1).cpu().double() + grid
    losses, preds = [], []
    with eval_mode(model), torch.no_grad():
        for s in range(0, len(pts), chunk_size):
            chunk = pts[s:s + chunk_size].to(device=dev, dtype=xb.dtype).reshape(-1, *shape)
            logits = model(chunk)
            losses.append(F.cross_entropy(logits, yb.expand(len(chunk)), reduction="none").double().cpu())
            preds.append(logits.argmax(1).cpu())
            num_classes = int(logits.shape[1])
    return LossPlane(a=coords, b=coords.copy(), loss=torch.cat(losses).numpy().reshape(steps, steps),
                     pred=torch.cat(preds).numpy().reshape(steps, steps), label=int(yb[0]),
                     boundary_distance=dist, r=rf.numpy(), v=vf.numpy(), num_classes=num_classes,
                     index=index)
