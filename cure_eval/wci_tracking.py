"""WCI over training and the WCI learning-rate policy: moved to :mod:`cure_eval.training.wci_tracking`; removed in 0.3.

A thin re-export so that ``cure_eval.wci_tracking`` (plugins, third-party code) keeps working for one release:
import from :mod:`cure_eval.training.wci_tracking` instead.
"""

from __future__ import annotations

from .training.wci_tracking import (
    AUDIT_CHUNK_SIZE,
    AUDIT_PGD_STEPS,
    DEFAULT_HUTCHINSON_PROBES,
    DEFAULT_PROBE_N,
    TRACKING_KEYS,
    WCILRPolicy,
    WCITracker,
    plot_wci_tracking,
    spearman,
    tracking_summary,
)

__all__ = [
    "AUDIT_CHUNK_SIZE",
    "AUDIT_PGD_STEPS",
    "DEFAULT_HUTCHINSON_PROBES",
    "DEFAULT_PROBE_N",
    "TRACKING_KEYS",
    "WCILRPolicy",
    "WCITracker",
    "plot_wci_tracking",
    "spearman",
    "tracking_summary",
]
