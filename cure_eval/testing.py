"""Models and helpers that the tests, the benchmarks and the docs share.

* :func:`small_cnn`: the small ReLU CNN for 8×8 digits used throughout the tests (no BatchNorm,
  so it is deterministic in either mode).
* Models that mask gradients on purpose (:class:`QuantizedInput`, :class:`SaturatedLogits`,
  :class:`NoisyInput`): to test that a masking detector detects (``docs/masking.md``).
* Models some measurements do not apply to (:class:`NoGradient`, :class:`RawParameterNet`): to
  test that an audit reports them as not applicable and keeps the rest.

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


def train_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 15,
                seed: int = 0, lr: float = 1e-3, batch_size: int = 64) -> nn.Module:
    """Plain cross-entropy training (Adam, a seeded permutation per epoch); returns the model in
    eval mode. The tests' and benchmarks' normally trained digits models."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


# --------------------------------------------------------------------------------------------
# Models that mask gradients on purpose: to test that a masking detector detects.
# --------------------------------------------------------------------------------------------
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


class NoGradient(nn.Module):
    """No gradients at all: ``model`` evaluated under ``torch.no_grad()``, so the logits have no
    autograd graph (a non-differentiable defence, e.g. a lookup or an external service). Only
    gradient-free attacks (SPSA) apply; gradient-based measurements are not applicable."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = self.model(x)
        return out


class RawParameterNet(nn.Module):
    """A ReLU network whose weights are plain :class:`nn.Parameter` s (no conv/linear modules),
    for 8×8 digits: the weight-space measurements (WCI, weight-loss curves) do not apply to it."""

    def __init__(self, *, in_features: int = 64, hidden: int = 32, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(in_features, hidden, generator=gen) / in_features ** 0.5)
        self.w2 = nn.Parameter(torch.randn(hidden, num_classes, generator=gen) / hidden ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.relu(x.flatten(1) @ self.w1) @ self.w2
        return out


__all__ = [
    "NoGradient", "NoisyInput", "QuantizedInput", "RawParameterNet", "SaturatedLogits", "small_cnn", "train_plain",
]
