"""``standard``: plain cross-entropy training (the "normal model" every defence starts from)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cure_eval.data import DatasetSpec
from cure_eval.training.methods import Method, MethodConfig, StepStats


@dataclass
class StandardConfig(MethodConfig):
    """SGD with Nesterov momentum 0.9, lr 0.1 cosine-annealed, weight decay 5e-4 (the usual CIFAR
    recipe, e.g. Zagoruyko & Komodakis 2016)."""

    label_smoothing: float = 0.0


class StandardMethod(Method[StandardConfig]):
    name = "standard"
    description = "plain cross-entropy training"
    Config = StandardConfig

    @classmethod
    def default_config(cls, spec: DatasetSpec, model_name: str) -> dict[str, Any]:
        if spec.name == "digits":  # 1437 tiny images: Adam converges in a few epochs
            return {"epochs": 15, "batch_size": 64, "optimizer": "adam", "lr": 1e-3,
                    "weight_decay": 0.0, "lr_schedule": "cosine"}
        return {"epochs": 100, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4}

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        acc = (logits.argmax(1) == y).float().mean()
        return {"loss": loss.detach(), "train_acc": acc}
