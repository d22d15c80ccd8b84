"""The tensor codec of the file store: a unit record (:mod:`cure_eval.attacks.units`) to JSON and
back, bit-exactly.

A tensor is stored as ``{"dtype", "data"}`` (inf/NaN as JSON's ``Infinity``/``NaN``); any other
value as itself; a record's keys in :data:`~cure_eval.attacks.units.NOT_STORED` (the adversarial
images) are left out, so a record read back carries every other key a unit runner wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..attacks.units import NOT_STORED


def encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": str(t.dtype).removeprefix("torch."), "data": t.tolist()}


def decode_tensor(d: Mapping[str, Any]) -> torch.Tensor:
    return torch.tensor(d["data"], dtype=getattr(torch, d["dtype"]))


def _is_tensor(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"dtype", "data"}


def encode_record(value: Any) -> Any:
    """``value`` with every tensor encoded and the :data:`NOT_STORED` keys left out."""
    if isinstance(value, torch.Tensor):
        return encode_tensor(value)
    if isinstance(value, Mapping):
        return {k: encode_record(v) for k, v in value.items() if k not in NOT_STORED}
    if isinstance(value, (list, tuple)):
        return [encode_record(v) for v in value]
    return value


def decode_record(value: Any) -> Any:
    """The inverse of :func:`encode_record` (tensors back, with their dtypes)."""
    if _is_tensor(value):
        return decode_tensor(value)
    if isinstance(value, Mapping):
        return {k: decode_record(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_record(v) for v in value]
    return value
