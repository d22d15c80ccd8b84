"""Models: timm names, friendly aliases, user factories, and the normalising wrapper.

Every model that cure_eval trains or attacks maps [0, 1] images to logits. Normalisation is a
module inside the model (:class:`NormalizedModel`), never a data transform, so attacks and ε live
in pixel space.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..data import DatasetSpec
from ..errors import CureEvalError, UsageError

log = logging.getLogger(__name__)

MODEL_ENTRY_POINT_GROUP = "cure_eval.models"


def load_model_plugins() -> list[str]:
    """Import every module registered under the ``cure_eval.models`` entry point group.

    Importing such a module registers its models into timm's registry (``@register_model``).
    Returns the names of the loaded plugins.
    """
    loaded = []
    for ep in entry_points(group=MODEL_ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken third-party plugin must not break the built-ins
            log.warning("model plugin %s (%s) failed to load: %s", ep.name, ep.value, exc)
            continue
        loaded.append(ep.name)
    if not loaded:
        raise CureEvalError(
            "no cure_eval model plugins found: install the package (pip install -e .) so that its "
            "entry points are registered"
        )
    return loaded


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with mean and std stored as buffers."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    """A classifier that takes [0, 1] images: ``model(normalize(x))``."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model: stored in every checkpoint."""

    name: str
    num_classes: int
    in_chans: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "in_chans": self.in_chans,
                "kwargs": dict(self.kwargs), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(name=str(d["name"]), num_classes=int(d["num_classes"]), in_chans=int(d["in_chans"]),
                   kwargs=dict(d.get("kwargs", {})), mean=tuple(d["mean"]), std=tuple(d["std"]))


#: Wide-ResNet (depth, widen) chosen by ``--model wide_resnet`` per dataset when not given.
DEFAULT_WRN = {"digits": (16, 4), "cifar10": (28, 10), "svhn": (28, 10)}
ALIASES = ("resnet18", "wide_resnet", "wrn")


def resolve_model_name(
    name: str, spec: DatasetSpec, *, depth: int | None = None, widen: int | None = None
) -> tuple[str, dict[str, Any]]:
    """Turn a user-facing model name into a timm name and builder keyword arguments.

    ``resnet18`` means the CIFAR ResNet-18 (``cifar_resnet18``); ``wide_resnet`` (or ``wrn``)
    means a CIFAR Wide-ResNet, WRN-``depth``-``widen`` (defaults: WRN-16-4 on digits, WRN-28-10
    on CIFAR-10/SVHN). Any other name must be a model in timm's registry.
    """
    if name == "resnet18":
        return "cifar_resnet18", {}
    if name in ("wide_resnet", "wrn"):
        d0, k0 = DEFAULT_WRN.get(spec.name, (28, 10))
        d, k = depth or d0, widen or k0
        registered = f"wide_resnet{d}_{k}"
        if timm.is_model(registered):
            return registered, {}
        return "cifar_wide_resnet", {"depth": d, "widen_factor": k}
    if depth is not None or widen is not None:
        raise UsageError("`depth`/`widen` only apply to `model=wide_resnet`")
    if not timm.is_model(name):
        ours = sorted(set(timm.list_models("cifar_*")) | set(timm.list_models("wide_resnet*")))
        raise UsageError(
            f"unknown model {name!r}: use an alias ({', '.join(ALIASES)}), one of ours "
            f"({', '.join(ours)}) or any name from timm.list_models()"
        )
    return name, {}


def create_model(config: ModelConfig) -> NormalizedModel:
    """Build an untrained model from its config (timm registry + normalising wrapper)."""
    try:
        net = timm.create_model(
            config.name, pretrained=False, num_classes=config.num_classes, in_chans=config.in_chans,
            **config.kwargs,
        )
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CureEvalError(f"cannot build model {config.name!r} with {config.kwargs}: {exc}") from exc
    return NormalizedModel(net, config.mean, config.std)


def model_config_for(
    name: str, spec: DatasetSpec, *, depth: int | None = None, widen: int | None = None
) -> ModelConfig:
    timm_name, kwargs = resolve_model_name(name, spec, depth=depth, widen=widen)
    return ModelConfig(name=timm_name, num_classes=spec.num_classes, in_chans=spec.in_chans,
                       kwargs=kwargs, mean=spec.mean, std=spec.std)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_factory(reference: str) -> nn.Module:
    """Build a model from ``module:factory`` or ``path/to/file.py:factory``.

    This runs the user's code by design: only use references you trust. The factory is called
    with no arguments and must return an ``nn.Module`` that maps [0, 1] images to logits.
    """
    target, sep, attr = reference.rpartition(":")
    if not sep or not target or not attr:
        raise UsageError(f"model reference {reference!r} must look like module:factory or file.py:factory")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise UsageError(f"factory file {path} does not exist")
            mod_name = f"_cure_eval_user_{path.stem}"
            spec = importlib.util.spec_from_file_location(mod_name, path)
            if spec is None or spec.loader is None:
                raise UsageError(f"cannot import {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except UsageError:
        raise
    except Exception as exc:
        raise CureEvalError(f"importing {target!r} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"{target!r} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as exc:
        raise CureEvalError(f"factory {reference!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise CureEvalError(f"factory {reference!r} returned {type(model).__name__}, not an nn.Module")
    return model
