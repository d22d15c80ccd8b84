"""Counting model passes: how many forward and backward passes an attack spends, exactly.

Cost in *passes*, not seconds, is what makes attacks comparable across machines (AutoAttack
standard spends about 5.1k forward and 1.3k backward passes per robust point, Croce and Hein 2020,
https://arxiv.org/abs/2003.01690; Adaptive Auto Attack, Liu et al. CVPR 2022,
https://arxiv.org/abs/2203.05154, reports its savings in the same unit). A batch of ``b`` rows
costs ``b`` passes: the counter counts *samples* (batch rows) and *calls* separately.

:class:`PassCounter` is a context manager that hooks the top-level module for its duration and
removes its hooks in ``finally``::

    with PassCounter(model) as counter:
        attack(model, x, y)
    counter.passes.forward, counter.passes.backward      # samples (batch rows)
    counter.passes.forward_calls, counter.passes.backward_calls

How it counts (the model's own code is not touched):

* forward: a forward *pre*-hook on the top-level module adds the batch size of its first input
  (``len(args[0])``, or the first tensor keyword argument) and 1 call. Every caller that calls the
  module (``model(x)``: torchattacks, foolbox's ``PyTorchModel``, pyautoattack, our own code) is
  counted, under ``torch.no_grad`` or not; a call of ``model.forward(x)`` that bypasses
  ``__call__`` is not (none of the attacks here does that; the test on a self-counting model
  would show it);
* backward: a forward hook registers a tensor hook on the module's output (its first tensor) when
  that output requires grad; the tensor hook runs each time a gradient with respect to the output
  is computed, i.e. once per backward pass through the model (``backward()``,
  ``autograd.grad``, each ``retain_graph`` repetition, and again in a double backward when the
  second-order gradient flows back through the output), and adds the gradient's batch size. A
  backward pass of a graph built before the counter was entered is not counted (its output has no
  hook); nor is one through a graph that never reaches the output.

Counts are exact in the sense that :mod:`tests.test_passes` checks them, for every registered
attack, against a model that counts its own forward calls and the calls of a custom autograd
``Function``'s backward at its output.

Nothing here is specific to attacks: it counts any code that calls the model, e.g. a CURE
double-backprop training step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import UsageError
from .base import Attack, AttackContext, AttackOutput


@dataclass
class Passes:
    """Forward and backward passes: ``forward``/``backward`` count samples (batch rows),
    ``forward_calls``/``backward_calls`` count calls. ``forward_grad`` is the forward samples
    that were recorded for autograd (the output required grad)."""

    forward: int = 0
    backward: int = 0
    forward_calls: int = 0
    backward_calls: int = 0
    forward_grad: int = 0

    def __add__(self, other: Passes) -> Passes:
        return Passes(self.forward + other.forward, self.backward + other.backward,
                      self.forward_calls + other.forward_calls, self.backward_calls + other.backward_calls,
                      self.forward_grad + other.forward_grad)

    def __sub__(self, other: Passes) -> Passes:
        return Passes(self.forward - other.forward, self.backward - other.backward,
                      self.forward_calls - other.forward_calls, self.backward_calls - other.backward_calls,
                      self.forward_grad - other.forward_grad)

    @property
    def total(self) -> int:
        """Forward plus backward samples (the unit AutoAttack's cost is usually quoted in)."""
        return self.forward + self.backward

    def per_point(self, n: int) -> dict[str, float]:
        """``{"forward": …, "backward": …}`` divided by ``n`` points (NaN for ``n == 0``)."""
        if n <= 0:
            return {"forward": float("nan"), "backward": float("nan")}
        return {"forward": self.forward / n, "backward": self.backward / n}

    def as_dict(self) -> dict[str, int]:
        """The JSON record: ``{"forward", "backward", "forward_calls", "backward_calls", "forward_grad"}``."""
        return {"forward": self.forward, "backward": self.backward, "forward_calls": self.forward_calls,
                "backward_calls": self.backward_calls, "forward_grad": self.forward_grad}


def _batch_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return int(a.shape[0]) if a.dim() else 1
    return 1


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    if isinstance(out, dict):
        for o in out.values():
            if isinstance(o, torch.Tensor):
                return o
    return None


class PassCounter:
    """Count the forward and backward passes through ``model`` while the context is open.

    Re-entering a counter keeps adding to it; :meth:`reset` sets the counts to zero. Several
    counters may be open on one model at once (each has its own hooks). See the module docs for
    what is counted.

    Args:
        model: the top-level module the attacks call.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"PassCounter counts the passes of an nn.Module, got {type(model).__name__}")
        self.model = model
        self.passes = Passes()
        self._handles: list[RemovableHandle] = []

    def reset(self) -> None:
        self.passes = Passes()

    def _pre(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.passes.forward += _batch_rows(args, kwargs)
        self.passes.forward_calls += 1

    def _post(self, _module: nn.Module, _args: tuple[Any, ...], _kwargs: dict[str, Any], out: Any) -> None:
        t = _first_tensor(out)
        if t is None or not t.requires_grad:
            return
        self.passes.forward_grad += int(t.shape[0]) if t.dim() else 1

        def on_grad(grad: torch.Tensor) -> None:
            self.passes.backward += int(grad.shape[0]) if grad.dim() else 1
            self.passes.backward_calls += 1

        t.register_hook(on_grad)

    def __enter__(self) -> PassCounter:
        if self._handles:
            raise UsageError("this PassCounter is already open: use a second counter for a nested count")
        self._handles = [self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.model.register_forward_hook(self._post, with_kwargs=True)]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks (idempotent; the counts stay readable)."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()


@contextmanager
def count_passes(model: nn.Module) -> Iterator[Passes]:
    """``with count_passes(model) as passes:`` — the :class:`Passes` object fills in as the body
    runs (the same object, final when the block ends); the hooks are removed in ``finally``."""
    counter = PassCounter(model)
    with counter:
        yield counter.passes


def run_counted(attack: Attack[Any], ctx: AttackContext, x: torch.Tensor, y: torch.Tensor,
                ids: torch.Tensor) -> tuple[AttackOutput, Passes]:
    """``attack.run(ctx, x, y, ids)`` inside a :class:`PassCounter` on ``ctx.model``: the output
    and the passes the attack spent (the caller's own evaluation of the returned points is not in
    it). The one call a unit of work needs to record ``passes`` per attack."""
    with PassCounter(ctx.model) as counter:
        out = attack.run(ctx, x, y, ids)
    return out, counter.passes


def pass_record(passes: Passes) -> dict[str, int]:
    """The ``{"forward", "backward"}`` record of a count (batch rows), as a unit record keeps it."""
    return {"forward": int(passes.forward), "backward": int(passes.backward)}


def add_passes(*records: Mapping[str, int]) -> dict[str, int]:
    """The sum of ``{"forward", "backward"}`` records."""
    return {k: sum(int(r[k]) for r in records) for k in ("forward", "backward")}


#: The per-point pass columns (extras) of a suite unit's attack.
SHARE_EXTRAS = ("forward_share", "backward_share")


def pass_shares(passes: Mapping[str, int], attacked: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per point ``forward_share``/``backward_share``: a unit's passes shared equally among the
    points it attacked (0 for the others). The counter counts batch rows, not which point a row
    belongs to (an attack may run a point many times, or stop it early), so per point this is the
    unit's average, not the point's own count; summed over the points it is exact."""
    k = int(attacked.sum())
    out = {}
    for name, key in zip(SHARE_EXTRAS, ("forward", "backward"), strict=True):
        col = torch.zeros(len(attacked), dtype=torch.float64)
        if k:
            col[attacked] = passes[key] / k
        out[name] = col
    return out


def suite_passes(records: Sequence[Mapping[str, int] | None], *, n_clean: int,
                 families: Mapping[str, list[str]]) -> dict[str, Any]:
    """A suite run's passes from its unit records' (the ``n_clean`` clean units first):
    ``{"forward", "backward", "clean", "families"}``, or ``{}`` when a record was not counted
    (a unit stored before the counter existed)."""
    counted = [r for r in records if r is not None]
    if len(counted) != len(records):
        return {}
    return {**add_passes(*counted), "clean": add_passes(*counted[:n_clean]), "families": dict(families)}
