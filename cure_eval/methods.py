"""The Method API and registry: moved to :mod:`cure_eval.training.methods`; removed in 0.3.

A thin re-export so that ``cure_eval.methods`` (plugins, third-party code) keeps working for one release:
import from :mod:`cure_eval.training.methods` instead.
"""

from __future__ import annotations

from .training.methods import (
    METHOD_ENTRY_POINT_GROUP,
    C,
    LRSchedule,
    M,
    Method,
    MethodConfig,
    OptimizerName,
    StepStats,
    TrainContext,
    config_dict,
    get_method,
    list_methods,
    parse_method_args,
    register_method,
    unregister_method,
)

__all__ = [
    "C",
    "LRSchedule",
    "M",
    "METHOD_ENTRY_POINT_GROUP",
    "Method",
    "MethodConfig",
    "OptimizerName",
    "StepStats",
    "TrainContext",
    "config_dict",
    "get_method",
    "list_methods",
    "parse_method_args",
    "register_method",
    "unregister_method",
]
