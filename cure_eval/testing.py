"""Models and helpers that the tests, the benchmarks and the docs share.

* :func:`small_cnn`: the small ReLU CNN for 8×8 digits used throughout the tests (no BatchNorm,
  so it is deterministic in either mode).
* Models that mask gradients on purpose (:class:`QuantizedInput`, :class:`SaturatedLogits`,
  :class:`NoisyInput`): to test that a masking detector detects (``docs/masking.md``).

Library code never imports this module.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UsageError


def small_cnn(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    """A small ReLU CNN for 8×8 digits (no BatchNorm, so it is deterministic in either mode)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )


class QuantizedInput(nn.Module):
    """Shattered gradients: the input is rounded to ``levels`` grey levels before ``model``.

    ``torch.round`` has a zero derivative everywhere, so the input gradient is exactly zero (no
    straight-through estimator). Thermometer-encoding-style defences (Buckman et al. 2018)
    broken by Athalye et al. 2018 work the same way.
    """

    def __init__(self, model: nn.Module, *, levels: int = 8) -> None:
        super().__init__()
        if levels < 2:
            raise UsageError(f"levels must be >= 2, got {levels}")
        self.model = model
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.levels - 1
        out: torch.Tensor = self.model(torch.round(x * k) / k)
        return out


class SaturatedLogits(nn.Module):
    """Vanishing gradients: logits multiplied by ``scale`` (default 10⁴).

    Predictions and margins' signs are unchanged, but the softmax saturates: wherever the
    margin exceeds ~104 / ``scale`` logits, every term of the cross-entropy gradient is below
    float32's smallest number and is exactly 0 (``p_y`` rounds to 1, ``p_j = exp(−scale·m)``
    underflows). Defensive distillation at high temperature fails the same way (Carlini and
    Wagner 2016).
    """

    def __init__(self, model: nn.Module, *, scale: float = 1e4) -> None:
        super().__init__()
        self.model = model
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x) * self.scale
        return out


class NoisyInput(nn.Module):
    """Stochastic gradients: Gaussian noise (std ``sigma``) added to the input at every call,
    also in eval mode, as randomised defences do (e.g. random self-ensemble, Liu et al. 2018)."""

    def __init__(self, model: nn.Module, *, sigma: float = 0.1) -> None:
        super().__init__()
        self.model = model
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x + self.sigma * torch.randn_like(x))
        return out


__all__ = ["NoisyInput", "QuantizedInput", "SaturatedLogits", "small_cnn"]
