"""CIFAR-style Wide-ResNet-d-k (Zagoruyko & Komodakis 2016, https://arxiv.org/abs/1605.07146).

Pre-activation blocks, three stages of width ``16k, 32k, 64k``, ``(d - 4) / 6`` blocks per stage.
WRN-28-10 is the CURE paper's model; the small members (WRN-16-2, WRN-16-4) make CPU runs
practical. Registered in timm as ``wide_resnet{d}_{k}``; ``cifar_wide_resnet`` takes ``depth``
and ``widen_factor`` for any other member. timm's ImageNet ``wide_resnet50_2`` /
``wide_resnet101_2`` are untouched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["WideResNet"]


class WideBasic(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = F.relu(self.bn2(out))
        if self.drop_rate:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + residual


class WideResNet(nn.Module):
    """Wide-ResNet-``depth``-``widen_factor`` for small images.

    Args:
        depth: total depth, ``6n + 4`` (16, 22, 28, 34, 40...).
        widen_factor: width multiplier ``k``.
        num_classes: number of logits.
        in_chans: input channels.
        drop_rate: dropout inside the blocks (0 by default, as in the robustness literature).
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        **_: Any,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"Wide-ResNet depth must be 6n+4 (10, 16, 22, 28, 34...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"Wide-ResNet widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.depth, self.widen_factor = depth, widen_factor
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        stages = []
        in_planes = widths[0]
        for i, stride in enumerate((1, 2, 2)):
            blocks = []
            for j in range(n):
                blocks.append(WideBasic(in_planes, widths[i + 1], stride if j == 0 else 1, drop_rate))
                in_planes = widths[i + 1]
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_planes)
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.layers(self.conv1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8),
        "mean": (0.4914, 0.4822, 0.4465), "std": (0.2023, 0.1994, 0.2010),
        "first_conv": "conv1", "classifier": "fc", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "cifar_wide_resnet.untrained": _cfg(),
    "wide_resnet16_2.untrained": _cfg(),
    "wide_resnet16_4.untrained": _cfg(),
    "wide_resnet28_10.untrained": _cfg(),
    "wide_resnet34_10.untrained": _cfg(),
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> WideResNet:
    return build_model_with_cfg(WideResNet, variant, pretrained, **kwargs)


@register_model
def cifar_wide_resnet(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """Any WRN-d-k: pass ``depth=`` and ``widen_factor=`` (default WRN-28-10)."""
    return _create("cifar_wide_resnet", pretrained, **kwargs)


@register_model
def wide_resnet16_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-16-2 (0.7 M parameters): the quick CPU model."""
    return _create("wide_resnet16_2", pretrained, depth=16, widen_factor=2, **kwargs)


@register_model
def wide_resnet16_4(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-16-4 (2.7 M parameters)."""
    return _create("wide_resnet16_4", pretrained, depth=16, widen_factor=4, **kwargs)


@register_model
def wide_resnet28_10(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-28-10 (36.5 M parameters): the CURE paper's model."""
    return _create("wide_resnet28_10", pretrained, depth=28, widen_factor=10, **kwargs)


@register_model
def wide_resnet34_10(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-34-10 (46 M parameters): the TRADES/AWP model."""
    return _create("wide_resnet34_10", pretrained, depth=34, widen_factor=10, **kwargs)
