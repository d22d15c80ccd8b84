"""Which modules of a network are its "layers" for the feature measurements, and their outputs.

Default layers (:func:`default_layers`) are the top-level stages of the classifier behind a
:class:`~cure_eval.models.NormalizedModel` (or of the model itself), found generically:

1. timm's ``feature_info`` (timm ResNets: ``act1``, ``layer1`` … ``layer4``), when the network has it;
2. otherwise the children named like stages: the stem (``stem``, ``conv1``), ``layer1`` … ``layerN``,
   and the children of a ``layers`` / ``stages`` / ``blocks`` container (our CIFAR ResNet and
   Wide-ResNet: ``conv1``, ``layers.0`` … ``layers.2``).

The model's output (the logits) is always added as the last layer, named :data:`LOGITS`.
Names are those of ``model.named_modules()`` of the audited model (``model.layers.0`` behind a
``NormalizedModel``); a user may also give them relative to the wrapped network (``layers.0``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import NotApplicable, UsageError

#: the name of the model's output in the layer lists
LOGITS = "logits"
#: child names taken as the stem of a network
_STEM = ("stem", "conv1", "conv_stem")
#: child containers whose children are the network's stages
_CONTAINERS = ("layers", "stages", "blocks")
_LAYER_N = re.compile(r"^layer\d+$")


def _inner(model: nn.Module) -> tuple[nn.Module, str]:
    """The wrapped network of a ``NormalizedModel``-like wrapper and its name prefix."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(model, "normalize"):
        return inner, "model."
    return model, ""


def default_layers(model: nn.Module) -> list[str]:
    """The top-level stages of ``model`` (see the module docs), then :data:`LOGITS`.

    Raises :class:`~cure_eval.errors.NotApplicable` when no stage can be found (name the
    modules with ``--features-layers`` then)."""
    net, prefix = _inner(model)
    modules = dict(net.named_modules())
    names: list[str] = []
    info = getattr(net, "feature_info", None)
    if info is not None:
        try:
            names = [str(f["module"]) for f in info]
        except (TypeError, KeyError):
            names = []
        names = [n for n in names if n in modules and n]
    if not names:
        for child, _ in net.named_children():
            if child in _STEM or _LAYER_N.match(child):
                names.append(child)
            elif child in _CONTAINERS and isinstance(modules[child], nn.Sequential | nn.ModuleList):
                names.extend(f"{child}.{k}" for k, _ in modules[child].named_children())
    if not names:
        raise NotApplicable("no stage found (no timm feature_info, no child named stem/conv1/layerN/layers/"
                            "stages/blocks): name the modules in `layers`")
    return [prefix + n for n in names] + [LOGITS]


def resolve_layers(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    """``names`` checked against ``model.named_modules()`` (also accepted relative to the network
    behind a ``NormalizedModel``; :data:`LOGITS` for the output); ``None`` or empty:
    :func:`default_layers`. An unknown name raises :class:`~cure_eval.errors.UsageError` listing
    the valid ones."""
    if not names:
        return default_layers(model)
    modules = {n for n, _ in model.named_modules() if n}
    _, prefix = _inner(model)
    out: list[str] = []
    for name in names:
        if name == LOGITS or name in modules:
            full = name
        elif prefix and prefix + name in modules:
            full = prefix + name
        else:
            valid = sorted(modules, key=lambda n: (n.count("."), n))
            shown = ", ".join(valid[:40]) + (f", … ({len(valid)} in all)" if len(valid) > 40 else "")
            raise UsageError(f"`layers`: no module {name!r} in the model; valid names: {LOGITS}, {shown}")
        if full not in out:
            out.append(full)
    return out


def _first_tensor(value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise UsageError(f"a feature layer returned {type(value).__name__}, not a tensor: choose other `layers`")


@contextmanager
def capture(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks on ``layers`` (not :data:`LOGITS`): inside the ``with``, every forward pass
    of ``model`` fills the yielded dict with each layer's output, flattened per sample
    ``(N, features)``; a module called several times in one pass keeps its last output. The
    hooks are removed on exit."""
    modules = dict(model.named_modules())
    store: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            store[name] = _first_tensor(output).flatten(1)
        return hook

    try:
        for name in layers:
            if name != LOGITS:
                handles.append(modules[name].register_forward_hook(hook_for(name)))
        yield store
    finally:
        for h in handles:
            h.remove()


def layer_outputs(model: nn.Module, layers: Sequence[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's output on ``x``, flattened per sample, in ``layers``' order (gradients flow
    when ``x`` requires them). The model's mode is the caller's."""
    with capture(model, layers) as store:
        logits = model(x)
        got = dict(store)
    got[LOGITS] = logits.flatten(1)
    return {name: got[name] for name in layers}
