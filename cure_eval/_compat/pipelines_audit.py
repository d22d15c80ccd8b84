"""Moved to :mod:`cure_eval.auditing` (``pipeline``, ``options``, ``sources``, ``stages``,
``report``); this re-export module is removed in 0.3."""

from __future__ import annotations

from ..auditing.options import AuditOptions
from ..auditing.pipeline import audit_model, audit_models
from ..auditing.report import (
    attack_label,
    format_autoattack_comparison,
    format_results_table,
    has_geometry,
    number,
    write_comparison,
    write_features_comparison,
)
from ..auditing.report import per_sample_csv as _csv
from ..auditing.sources import (
    audit_labels,
    check_model_outputs,
    defend_run_checkpoints,
    latest_defend_run,
    load_audit_model,
)
from ..auditing.stages import FEATURES_KEYS, GEOMETRY_KEYS, STAGES, Stage, suite_pgd20_points
from ..auditing.stages import run_sweep as _run_sweep

__all__ = [
    "FEATURES_KEYS", "GEOMETRY_KEYS", "STAGES", "AuditOptions", "Stage", "attack_label", "audit_labels",
    "audit_model", "audit_models", "check_model_outputs", "defend_run_checkpoints", "format_autoattack_comparison",
    "format_results_table", "has_geometry", "latest_defend_run", "load_audit_model", "number", "suite_pgd20_points",
    "write_comparison", "write_features_comparison", "_csv", "_run_sweep",
]
