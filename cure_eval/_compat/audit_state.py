"""Moved to :mod:`cure_eval.auditing` (``shard``, ``fingerprint``, ``store``, ``codec``, ``runner``)
and :mod:`cure_eval.attacks.units`; this re-export module is removed in 0.3."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..attacks import SuiteResult, attack_order, chunk_seed, get_attack
from ..attacks.units import CHUNK_SEED_STRIDE as PGD_SEED_STRIDE
from ..auditing.fingerprint import (
    SUITE_DEFAULTS,
    audit_fingerprint,
    fingerprint_diff,
    state_dict_sha256,
    tensors_sha256,
)
from ..auditing.runner import audit_plan, run_audit_suite
from ..auditing.shard import PROCESS_GROUP_TIMEOUT, Shard, close_shard, shard_from_env
from ..auditing.store import (
    LOCK_FILE,
    STATE_FILE,
    STATE_FORMAT,
    AuditState,
    is_not_applicable,
    not_applicable,
    state_files,
)

__all__ = [
    "LOCK_FILE", "PGD_SEED_STRIDE", "PROCESS_GROUP_TIMEOUT", "STATE_FILE", "STATE_FORMAT", "SUITE_DEFAULTS",
    "AuditState", "Shard", "attack_order", "audit_fingerprint", "close_shard", "fingerprint_diff",
    "is_not_applicable", "not_applicable", "pgd_chunk_seed", "run_resumable_suite", "shard_from_env",
    "state_dict_sha256", "state_files", "tensors_sha256", "unit_plan",
]

#: Old name of :func:`cure_eval.attacks.chunk_seed`.
pgd_chunk_seed = chunk_seed


def unit_plan(attacks: Sequence[str], cascade: bool) -> list[tuple[str, list[str]]]:
    """``[(unit name, attacks it computes)]`` in run order (see :class:`cure_eval.attacks.SuitePlan`)."""
    order = attack_order(attacks, cascade=cascade)
    plan: list[tuple[str, list[str]]] = []
    for a in order:
        fam = get_attack(a).family
        if fam is None:
            plan.append((a, [a]))
        elif all(fam != unit for unit, _ in plan):
            plan.append((fam, [b for b in order if get_attack(b).family == fam]))
    return plan


def run_resumable_suite(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, *, eps: float,
    device: torch.device, attacks: Sequence[str], batch_size: int, seed: int, cascade: bool,
    pgd_alpha: float, spsa_iterations: int, state: AuditState, shard: Shard = Shard(), progress: bool = True,
) -> SuiteResult | None:
    """Old entry point: :func:`cure_eval.auditing.run_audit_suite` with :func:`~cure_eval.auditing.audit_plan`."""
    plan = audit_plan(attacks, eps=eps, batch_size=batch_size, seed=seed, cascade=cascade, pgd_alpha=pgd_alpha,
                      spsa_iterations=spsa_iterations)
    return run_audit_suite(model, x, y, indices, plan, device=device, state=state, shard=shard, progress=progress)
