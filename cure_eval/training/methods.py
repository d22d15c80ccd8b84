"""The training-method plugin API and its registry.

A method is a class derived from :class:`Method`, registered under the entry-point group
``cure_eval.methods`` (``name = "package.module:Class"``) or at run time with
:func:`register_method`. The built-ins (``standard``, ``cure``) live in ``plugins/methods`` and
are registered through the same entry points as a third-party package's.

A method owns its whole optimisation step (forward, regulariser, backward, optimiser step), so
methods that need several backward passes or weight perturbations fit without core changes.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, TypeVar, cast

import torch
from torch import nn

from ..core.registry import PluginRegistry
from ..data import DatasetSpec
from ..errors import UsageError

log = logging.getLogger(__name__)

METHOD_ENTRY_POINT_GROUP = "cure_eval.methods"

OptimizerName = Literal["sgd", "adam"]
LRSchedule = Literal["cosine", "exponential", "step", "constant"]


#: What :meth:`Method.step` returns: metric name → float or 0-dim tensor.
StepStats = dict[str, float | torch.Tensor]


@dataclass
class MethodConfig:
    """Hyperparameters shared by every method; subclasses add their own fields."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: OptimizerName = "sgd"
    lr: float = 0.1
    lr_final: float | None = None  # cosine/exponential decay target; None: cosine to 0
    lr_schedule: LRSchedule = "cosine"
    lr_milestones: tuple[int, ...] = ()  # epochs at which "step" multiplies lr by 0.1
    momentum: float = 0.9
    nesterov: bool = True  # the Madry/TRADES/AWP references use plain momentum (their presets say so)
    weight_decay: float = 5e-4


@dataclass
class TrainContext:
    """What a method knows about the run: dataset, ε (in [0, 1] units), model name, epochs."""

    spec: DatasetSpec
    eps: float
    model_name: str
    device: torch.device
    epochs: int
    steps_per_epoch: int


#: The config type of a method: ``class MyMethod(Method[MyConfig])`` types ``self.config``.
C = TypeVar("C", bound=MethodConfig)


class Method(ABC, Generic[C]):
    """Base class of a training method, generic over its config dataclass.

    Subclasses derive ``Method[TheirConfig]``, set ``name``, ``description``, ``Config`` (the same
    :class:`MethodConfig` dataclass) and implement :meth:`step`; ``self.config`` then has the
    config's type (no ``isinstance`` checks). Optional hooks: :meth:`presets`,
    :meth:`default_config`, :meth:`check`, :meth:`start_epoch`, :meth:`probe_metrics`.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: fine-tune a pre-trained normal model by default (``defend`` trains ``standard`` first)
    fine_tunes: ClassVar[bool] = False
    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: C, ctx: TrainContext) -> None:
        type(self).check(config)
        self.config: C = config
        self.ctx = ctx
        self.epoch = 0

    # -- configuration ---------------------------------------------------------------------
    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        """Named sets of overrides (e.g. ``paper``)."""
        return {}

    @classmethod
    def default_config(cls, spec: DatasetSpec, model_name: str) -> dict[str, Any]:
        """Overrides of the dataclass defaults for a dataset/model (before presets and user values)."""
        return {}

    @classmethod
    def check(cls, config: C) -> None:
        """Refuse invalid option values with a one-line :class:`UsageError` (default: accept).

        Called by :meth:`make_config` (so bad ``--method-arg`` values fail before any training)
        and by ``__init__``.
        """
        return None

    @classmethod
    def make_config(
        cls, spec: DatasetSpec, model_name: str, *, preset: str | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> C:
        """Resolve defaults → dataset defaults → preset → user overrides into a Config."""
        values: dict[str, Any] = dict(cls.default_config(spec, model_name))
        if preset is not None:
            presets = cls.presets()
            if preset not in presets:
                valid = ", ".join(sorted(presets)) or "none"
                raise UsageError(f"method {cls.name!r} has no preset {preset!r} (presets: {valid})")
            values.update(presets[preset])
        values.update(overrides or {})
        fields = {f.name: f for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise UsageError(
                f"method {cls.name!r} has no option {', '.join(unknown)} (options: {', '.join(sorted(fields))})"
            )
        config = cast(C, cls.Config(**values))
        cls.check(config)
        return config

    # -- optimisation ----------------------------------------------------------------------
    def make_optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Optimizer and a per-step LR scheduler as the config describes."""
        c = self.config
        params = [p for p in model.parameters() if p.requires_grad]
        opt: torch.optim.Optimizer
        if c.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                                  nesterov=c.nesterov and c.momentum > 0)
        elif c.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        else:
            raise UsageError(f"unknown optimizer {c.optimizer!r}: use sgd or adam")
        total = max(1, self.ctx.epochs * self.ctx.steps_per_epoch)
        spe = max(1, self.ctx.steps_per_epoch)
        sched: torch.optim.lr_scheduler.LRScheduler
        if c.lr_schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=c.lr_final or 0.0)
        elif c.lr_schedule == "exponential":
            final = c.lr_final if c.lr_final is not None else c.lr * 1e-2
            gamma = (final / c.lr) ** (1.0 / max(1, total - 1))
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
        elif c.lr_schedule == "step":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, [m * spe for m in c.lr_milestones], gamma=0.1)
        elif c.lr_schedule == "constant":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        else:
            raise UsageError(f"unknown lr_schedule {c.lr_schedule!r}: use cosine, exponential, step or constant")
        return opt, sched

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch (0-based), also when resuming."""
        self.epoch = epoch

    @abstractmethod
    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One optimisation step on a batch of [0, 1] images. Returns scalar metrics (``loss``...).

        Values are Python floats or 0-dim tensors; return detached tensors for anything computed
        on the device: the training loop sums them there and reads them once every
        ``sync_every`` steps, so a step never waits for the GPU (a ``float(loss)`` per step does).
        """

    def probe_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Extra per-epoch measurements on a fixed probe batch (model in eval mode)."""
        return {}


def config_dict(config: MethodConfig) -> dict[str, Any]:
    """A method config as a JSON-ready dict (tuples become lists): run folders, checkpoints, cache keys."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


# -- registry --------------------------------------------------------------------------------
_METHODS: PluginRegistry[type[Method[Any]]] = PluginRegistry(group=METHOD_ENTRY_POINT_GROUP, base=Method,
                                                              kind="method")

M = TypeVar("M", bound="type[Method[Any]]")


def register_method(cls: M) -> M:
    """Register a method class (usable as a decorator). Re-registering a name replaces it."""
    _METHODS.register(cls)
    return cls


def _available() -> dict[str, type[Method[Any]]]:
    return _METHODS.available()


def list_methods() -> list[str]:
    """Names of all installed methods."""
    return sorted(_available())


def get_method(name: str) -> type[Method[Any]]:
    """The method class registered as ``name``; an unknown name lists the valid ones."""
    methods = _available()
    try:
        return methods[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}: choose one of {', '.join(sorted(methods))}") from None


def unregister_method(name: str) -> None:
    """Remove a method added with :func:`register_method` (entry points are unaffected)."""
    _METHODS.unregister(name)


def parse_method_args(cls: type[Method[Any]], items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings into typed overrides for ``cls.Config``."""
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise UsageError(f"method option {item!r} must look like key=value")
        if key not in fields:
            raise UsageError(f"method {cls.name!r} has no option {key!r} (options: {', '.join(sorted(fields))})")
        out[key] = _coerce(raw, fields[key].default, key, str(fields[key].type))
    return out


def _coerce(raw: str, default: Any, key: str, declared: str = "") -> Any:
    """Parse ``raw`` as the field's type (from its default, or its declared type when it is None)."""
    raw = raw.strip()
    if raw.lower() in ("none", "null") and (default is None or "None" in declared):
        return None
    if default is None:  # e.g. ``int | None``: parse by the declared type
        default = 0 if "int" in declared else 0.0 if "float" in declared else ""
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            conv = float if "float" in declared else int
            return tuple(conv(v) for v in raw.split(",") if v)
    except ValueError:
        raise UsageError(f"method option {key}={raw!r}: expected a {type(default).__name__}") from None
    return raw
