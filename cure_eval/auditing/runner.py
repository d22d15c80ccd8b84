"""The audit's suite: the units of :mod:`cure_eval.attacks.units` run into the audit's store, this
rank's chunks only, then gathered on rank 0 and assembled.

The points (in the audit's order) are cut into chunks of ``batch_size`` consecutive points; a unit
is one attack (the PGD family counting as one) on one chunk. A unit's result depends only on the
settings and its chunk, never on which process ran it, nor when: FGSM and DeepFool are
deterministic, SPSA draws counter-based random numbers from ``(seed, dataset index)``, and PGD's
random start of chunk ``k`` is drawn exactly as ``torchattacks.PGD`` draws it, batch-wise, after
``torch.manual_seed(seed + 1000003·k)`` (:func:`~cure_eval.attacks.units.chunk_seed`). Resumed,
sharded and in-memory audits therefore equal an uninterrupted single-process audit of the same
command exactly (same machine and thread count; timings aside).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from ..attacks import SuitePlan, SuiteResult, assemble, make_plan, run_units, unit_keys
from .shard import Shard
from .store import AuditState

log = logging.getLogger("cure_eval.audit")


def audit_plan(attacks: Sequence[str], *, eps: float, batch_size: int, seed: int, cascade: bool,
               pgd_alpha: float, spsa_iterations: int) -> SuitePlan:
    """The audit's suite plan: chunks of ``batch_size`` points, the other settings at their defaults."""
    return make_plan(attacks, eps=eps, seed=seed, cascade=cascade, batch_size=batch_size, chunk_size=batch_size,
                     chunked=True, pgd_alpha=pgd_alpha, spsa_iterations=spsa_iterations)


def run_audit_suite(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, plan: SuitePlan, *,
    device: torch.device, state: AuditState, shard: Shard = Shard(), progress: bool = True,
) -> SuiteResult | None:
    """Every unit of ``plan`` on this rank's chunks that ``state`` lacks, then the merged
    :class:`SuiteResult` on rank 0 (or in a single process); ``None`` on the other ranks."""
    y = y.detach().cpu().long()
    indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    chunks = plan.chunks(len(x))
    mine = shard.chunks(len(chunks))
    keys = unit_keys(plan, mine)
    if shard.sharded:
        log.info("rank %d of %d: chunks %s of %d (%d points)", shard.rank, shard.world_size,
                 ",".join(map(str, mine)) or "none", len(chunks),
                 sum(chunks[k].stop - chunks[k].start for k in mine))
    reused = [k for k in keys if k in state]
    if reused:
        counts = Counter(k.split("/")[0] for k in reused)
        log.info("resuming from %s: reusing %d finished units of %d (%s), not recomputed; %d to compute",
                 ", ".join(p.name for p in state.loaded_from), len(reused), len(keys),
                 ", ".join(f"{u} ×{c}" for u, c in counts.items()), len(keys) - len(reused))
        log.debug("reused units: %s", " ".join(reused))
    run_units(model, x.detach().cpu(), y, indices, plan, state, device=device, progress=progress, chunks=mine,
              announce=log)
    records = {key: state.units[key] for key in keys}
    if shard.sharded:
        gathered = shard.gather(records)
        if gathered is None:
            return None
        for part in gathered:
            records.update(part)
    if shard.is_main:
        state.finish_merge(records)
    return assemble(plan, state, y, indices)
