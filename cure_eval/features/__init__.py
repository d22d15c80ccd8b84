"""Feature sensitivity and confidence (Jia, Li & Wen, "Towards Understanding the Regularization of
Adversarial Robustness on Neural Networks", ICML 2020, https://arxiv.org/abs/2011.07478).

Their finding: adversarial robustness is reached by making the change of most layers' features
(induced by a change of the input) smaller uniformly in all directions, which pushes samples
towards the decision boundary (less confident predictions). Measured here for any model:

* :func:`layer_sensitivity`: ``‖f_l(x+δ) − f_l(x)‖₂ / ‖δ‖₂`` per point and layer, for a random and
  an adversarial ``δ``; their ratio is the *anisotropy*;
* :func:`jacobian_singular_values`: the top singular values of ``∂f_l/∂x`` (subspace iteration);
* :func:`confidence_summary`: top softmax probability, logit margin, share near the boundary;
* :func:`measure_features` runs everything and writes ``features.json`` and two PNGs;
  layers: :func:`default_layers` / :func:`resolve_layers`.
"""

from __future__ import annotations

from .confidence import MARGIN_THRESHOLD, confidence_summary, distribution
from .layers import LOGITS, capture, default_layers, layer_outputs, resolve_layers
from .plots import plot_confidence, plot_sensitivity
from .report import (
    FIGURES,
    JSON_NAME,
    compute_features,
    format_table,
    measure_features,
    write_features,
)
from .sensitivity import jacobian_singular_values, layer_sensitivity, random_sign_delta

__all__ = [
    "FIGURES",
    "JSON_NAME",
    "LOGITS",
    "MARGIN_THRESHOLD",
    "capture",
    "compute_features",
    "confidence_summary",
    "default_layers",
    "distribution",
    "format_table",
    "jacobian_singular_values",
    "layer_outputs",
    "layer_sensitivity",
    "measure_features",
    "plot_confidence",
    "plot_sensitivity",
    "random_sign_delta",
    "resolve_layers",
    "write_features",
]
