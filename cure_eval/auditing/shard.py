"""The process group of a sharded audit: which chunks this process attacks, and how the ranks
meet (``torchrun --nproc_per_node=N -m cure_eval.audit``).

A gloo process group is set up from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR/PORT``); chunk ``k`` belongs to rank ``k mod N``; rank 0 gathers
the per-sample records and alone writes the audit's outputs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from ..errors import CureEvalError

#: Collective timeout: a rank may wait this long for slower ranks (torchrun stops every rank
#: as soon as one fails, so this never hides a crash).
PROCESS_GROUP_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Shard:
    """This process's place in a sharded audit (``Shard()``: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def chunks(self, n_chunks: int) -> list[int]:
        """The chunks this rank attacks (round robin)."""
        return list(range(self.rank, n_chunks, self.world_size))

    def barrier(self) -> None:
        if self.sharded:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (in rank order), ``None`` elsewhere."""
        if not self.sharded:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def device(self, device: torch.device) -> torch.device:
        """``cuda`` without an index means this rank's GPU (``LOCAL_RANK``) when sharded."""
        if self.sharded and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise CureEvalError(f"environment variable {name}={value!r} is not an integer") from None


def shard_from_env(env: Mapping[str, str] | None = None) -> Shard:
    """Join torchrun's process group (gloo) when ``WORLD_SIZE > 1``; a single process otherwise."""
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE") or 1
    if world <= 1:
        return Shard()
    rank = _env_int(env, "RANK")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
    if rank is None or missing:
        raise CureEvalError(f"WORLD_SIZE={world} but {', '.join(missing or ['RANK'])} not set: start "
                            f"sharded audits with torchrun, which sets them")
    local = _env_int(env, "LOCAL_RANK")
    import torch.distributed as dist

    if not dist.is_available():
        raise CureEvalError("this torch build has no torch.distributed: run the audit in one process")
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise CureEvalError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                            f"the environment says {rank} of {world}")
    return Shard(rank=rank, world_size=world, local_rank=rank if local is None else local)


def close_shard(shard: Shard) -> None:
    if shard.sharded:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def process_group(env: Mapping[str, str] | None = None) -> Iterator[Shard]:
    """This process's :class:`Shard` (joining torchrun's process group when ``WORLD_SIZE > 1``),
    left again on exit."""
    shard = shard_from_env(env)
    try:
        yield shard
    finally:
        close_shard(shard)
