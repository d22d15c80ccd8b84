"""Auditing: the attack suite on a model, resumable and sharded, with the optional sections and the
report. The layer above measurement (:mod:`cure_eval.attacks`, :mod:`cure_eval.masking`,
:mod:`cure_eval.geometry`, :mod:`cure_eval.features`); the ``audit`` CLI talks only to the public
names below.

Layout: :mod:`.pipeline` (:func:`audit_model`, :func:`audit_models`), :mod:`.options`,
:mod:`.sources` (where a model comes from), :mod:`.runner` (the suite's units through the store),
:mod:`.stages` (the optional sections, a table), :mod:`.report` (results.md/json, per_sample.csv),
and the unit store split by concern: :mod:`.shard` (process group), :mod:`.fingerprint`,
:mod:`.store` (state file and lock), :mod:`.codec` (tensors to JSON).
"""

from __future__ import annotations

from .options import AuditOptions, resolve_radii
from .pipeline import audit_model, audit_models
from .report import (
    format_results_table,
    per_sample_csv,
    write_comparison,
    write_features_comparison,
)
from .runner import audit_plan, run_audit_suite
from .shard import Shard, process_group
from .sources import (
    audit_labels,
    check_model_outputs,
    defend_run_checkpoints,
    latest_defend_run,
    load_audit_model,
)
from .stages import STAGES, AuditRun, Stage
from .store import STATE_FILE, AuditState, MemoryAuditState, is_not_applicable, not_applicable

__all__ = [
    "STAGES",
    "STATE_FILE",
    "AuditOptions",
    "AuditRun",
    "AuditState",
    "MemoryAuditState",
    "Shard",
    "Stage",
    "audit_labels",
    "audit_model",
    "audit_models",
    "audit_plan",
    "check_model_outputs",
    "defend_run_checkpoints",
    "format_results_table",
    "is_not_applicable",
    "latest_defend_run",
    "load_audit_model",
    "not_applicable",
    "per_sample_csv",
    "process_group",
    "resolve_radii",
    "run_audit_suite",
    "write_comparison",
    "write_features_comparison",
]
