"""Data-parallel training over several processes (``torchrun --nproc_per_node=N -m cure_eval.defend``).

Set-up and helpers
------------------
:func:`setup` joins the process group that ``torchrun`` describes in its environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): ``nccl`` with device
``cuda:LOCAL_RANK`` on CUDA, ``gloo`` on the CPU. Without ``torchrun`` (``WORLD_SIZE`` unset or 1)
everything here is a no-op (:func:`world_size` is 1, :func:`barrier` does nothing,
:func:`broadcast_object` returns its argument), so the single-process path is unchanged.
:func:`teardown` destroys the group if :func:`setup` created it.

How gradients are synchronised: no ``DistributedDataParallel`` wrapper
------------------------------------------------------------------------
The model is **not** wrapped in :class:`torch.nn.parallel.DistributedDataParallel`. Instead
:class:`GradientAverager` registers a *step pre-hook* on the method's optimizer: every
``optimizer.step()`` first replaces each parameter's ``.grad`` by its mean over the ranks (one
flat all-reduce per dtype), then updates. Every rank starts from the same weights
(:func:`broadcast_module_`) and applies the same averaged gradient with the same optimizer state,
so the weights stay identical on every rank, and since each rank's loss is the mean over an equal
share of the global batch, the averaged gradient is the gradient of the global-batch mean loss,
exactly what one process computes (up to float summation order).

Why not DDP: a method plugin owns its whole step (:mod:`cure_eval.training.methods`): CURE runs three
forwards and a double backward (``autograd.grad(..., create_graph=True)`` w.r.t. the input, then
``backward()`` through those graphs), PGD-AT/TRADES run 10 input-gradient forwards per step, AWP
calls a ``functional_call`` proxy and perturbs the weights in place around ``backward()``, DeepFool
goes through foolbox, and the plugin API explicitly allows "several backward passes". DDP's
reducer instead assumes one forward followed by exactly one backward in which every parameter's
gradient hook fires once per iteration: double backprop with ``create_graph=True``, several
``backward()`` calls, or forwards without a backward are the well-known sources of "Expected to
mark a variable ready only once" / "finished reduction in the prior iteration" errors or silently
wrong reductions. Whether a given plugin happens to fit depends on its internals and on the torch
version: with torch 2.14, cure, pgd_at, trades, awp and adv_finetune each ran two steps under a
plain DDP wrapper without raising, but nothing in the plugin contract guarantees that for the next
plugin. The alternatives
all have a catch: ``no_sync()`` plus a final DDP forward needs method-specific code in the core;
``static_graph=True`` requires the same graph every iteration (AWP switches its perturbation on
after warm-up; ``bn_mode`` changes the number of forwards). The wrapper also broadcasts rank 0's
buffers at *every* forward, which makes every forward through it a collective: the rank-0-only
probe and evaluation would have to be routed around it, and plugins that hand the model to foolbox
or ``functional_call`` would see the wrapper. Averaging the gradients at ``optimizer.step()`` is
correct for any number of forwards/backwards, needs no change to any plugin (they receive the bare
module and the real optimizer; the hook is invisible), and lets rank 0 alone run evaluation
forwards. The cost: the all-reduce does not overlap the backward pass as DDP's bucketed hooks do
(one all-reduce of the gradient size per step, small next to CURE's three forwards + double
backward).
Contract for plugins (all current ones meet it): call ``optimizer.step()`` the same number of times
on every rank (it is a collective), and put into ``.grad`` the gradient of a *mean* over the batch.
Anything a plugin computes from its local batch besides the gradient stays per rank (e.g. AWP's
weight-perturbation direction comes from the local half-batch, gradient clipping inside ``step``
would clip the local gradient).

BatchNorm
---------
In train mode each rank normalises with the statistics of its *local* batch (``batch_size / N``
samples; "ghost" batch norm), so a multi-process run differs slightly from a one-process run with
the same global batch: that, and float summation order, are why single- and multi-process results
are close but not identical whenever BatchNorm uses batch statistics (``standard``, ``pgd_at``...,
CURE's loss forward with ``bn_mode=eval|train``). With no batch statistics (a BatchNorm-free model,
or CURE with ``bn_mode=frozen``) they agree to float precision. The running statistics
(``running_mean``/``running_var``) are averaged over the ranks in the same pre-step all-reduce as
the gradients, so the eval-mode passes of the next step (CURE's regulariser passes, the attacks)
see the same statistics on every rank; since the running mean is an exponential average, the
average of the per-rank averages is the running mean of the global batch means (exactly for the
first BatchNorm layer; deeper layers' inputs already depend on the local normalisation), while
the averaged running variance misses the between-rank spread of the means. At each epoch end
:func:`sync_module_state_` averages them again and broadcasts every parameter and buffer from rank
0, so checkpoints hold exactly what every rank holds. ``SyncBatchNorm`` is not offered: it only runs
on GPUs, its autograd function has no double backward (CURE differentiates through BatchNorm's
backward when ``bn_mode=train``), and it would turn each of the many train-mode forwards of a step
into a collective.

Multi-node runs need ``--out`` (and ``--init``/``--cache-dir``) on a filesystem shared by all
ranks: rank 0 alone writes, every rank reads the same files after a barrier (resume, cached models).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from ..errors import CureEvalError, UsageError

log = logging.getLogger(__name__)

_OWNED = False  # True when setup() created the process group (and teardown() must destroy it)


# -- environment and process group ------------------------------------------------------------
def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """``RANK`` as torchrun sets it (0 when not launched by torchrun); usable before :func:`setup`."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """``LOCAL_RANK``: this process's index on its node (selects ``cuda:LOCAL_RANK``)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes training together (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the only rank that writes files and evaluates."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group if launched with ``WORLD_SIZE > 1``; return this rank's device.

    ``device`` is the device the command line resolved (``--device``): CUDA becomes
    ``cuda:LOCAL_RANK`` with the ``nccl`` backend, the CPU uses ``gloo``. A no-op that returns
    ``device`` when not launched by torchrun or when a process group already exists.
    """
    global _OWNED
    if is_initialized() or env_world_size() <= 1:
        return device
    if not dist.is_available():
        raise UsageError("torch.distributed is not available in this PyTorch build: run a single process")
    dev_id: torch.device | None = None
    if device.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local_rank()} but only {torch.cuda.device_count()} CUDA devices: "
                             "start fewer processes (torchrun's nproc_per_node)")
        device = dev_id = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UsageError(f"distributed training supports cuda and cpu, not {device.type}: pass `device=cpu` or `device=cuda`")
    dist.init_process_group(backend=backend, device_id=dev_id)
    _OWNED = True
    log.debug("rank %d/%d on %s (%s)", rank(), world_size(), device, backend)
    return device


def teardown() -> None:
    """Destroy the process group if :func:`setup` created it."""
    global _OWNED
    if _OWNED and is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def _comm_device() -> torch.device:
    """Where small helper tensors of a collective live (``nccl`` needs CUDA tensors)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- collectives (no-ops in a single process) -------------------------------------------------
def barrier() -> None:
    """Wait until every rank gets here."""
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it (picklable objects)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_true(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (so that all ranks take the same branch)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def mean_dict(values: dict[str, float]) -> dict[str, float]:
    """Per-key mean of a dict of floats over the ranks (keys missing on a rank are skipped)."""
    if world_size() == 1:
        return dict(values)
    dicts = all_gather_object(values)
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    return {k: sum(d[k] for d in dicts if k in d) / sum(1 for d in dicts if k in d) for k in keys}


def _flat_groups(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Tensors grouped by (device, dtype), in first-seen order (the same on every rank)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


@torch.no_grad()
def _coalesced(tensors: Iterable[torch.Tensor], *, mean: bool, src: int = 0) -> None:
    """In place: mean over the ranks (``mean=True``) or rank ``src``'s values, one flat
    all-reduce/broadcast per (device, dtype) group."""
    world = world_size()
    if world == 1:
        return
    for group in _flat_groups(tensors):
        flat = torch.cat([t.reshape(-1) for t in group])
        if mean:
            dist.all_reduce(flat)
            flat.div_(world)
        else:
            dist.broadcast(flat, src=src)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def _bn_running_stats(module: nn.Module) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            out.extend(b for b in (m.running_mean, m.running_var) if isinstance(b, torch.Tensor))
    return out


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank."""
    _coalesced([*module.parameters(), *module.buffers()], mean=False, src=src)


def average_bn_stats_(module: nn.Module) -> None:
    """Replace every BatchNorm running mean/variance by its mean over the ranks."""
    _coalesced(_bn_running_stats(module), mean=True)


def sync_module_state_(module: nn.Module) -> None:
    """Average the BatchNorm running statistics, then make every parameter and buffer rank 0's
    (they are already equal up to float round-off; the checkpoint then holds what every rank has)."""
    average_bn_stats_(module)
    broadcast_module_(module)


def rank_seed(seed: int, epoch: int, rank_: int) -> int:
    """Seed of a rank's global RNG for one epoch (PGD random starts, TRADES noise...): distinct per
    rank (no two ranks draw the same noise) and a function of (seed, epoch, rank) only, so a
    resumed epoch draws exactly what an uninterrupted one would."""
    return ((seed * 1_000_003 + epoch) * 65_537 + rank_ + 1) % (2**63 - 1)


class GradientAverager:
    """Average gradients (and BatchNorm running statistics) over the ranks before every
    ``optimizer.step()``, through a step pre-hook; see the module docstring for why this replaces
    DistributedDataParallel. A parameter without a gradient on every rank keeps ``grad = None``;
    one with a gradient on some ranks only is averaged with zeros from the others (the mean over
    the global batch). Use as a context manager or call :meth:`remove`."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        self.optimizer = optimizer
        self.bn_stats = _bn_running_stats(model)
        self.handle: RemovableHandle | None = optimizer.register_step_pre_hook(self._hook)

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.average_gradients()

    @torch.no_grad()
    def average_gradients(self) -> None:
        if world_size() == 1:
            return
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if any(p.grad is not None and p.grad.is_sparse for p in params):
            raise CureEvalError("sparse gradients are not supported in distributed training")
        has = torch.tensor([float(p.grad is not None) for p in params], device=_comm_device())
        dist.all_reduce(has)
        grads: list[torch.Tensor] = []
        for p, count in zip(params, has.tolist(), strict=True):
            if count == 0:
                continue  # no rank has a gradient: stays None everywhere
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        _coalesced([*grads, *self.bn_stats], mean=True)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def __enter__(self) -> GradientAverager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
