"""The CURE regulariser: moved to :mod:`cure_eval.training.cure`; removed in 0.3.

A thin re-export so that ``cure_eval.cure`` (plugins, third-party code) keeps working for one release:
import from :mod:`cure_eval.training.cure` instead.
"""

from __future__ import annotations

from .training.cure import (
    BN_MODES,
    BNMode,
    CureTerms,
    active_dropout,
    bn_eval,
    check_bn_mode,
    cure_direction,
    cure_terms,
    frozen_bn_stats,
    input_gradient,
    input_std,
    pixel_step,
    rms_std,
    split_normalization,
)

__all__ = [
    "BNMode",
    "BN_MODES",
    "CureTerms",
    "active_dropout",
    "bn_eval",
    "check_bn_mode",
    "cure_direction",
    "cure_terms",
    "frozen_bn_stats",
    "input_gradient",
    "input_std",
    "pixel_step",
    "rms_std",
    "split_normalization",
]
