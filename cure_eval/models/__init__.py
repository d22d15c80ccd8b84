"""Models: [0, 1] images to logits (:mod:`~cure_eval.models.factory`: ``NormalizedModel``, timm and
the model plugins), the checkpoint format (:mod:`~cure_eval.models.checkpoint`) and RobustBench
models (:mod:`~cure_eval.models.robustbench`, the optional ``robustbench`` extra)."""

from __future__ import annotations

from .factory import (
    ALIASES,
    DEFAULT_WRN,
    MODEL_ENTRY_POINT_GROUP,
    ModelConfig,
    Normalize,
    NormalizedModel,
    count_parameters,
    create_model,
    load_factory,
    load_model_plugins,
    model_config_for,
    resolve_model_name,
)

__all__ = [
    "ALIASES",
    "DEFAULT_WRN",
    "MODEL_ENTRY_POINT_GROUP",
    "ModelConfig",
    "Normalize",
    "NormalizedModel",
    "count_parameters",
    "create_model",
    "load_factory",
    "load_model_plugins",
    "model_config_for",
    "resolve_model_name",
]
