"""The fingerprint of an audit: everything its per-point results depend on (the model's weights
hash and identity, dataset, points and their data hash, ε, attacks, cascade, seed, PGD step, SPSA
iterations, batch size, the suite settings the audit leaves at their defaults, device type,
library versions). A unit store made with another fingerprint is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..attacks import SUITE_SETTINGS, attack_order, library_versions
from ..core.io import _json_default

#: The suite settings an audit sets from its options; the others stay at their defaults.
AUDIT_SETTINGS = ("pgd_alpha", "spsa_iterations")
#: The suite settings the audit leaves at their defaults (part of the fingerprint).
SUITE_DEFAULTS: dict[str, Any] = {s.name: s.default for s in SUITE_SETTINGS
                                  if s.reported and s.name not in AUDIT_SETTINGS}


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{t.dtype}:{t.numel()};".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().tobytes())


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}".encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def tensors_sha256(*tensors: torch.Tensor) -> str:
    """sha256 over tensors (shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{tuple(t.shape)}".encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def audit_fingerprint(
    *, model: nn.Module, desc: Mapping[str, Any], dataset: str, x: torch.Tensor, y: torch.Tensor,
    indices: torch.Tensor, eps: float, pgd_alpha: float, attacks: Sequence[str], cascade: bool, seed: int,
    spsa_iterations: int, batch_size: int, device: torch.device,
) -> dict[str, Any]:
    """Everything the per-point results depend on (paths excluded: the weights' hash identifies them)."""
    identity = {k: v for k, v in desc.items() if k not in ("path", "weights")}
    identity["state_sha256"] = state_dict_sha256(model)
    return normal({
        "model": identity, "dataset": dataset, "points": indices.tolist(), "data_sha256": tensors_sha256(x, y),
        "eps": float(eps), "pgd_alpha": float(pgd_alpha), "attacks": attack_order(attacks, cascade=cascade),
        "cascade": bool(cascade), "seed": int(seed), "spsa_iterations": int(spsa_iterations),
        "batch_size": int(batch_size), "suite_defaults": SUITE_DEFAULTS, "device_type": torch.device(device).type,
        "versions": {"cure_eval": __version__, **library_versions()},
    })


def normal(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples → lists, numpy → Python)."""
    return json.loads(dumps(obj))


def dumps(obj: Any) -> str:
    """Compact JSON (the store's on-disk form)."""
    return json.dumps(obj, separators=(",", ":"), default=_json_default)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints, one short phrase per setting."""
    diffs = []
    for key in list(new) + [k for k in old if k not in new]:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = [k for k in list(b) + [k for k in a if k not in b] if a.get(k) != b.get(k)]
            diffs.append(f"{key}: {', '.join(sub)} differ")
        else:
            diffs.append(f"{key}: {_short(a)} → {_short(b)}")
    return diffs
