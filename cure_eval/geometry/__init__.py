"""Geometry of the loss in input and weight space (CURE paper §2–§3, AWP, WCI).

Input space (Hessian of the per-sample cross-entropy w.r.t. the [0, 1] image):
batched Hessian-vector products (:func:`input_hvp`), curvature profiles (:func:`curvature_profile`),
cheap per-epoch summaries (:func:`curvature_summaries`), Theorem 1 bounds
(:func:`theorem1_bounds`, :func:`theorem1_points`) and (r, v) cross-sections (:func:`loss_plane`).
Weight space: Hutchinson traces, the Weight-Curvature Index and AWP-style loss curves.
:func:`measure_geometry` runs everything and writes ``geometry.json`` and PNGs.
"""

from __future__ import annotations

from .bounds import LOG2, theorem1_bounds, theorem1_points, threshold_distance
from .deepfool import MinimalPerturbation, deepfool_l2
from .hessian import (
    InputHessianOperator,
    hvp_jvp,
    input_gradients,
    input_hessian_matrix,
    input_hvp,
    per_sample_loss,
)
from .landscape import LossPlane, loss_plane
from .plots import (
    plot_curvature_profile,
    plot_plane,
    plot_profiles,
    plot_theorem1,
    plot_weight_curves,
)
from .report import format_table, measure_geometry
from .spectrum import CurvatureProfile, PointSpectrum, curvature_profile
from .summaries import cure_direction, curvature_summaries, gradient_alignment
from .weights import (
    conv_linear_weights,
    filter_normalized_direction,
    hutchinson_trace,
    pgd_points,
    weight_curvature_index,
    weight_loss_curve,
)

__all__ = [
    "LOG2",
    "CurvatureProfile",
    "InputHessianOperator",
    "LossPlane",
    "MinimalPerturbation",
    "PointSpectrum",
    "conv_linear_weights",
    "cure_direction",
    "curvature_profile",
    "curvature_summaries",
    "deepfool_l2",
    "filter_normalized_direction",
    "format_table",
    "gradient_alignment",
    "hutchinson_trace",
    "hvp_jvp",
    "input_gradients",
    "input_hessian_matrix",
    "input_hvp",
    "loss_plane",
    "measure_geometry",
    "per_sample_loss",
    "pgd_points",
    "plot_curvature_profile",
    "plot_plane",
    "plot_profiles",
    "plot_theorem1",
    "plot_weight_curves",
    "theorem1_bounds",
    "theorem1_points",
    "threshold_distance",
    "weight_curvature_index",
    "weight_loss_curve",
]
