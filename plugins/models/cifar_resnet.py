"""CIFAR-style ResNet-18 (He et al. 2016, https://arxiv.org/abs/1512.03385).

The CIFAR variant used by the CURE paper and most robustness work: a 3×3 stride-1 stem and no
max-pool, so 32×32 inputs keep their resolution into the first stage. Registered in timm as
``cifar_resnet18`` (timm's own ``resnet18`` is the ImageNet model and is left alone).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["CifarResNet"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with a 3×3 stem and no max-pool.

    Args:
        layers: blocks per stage (``(2, 2, 2, 2)`` for ResNet-18).
        num_classes: number of logits.
        in_chans: input channels.
        base_width: channels of the first stage (64).
        drop_rate: dropout before the classifier.
    """

    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        base_width: int = 64,
        drop_rate: float = 0.0,
        **_: Any,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, base_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        stages = []
        in_planes = base_width
        for i, n in enumerate(layers):
            planes = base_width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride=1 if (i == 0 or j > 0) else 2))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(F.relu(self.bn1(self.conv1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (4, 4),
        "mean": (0.4914, 0.4822, 0.4465), "std": (0.2023, 0.1994, 0.2010),
        "first_conv": "conv1", "classifier": "fc", **kwargs,
    }


default_cfgs = generate_default_cfgs({"cifar_resnet18.untrained": _cfg()})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, **kwargs)


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-18: 3×3 stem, no max-pool, 11.2 M parameters at 10 classes."""
    return _create("cifar_resnet18", pretrained, layers=(2, 2, 2, 2), **kwargs)
