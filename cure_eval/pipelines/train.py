"""The training pipeline: moved to :mod:`cure_eval.training.pipeline`; removed in 0.3.

A thin re-export so that ``cure_eval.pipelines.train`` (plugins, third-party code) keeps working for one release:
import from :mod:`cure_eval.training.pipeline` instead.
"""

from __future__ import annotations

from ..training.pipeline import (
    PAPER_HINT,
    DefendResult,
    DefendSettings,
    results_table,
    run_defend,
    standard_model,
    train_method,
    versions,
    wci_tracker,
)

__all__ = [
    "DefendResult",
    "DefendSettings",
    "PAPER_HINT",
    "results_table",
    "run_defend",
    "standard_model",
    "train_method",
    "versions",
    "wci_tracker",
]
