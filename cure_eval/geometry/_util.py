"""Small helpers shared by the geometry modules (not part of the public API)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CureEvalError, UsageError
from ..training import eval_mode  # noqa: F401  (re-exported for the geometry modules)


def model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


def model_dtype(model: nn.Module) -> torch.dtype:
    for t in model.parameters():
        if torch.is_floating_point(t):
            return t.dtype
    return torch.get_default_dtype()


def check_device(model: nn.Module, device: torch.device | str) -> torch.device:
    """Return ``torch.device(device)``; raise unless the model already lives there.

    Library functions never move the caller's model (that would be a hidden side effect).
    """
    dev = torch.device(device)
    have = model_device(model)
    if have is not None and not _same_device(have, dev):
        raise CureEvalError(
            f"the model is on {have} but device={dev} was requested: move it first with "
            f"model.to({str(dev)!r})"
        )
    return dev


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return True


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


def to_jsonable(obj: Any) -> Any:
    """Convert tensors/arrays/numpy scalars to JSON types; NaN and ±inf become ``None``."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def as_numpy(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)
