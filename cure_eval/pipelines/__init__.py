"""The library's pipelines, in [0, 1] units: what the CLIs call after parsing their arguments.

A convenience namespace over the three layers that hold them:

* training: :mod:`cure_eval.training.pipeline` — :func:`run_defend`, :func:`standard_model`,
  :func:`train_method` (``pipelines.train`` is an alias of it until 0.3);
* auditing: :mod:`cure_eval.auditing` — :func:`audit_model`, :func:`audit_models`,
  :func:`load_audit_model` (``pipelines.audit`` is an alias until 0.3);
* :mod:`~cure_eval.pipelines.reproduce` — :func:`run_reproduce`: it trains and audits, so it sits
  above both, in this folder.
"""

from __future__ import annotations

from ..auditing import AuditOptions, audit_model, audit_models, load_audit_model
from ..training.pipeline import (
    DefendResult,
    DefendSettings,
    run_defend,
    standard_model,
    train_method,
)
from .reproduce import ReproduceSettings, run_reproduce

__all__ = [
    "AuditOptions",
    "DefendResult",
    "DefendSettings",
    "ReproduceSettings",
    "audit_model",
    "audit_models",
    "load_audit_model",
    "run_defend",
    "run_reproduce",
    "standard_model",
    "train_method",
]
