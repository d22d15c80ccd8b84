"""Checkpoints: safetensors weights plus JSON metadata; never unpickled.

A checkpoint is one ``.safetensors`` file. Its tensors are the state dict of the
:class:`~cure_eval.models.NormalizedModel` (``model.*`` and ``normalize.*``); its metadata key
``cure_eval`` holds a JSON document::

    {"format": "cure_eval.checkpoint/1", "model": {ModelConfig}, "dataset": "digits",
     "method": "cure", "method_config": {...}, "epoch": 5, "extra": {...}}

so a model can be rebuilt from the file alone. safetensors never executes code, so loading a
checkpoint from a stranger is safe. The resumable training state (optimizer, RNG) lives in a
separate ``train_state.pt`` that is loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.io import atomic_write
from ..errors import CureEvalError
from .factory import ModelConfig, NormalizedModel, create_model

CHECKPOINT_FORMAT = "cure_eval.checkpoint/1"
CHECKPOINT_NAME = "model.safetensors"


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself."""

    model: ModelConfig
    dataset: str
    method: str
    method_config: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "model": self.model.to_dict(), "dataset": self.dataset,
                "method": self.method, "method_config": self.method_config, "epoch": self.epoch,
                "extra": self.extra}


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, info: CheckpointInfo) -> None:
    """Write ``model`` and ``info`` atomically (temporary file, then rename)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    meta = {"cure_eval": json.dumps(info.to_dict())}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def resolve_checkpoint_path(path: str | os.PathLike[str], method: str | None = None) -> Path:
    """Accept a checkpoint file or a ``defend`` run folder (whose ``results.json`` names the method)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise CureEvalError(f"checkpoint {p} does not exist: pass a .safetensors file or a defend run folder")
    if (p / CHECKPOINT_NAME).is_file():
        return p / CHECKPOINT_NAME
    if method is None and (p / "results.json").is_file():
        try:
            method = json.loads((p / "results.json").read_text()).get("method")
        except json.JSONDecodeError:
            method = None
    if method and (p / method / CHECKPOINT_NAME).is_file():
        return p / method / CHECKPOINT_NAME
    found = sorted(p.glob(f"*/{CHECKPOINT_NAME}"))
    if len(found) == 1:
        return found[0]
    raise CureEvalError(
        f"no checkpoint in {p}: expected {CHECKPOINT_NAME} or <method>/{CHECKPOINT_NAME}"
        + (f" (found {', '.join(str(f.parent.name) for f in found)}; pass the file)" if found else "")
    )


def read_checkpoint_info(path: str | os.PathLike[str]) -> CheckpointInfo:
    from safetensors import safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CureEvalError(
            f"{p} is not a readable cure_eval checkpoint ({exc}): it is truncated, corrupt or not a "
            f"safetensors file; re-create it with cure_eval.defend"
        ) from None
    return _parse_meta(meta, p)


def _parse_meta(meta: dict[str, str], p: Path) -> CheckpointInfo:
    try:
        doc = json.loads(meta["cure_eval"])
        if doc.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        return CheckpointInfo(
            model=ModelConfig.from_dict(doc["model"]), dataset=str(doc["dataset"]),
            method=str(doc["method"]), method_config=dict(doc.get("method_config", {})),
            epoch=int(doc.get("epoch", 0)), extra=dict(doc.get("extra", {})), path=str(p),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise CureEvalError(
            f"{p} has no valid cure_eval metadata ({exc}): load raw weights as a `model` name with `weights` (a file)"
        ) from None


def load_checkpoint(
    path: str | os.PathLike[str], *, device: torch.device | str = "cpu", method: str | None = None
) -> tuple[NormalizedModel, CheckpointInfo]:
    """Rebuild the model stored at ``path`` (file or run folder) in eval mode on ``device``."""
    p = resolve_checkpoint_path(path, method)
    info = read_checkpoint_info(p)
    try:
        state = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CureEvalError(f"{p} is truncated or corrupt ({exc}): re-create it with cure_eval.defend") from None
    model = create_model(info.model)
    load_state(model, state, source=str(p))
    return model.to(device).eval(), info


def load_state(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error on an architecture mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CureEvalError(
            f"{source} does not fit this model ({detail[:200]}): check `model`, `depth`/`widen` and the dataset's class count"
        ) from None


def load_weights_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a plain state dict from ``.safetensors`` or a ``.pt``/``.pth`` file, without unpickling code.

    ``.pt`` files go through ``torch.load(weights_only=True)``, which refuses arbitrary objects.
    """
    p = Path(path)
    if not p.is_file():
        raise CureEvalError(f"weights file {p} does not exist")
    try:
        if p.suffix == ".safetensors":
            return load_file(str(p), device="cpu")
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CureEvalError(
            f"refusing to load {p}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]} "
            f"(only plain tensor state dicts are accepted; convert it to .safetensors)"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CureEvalError(f"{p} does not hold a state dict of tensors")
    return obj


def save_train_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_train_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CureEvalError(f"training state {path} is unreadable ({type(exc).__name__}): delete it to start over") from None
    if not isinstance(obj, dict):
        raise CureEvalError(f"training state {path} is not a dict: delete it to start over")
    return obj


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel wrappers."""
    return getattr(model, "module", model)
