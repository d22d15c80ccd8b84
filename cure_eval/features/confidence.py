"""Confidence and margins on clean points (Jia, Li & Wen, ICML 2020: adversarial robustness
pushes samples towards the decision boundary, i.e. less confident predictions).

* top softmax probability ``max_c softmax(z)_c``;
* logit margin ``z_(1) − z_(2)`` (top logit minus the runner-up, ≥ 0, whatever the label);
* the share of points with a logit margin below ``margin_threshold`` (default 1.0 logit: the
  runner-up class has more than ``e^-1`` ≈ 0.37 times the top class's probability);
* the distribution of a minimal perturbation (DeepFool's ℓ2 ``min_norm``, from the audit's suite).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import UsageError

#: default threshold (logit units) of "within a small margin of the boundary"
MARGIN_THRESHOLD = 1.0
#: quantiles reported for every distribution
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def distribution(values: torch.Tensor | np.ndarray | Sequence[float], *, bins: int | Sequence[float] = 20,
                 value_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """Summary of the finite ``values``: ``n``, ``mean``, ``median``, ``quantiles`` (at
    :data:`QUANTILES`), ``iqr`` and a histogram (``hist_edges``, ``hist_counts``). Empty:
    ``n = 0`` and ``None`` statistics."""
    v = np.asarray(values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else values,
                   dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"n": 0, "mean": None, "median": None, "quantiles": {}, "iqr": None,
                "hist_edges": [], "hist_counts": []}
    qs = np.quantile(v, QUANTILES)
    counts, edges = np.histogram(v, bins=bins, range=value_range)
    return {"n": int(len(v)), "mean": float(v.mean()), "median": float(np.median(v)),
            "quantiles": {f"{q:g}": float(x) for q, x in zip(QUANTILES, qs, strict=True)},
            "iqr": float(qs[3] - qs[1]), "hist_edges": edges.tolist(), "hist_counts": counts.tolist()}


def confidence_summary(
    logits: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    margin_threshold: float = MARGIN_THRESHOLD,
    bins: int = 20,
    margin_max: float | None = None,
) -> dict[str, Any]:
    """Top softmax probability and logit margin of ``logits (N, C)``.

    Args:
        logits: the model's outputs on clean points.
        labels: true labels; when given, ``accuracy`` and the correct-only top probability are added.
        margin_threshold: a point is "near the boundary" when its logit margin is below this
            (logit units, default :data:`MARGIN_THRESHOLD`).
        bins: histogram bins (top probability over [1/C, 1]; margin over [0, ``margin_max``]).
        margin_max: upper edge of the margin histogram (default: the largest margin); give the
            same value for several models to compare their histograms bin by bin.

    Returns:
        ``top_probability`` and ``logit_margin`` (each :func:`distribution`), ``margin_threshold``,
        ``share_below_margin``, ``n``, and with labels ``accuracy``,
        ``top_probability_correct``.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise UsageError(f"logits must have shape (N, C) with C >= 2, got {tuple(logits.shape)}")
    if not math.isfinite(margin_threshold) or margin_threshold < 0:
        raise UsageError(f"margin_threshold must be a number >= 0, got {margin_threshold}")
    z = logits.detach().cpu().double()
    probs = torch.softmax(z, dim=1)
    top2 = z.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    top_p = probs.max(dim=1).values
    hi = float(margin.max()) if margin_max is None else float(margin_max)
    out: dict[str, Any] = {
        "n": len(z),
        "top_probability": distribution(top_p, bins=bins, value_range=(1.0 / z.shape[1], 1.0)),
        "logit_margin": distribution(margin, bins=bins, value_range=(0.0, max(hi, 1e-12))),
        "margin_threshold": float(margin_threshold),
        "share_below_margin": float((margin < margin_threshold).double().mean()) if len(z) else None,
    }
    if labels is not None:
        correct = z.argmax(1) == labels.detach().cpu()
        out["accuracy"] = float(correct.double().mean()) if len(z) else None
        out["top_probability_correct"] = distribution(top_p[correct], bins=bins, value_range=(1.0 / z.shape[1], 1.0))
    return out
