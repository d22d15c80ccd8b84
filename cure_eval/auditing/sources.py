"""Where an audited model comes from: a ``defend`` checkpoint or run folder, a timm name or alias
(optionally with weights), a ``module:factory`` reference, a RobustBench model
(:mod:`cure_eval.models.robustbench`), or the latest finished ``defend`` run; and the check that
a model fits the dataset.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import DatasetSpec, get_dataset_spec
from ..errors import CureEvalError, UsageError
from ..models import create_model, load_factory, model_config_for
from ..models.checkpoint import CHECKPOINT_NAME, load_checkpoint, load_state, load_weights_file

log = logging.getLogger("cure_eval.audit")


def load_audit_model(
    *, checkpoint: str | None, model: str | None, weights: str | None, dataset: str | None,
    depth: int | None, widen: int | None, device: torch.device, model_dir: str | None = None,
    threat_model: str = "Linf", download: bool = False,
) -> tuple[nn.Module, DatasetSpec, dict[str, Any]]:
    """Build the model to audit and say where it came from. Returns (model, dataset spec, description).

    ``model="robustbench:<name>"`` loads a RobustBench model through the ``robustbench`` package
    from ``model_dir`` (``dataset`` default cifar10, ``threat_model`` Linf; nothing is downloaded
    unless ``download``): see :mod:`cure_eval.models.robustbench`."""
    if (checkpoint is None) == (model is None):
        raise UsageError("give exactly one of `checkpoint` (a path) or `model` (a name)")
    if model is not None and model.startswith("robustbench:"):
        from ..models.robustbench import DEFAULT_MODEL_DIR, load_robustbench_model

        if weights is not None:
            raise UsageError("`weights` does not go with a RobustBench model: its checkpoint comes from `model_dir`")
        spec = get_dataset_spec(dataset or "cifar10")
        rb_net, rb_desc = load_robustbench_model(model.removeprefix("robustbench:"), model_dir=model_dir or DEFAULT_MODEL_DIR,
                                                 dataset=spec.name, threat_model=threat_model, download=download)
        return rb_net.to(device).eval(), spec, rb_desc
    if model_dir is not None:
        raise UsageError("`model_dir` goes with `model=robustbench:NAME`")
    if checkpoint is not None:
        if weights is not None:
            raise UsageError("`weights` goes with `model`, not `checkpoint`")
        loaded, info = load_checkpoint(checkpoint, device=device)
        spec = get_dataset_spec(dataset or info.dataset)
        if spec.name != info.dataset:
            log.warning("checkpoint was trained on %s, auditing on %s", info.dataset, spec.name)
        if info.model.num_classes != spec.num_classes or info.model.in_chans != spec.in_chans:
            raise CureEvalError(
                f"checkpoint has {info.model.num_classes} classes / {info.model.in_chans} channels but "
                f"{spec.name} has {spec.num_classes} / {spec.in_chans}: pass the matching `dataset`"
            )
        return loaded, spec, {"source": "checkpoint", "path": info.path, "model": info.model.name,
                           "method": info.method, "epoch": info.epoch}
    assert model is not None
    spec = get_dataset_spec(dataset or "digits")
    net: nn.Module
    desc: dict[str, Any]
    if ":" in model:
        net = load_factory(model)
        desc = {"source": "factory", "reference": model}
        if weights:
            load_state(net, load_weights_file(weights), source=weights)
    else:
        cfg = model_config_for(model, spec, depth=depth, widen=widen)
        wrapped = create_model(cfg)
        net = wrapped
        desc = {"source": "timm", "model": cfg.name, "kwargs": cfg.kwargs}
        if weights:
            state = load_weights_file(weights)
            # accept a state dict of the wrapped model or of the bare timm network
            target: nn.Module = wrapped if any(k.startswith("normalize.") for k in state) else wrapped.model
            load_state(target, state, source=weights)
        else:
            log.warning("auditing an untrained %s (no --weights): the numbers describe random weights", cfg.name)
    if weights:
        desc["weights"] = weights
    return net.to(device).eval(), spec, desc


def latest_defend_run(root: str | Path = "runs") -> Path | None:
    """The most recent finished ``defend`` run folder under ``root`` (newest ``results.json``
    naming a method whose checkpoint and the normal model's both exist), or ``None``."""
    runs = []
    for res in Path(root).glob("*/results.json"):
        try:
            method = json.loads(res.read_text(encoding="utf-8")).get("method")
        except (OSError, ValueError, AttributeError):
            continue
        run = res.parent
        if isinstance(method, str) and all((run / m / CHECKPOINT_NAME).is_file() for m in ("standard", method)):
            runs.append((res.stat().st_mtime, str(run), run))
    return max(runs)[2] if runs else None


def defend_run_checkpoints(run: Path) -> list[str]:
    """The normal and the defended model of a ``defend`` run folder, in that order (as defend
    reports them); only the normal one when the method is ``standard`` itself."""
    method = json.loads((run / "results.json").read_text(encoding="utf-8"))["method"]
    return [str(run / m / CHECKPOINT_NAME) for m in dict.fromkeys(("standard", method))]


def check_model_outputs(model: nn.Module, x: torch.Tensor, spec: DatasetSpec, device: torch.device) -> None:
    """A model must map a batch of [0, 1] images to finite ``(N, num_classes)`` logits."""
    with torch.no_grad():
        try:
            out = model(x[:8].to(device))
        except Exception as exc:
            raise CureEvalError(
                f"the model failed on a batch of {tuple(x[:8].shape)} images: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160]} (does it fit `dataset={spec.name}`?)"
            ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != spec.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CureEvalError(f"the model returned {shape}, expected (N, {spec.num_classes}) logits for {spec.name}")
    if not torch.isfinite(out).all():
        raise CureEvalError("the model's outputs contain NaN or infinite values: check its weights and input range")


def audit_labels(descs: list[dict[str, Any]]) -> list[str]:
    """Short unique names for the audited models (method name, else model name)."""
    raw = [str(d.get("method") or d.get("model") or d.get("reference", "model")) for d in descs]
    raw = [Path(r.split(":")[-1]).stem if d.get("source") == "factory" else r for r, d in zip(raw, descs, strict=True)]
    out: list[str] = []
    for r in raw:
        name, k = r, 2
        while name in out:
            name, k = f"{r}_{k}", k + 1
        out.append(name)
    return out
