"""The audit pipeline: the attack suite on a model, resumable and sharded, plus the optional
sections (:mod:`.stages`), written to an output folder (:mod:`.report`).

Units: every ε and step is in [0, 1] pixel units. :func:`audit_model` audits one model into one
folder; :func:`audit_models` several (each in its own subfolder, with ``comparison.md``). An
audit's data goes down the floors once: options (:mod:`.options`) → points and the model check
(:mod:`.sources`) → plan and fingerprint (:mod:`.runner`, :mod:`.fingerprint`) → the store
(:mod:`.store`) → the units (:mod:`.runner`, :mod:`cure_eval.attacks.units`) → the stages
(:mod:`.stages`) → the report (:mod:`.report`).
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..attacks import SuitePlan
from ..core.io import write_json_atomic
from ..data import DatasetSpec, check_images, load_dataset, select_points
from ..errors import UsageError
from .fingerprint import audit_fingerprint
from .options import AuditOptions, resolve_radii
from .report import has_geometry, write_comparison, write_features_comparison, write_report
from .runner import audit_plan, run_audit_suite
from .shard import Shard
from .sources import audit_labels, check_model_outputs
from .stages import STAGES, AuditRun, audit_passes, run_stage
from .store import AuditState, MemoryAuditState

log = logging.getLogger("cure_eval.audit")


def audit_models(
    loaded: Sequence[tuple[nn.Module, DatasetSpec, dict[str, Any]]], opts: AuditOptions, out: Path, *,
    device: torch.device, progress: bool = True, restart: bool = False, shard: Shard | None = None,
    resumable: bool = True,
) -> dict[str, dict[str, Any]]:
    """Audit every ``(model, spec, description)``: one model into ``out``, several into
    ``out/<label>`` with ``comparison.md`` (and ``profiles.png``) on top. Returns
    ``{label: summary}`` on rank 0 (``{}`` on the other ranks of a shard)."""
    shard = shard or Shard()
    specs = {spec.name for _, spec, _ in loaded}
    if len(specs) > 1:
        raise UsageError(f"the checkpoints come from different datasets ({', '.join(sorted(specs))}): pass `dataset`")
    labels = audit_labels([desc for _, _, desc in loaded])
    profiles: dict[str, Any] = {}
    combined: dict[str, dict[str, Any]] = {}
    for (model, spec, desc), label in zip(loaded, labels, strict=True):
        sub = out if len(loaded) == 1 else out / label
        summary = audit_model(model, spec, desc, opts, sub, device=device, progress=progress, label=label,
                              restart=restart, shard=shard, resumable=resumable)
        if not shard.is_main:
            continue  # rank 0 holds the merged results
        combined[label] = summary
        if has_geometry(summary):
            profiles[label] = summary["geometry"]
    if len(loaded) > 1 and shard.is_main:
        write_comparison(out, combined, profiles)
        write_features_comparison(out, combined)
    return combined




def audit_model(
    model: nn.Module, spec: DatasetSpec, desc: dict[str, Any], opts: AuditOptions, out: Path, *,
    device: torch.device, progress: bool = True, label: str = "model", restart: bool = False,
    shard: Shard | None = None, resumable: bool = True,
) -> dict[str, Any]:
    """Audit one model; write its files into ``out`` (``results.json`` last); return the summary.

    Resumes the audit state in ``out`` when its settings match (raises :class:`CureEvalError`
    when they do not, or when another audit is running in ``out``), or discards it with
    ``restart``. ``resumable=False`` keeps the units in memory instead (no ``audit_state.json``;
    the same outputs). With a ``shard`` of several processes every rank must call this; rank 0
    alone writes the outputs and returns the summary, the other ranks return ``{}``.
    """
    shard = shard or Shard()
    eps, alpha = resolve_radii(opts, spec)
    test = load_dataset(spec.name, "test", data_dir=opts.data_dir, download=opts.download)
    n = opts.n if opts.n is not None else (None if spec.name == "digits" else 1000)
    idx = select_points(len(test), n, opts.seed)
    x, y = test.tensors[0][idx], test.tensors[1][idx]
    check_images(x, spec)
    check_model_outputs(model, x, spec, device)
    if opts.features and opts.features_layers:
        from ..features import resolve_layers

        resolve_layers(model, opts.features_layers)  # an unknown name fails now, not after the suite
    plan = audit_plan(opts.attacks, eps=eps, batch_size=opts.batch_size, seed=opts.seed, cascade=bool(opts.cascade),
                      pgd_alpha=alpha, spsa_iterations=opts.spsa_iterations)
    fingerprint = audit_fingerprint(
        model=model, desc=desc, dataset=spec.name, x=x, y=y, indices=idx, eps=eps, pgd_alpha=alpha,
        attacks=opts.attacks, cascade=bool(opts.cascade), seed=opts.seed, spsa_iterations=opts.spsa_iterations,
        batch_size=opts.batch_size, device=device)
    store = AuditState if resumable else MemoryAuditState
    state = store.open(out, fingerprint, shard=shard, restart=restart,  # refuses other settings
                       keep_adversarials=opts.save_adversarials)
    try:
        run = AuditRun(model=model, spec=spec, opts=opts, out=out, x=x, y=y, eps=eps, alpha=alpha, device=device,
                       progress=progress, label=label, suite=None)
        return _audit_with_state(run, desc, plan, state, idx=idx, shard=shard)
    finally:
        state.close()


def _audit_with_state(run: AuditRun, desc: dict[str, Any], plan: SuitePlan, state: AuditState, *,
                      idx: torch.Tensor, shard: Shard) -> dict[str, Any]:
    """:func:`audit_model` once the state is open (and this rank holds its lock): the suite's
    units, then on rank 0 the stages and the report."""
    out, opts = run.out, run.opts
    if shard.is_main:
        _start(run, desc, state, shard)
    suite = run_audit_suite(run.model, run.x, run.y, idx, plan, device=run.device, state=state, shard=shard,
                            progress=run.progress)
    if suite is None or not shard.is_main:
        return {}
    summary: dict[str, Any] = {**suite.summary(), "dataset": run.spec.name, "model": desc, "pgd_alpha": run.alpha}
    summary["versions"]["cure_eval"] = __version__
    run.suite = suite
    for stage in STAGES:  # the optional sections, in order; each resumable and allowed not to apply
        if stage.wanted(opts):
            summary[stage.name] = run_stage(stage, run, state)
    if (total := audit_passes(summary)) is not None:
        summary["total_passes"] = total
    if opts.save_adversarials:
        from .adversarials import write_adversarials

        summary["adversarials"] = write_adversarials(out, suite, run.x)
    write_report(out, suite, summary, title=f"Audit of {run.label} on {run.spec.name}, ε = {run.eps * 255:g}/255")
    state.mark_complete()
    log.info("audit of %s written to %s", run.label, out)
    return summary


def _start(run: AuditRun, desc: dict[str, Any], state: AuditState, shard: Shard) -> None:
    """Rank 0, before the suite: remove stale outputs, write ``config.json``, say what runs."""
    out, opts = run.out, run.opts
    n_chunks = -(-len(run.x) // opts.batch_size)
    for stale in ("results.json", "results.md", "per_sample.csv", "adversarials.safetensors", "adversarials.png"):
        (out / stale).unlink(missing_ok=True)  # an unfinished audit never looks finished
    config = {"cure_eval_version": __version__, "model": desc, "dataset": run.spec.name, "n_points": len(run.x),
              **dataclasses.asdict(opts), "eps": run.eps, "pgd_alpha": run.alpha, "device": str(run.device),
              "python": platform.python_version(), "world_size": shard.world_size, "chunks": n_chunks}
    write_json_atomic(out / "config.json", config)
    log.info("auditing %s on %d %s test points, ε = %g/255, PGD step %g/255, device %s%s",
             run.label, len(run.x), run.spec.name, run.eps * 255, run.alpha * 255, run.device,
             f", {shard.world_size} processes" if shard.sharded else "")
    if shard.world_size > n_chunks:
        log.warning("%d chunks of --batch-size %d points for %d processes: some processes have nothing "
                    "to do (use a smaller --batch-size)", n_chunks, opts.batch_size, shard.world_size)
    if state.complete:
        log.info("%s: this audit already finished: rewriting its outputs from the state", state.path.name)
