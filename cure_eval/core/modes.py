"""Lowest layer: switching a model's train/eval mode and asking where a model lives.

Every library function that runs a model in eval mode does it through :func:`eval_mode`, which
restores *every submodule's* previous mode afterwards, also on error. Library code never moves the
caller's model: :func:`check_device` refuses a model that is not on the requested device instead.
This module imports nothing from the rest of the package but :mod:`cure_eval.errors`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import CureEvalError


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's previous mode afterwards."""
    with preserved_mode(model):
        model.eval()
        yield model


@contextlib.contextmanager
def preserved_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every submodule's train/eval mode on exit, whatever the body switched."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, training in modes:
            m.train(training)


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (else buffer); ``None`` for a stateless model."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (else torch's default dtype)."""
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
    if have is not None and not same_device(have, dev):
        raise CureEvalError(
            f"the model is on {have} but device={dev} was requested: move it first with "
            f"model.to({str(dev)!r})"
        )
    return dev


def same_device(a: torch.device, b: torch.device) -> bool:
    """True when ``a`` and ``b`` name the same device (``cuda`` = the current CUDA device)."""
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return True
