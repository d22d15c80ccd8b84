"""Small helpers shared by the geometry modules (not part of the public API)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..core.io import to_jsonable  # noqa: F401  (re-exported for the geometry modules)
from ..core.modes import check_device, eval_mode, model_device, model_dtype  # noqa: F401  (re-exported)
from ..errors import UsageError


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    if not torch.is_floating_point(x):
        raise UsageError(f"inputs must be float tensors, got {x.dtype}")
    if x.ndim < 2:
        raise UsageError(f"inputs must have a batch dimension, got shape {tuple(x.shape)}")
    if y.ndim != 1 or len(y) != len(x):
        raise UsageError(f"labels must have shape ({len(x)},), got {tuple(y.shape)}")
    if len(x) == 0:
        raise UsageError("no points given")


def check_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{name} must be a positive number, got {value}")
    return value


def generator(seed: int) -> torch.Generator:
    """A CPU generator: random draws are identical on every device for a given seed."""
    return torch.Generator().manual_seed(int(seed))


def as_numpy(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)
