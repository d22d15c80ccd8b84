"""Device selection: chosen once by the CLI and passed down; library code never hard-codes one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import UsageError


def resolve_device(name: str | None = None) -> torch.device:
    """Return the device to use.

    Args:
        name: ``None`` or ``"auto"`` picks CUDA when available, then Apple MPS, then the CPU;
            anything else is passed to :class:`torch.device` (``"cpu"``, ``"cuda:1"``...).
    """
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available: use `device=cpu`")
    return device


def tune_for_fixed_shapes(device: torch.device) -> None:
    """On a CUDA device let cuDNN benchmark and keep the fastest convolution algorithm per shape.

    Training batches have one fixed shape (incomplete batches are dropped), so the search pays
    off after the first steps. Process-wide state: the CLIs call this, library code never does.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device | str) -> Iterator[None]:
    """``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``: reproducible draws (on the CPU
    and on ``device`` when it is a GPU) that leave the caller's RNG state untouched."""
    device = torch.device(device)
    devices: list[int] = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
