"""The optional sections of an audit, as a table of stages (:data:`STAGES`) the pipeline drives:
ε sweep, gradient-masking check, geometry, feature sensitivity. Each is resumable from the audit's
store (reused when its settings and files match) and allowed not to apply to a model (recorded as
``{"status": "not_applicable", "reason"}``, :class:`~cure_eval.errors.NotApplicable`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attacks import SuiteResult, eps_sweep
from ..attacks.evaluation import predict
from ..attacks.passes import PassCounter, add_passes, pass_record
from ..core.io import new_figure, save_figure, write_json_atomic
from ..data import DatasetSpec
from ..errors import NotApplicable
from .options import AuditOptions
from .store import AuditState, not_applicable

log = logging.getLogger("cure_eval.audit")


@dataclass
class AuditRun:
    """What every stage may read: the audited model, its points and settings, the suite's result
    (a :class:`Stage` reads it and returns its JSON-ready result)."""

    model: nn.Module
    spec: DatasetSpec
    opts: AuditOptions
    out: Path
    x: torch.Tensor
    y: torch.Tensor
    eps: float
    alpha: float
    device: torch.device
    progress: bool
    label: str
    suite: SuiteResult | None = None

    @property
    def measured(self) -> SuiteResult:
        """The suite's result (the stages run after the suite)."""
        assert self.suite is not None, "the stages run after the suite"
        return self.suite


@dataclass(frozen=True)
class Stage:
    """One optional section of an audit.

    ``name`` keys its result in ``results.json`` and in the audit state; ``wanted`` says whether
    the options ask for it; ``settings`` are what its result depends on beyond the suite's
    fingerprint (a change recomputes it); ``files`` must exist for a stored result to be reused;
    ``run`` computes the JSON-ready result (and writes its files). A stage that raises
    :class:`~cure_eval.errors.NotApplicable` is recorded as not applicable, with the reason.
    """

    name: str
    wanted: Callable[[AuditOptions], bool]
    settings: Callable[[AuditRun], dict[str, Any]]
    files: tuple[str, ...]
    run: Callable[[AuditRun], Any]


def run_stage(stage: Stage, run: AuditRun, state: AuditState) -> Any:
    """The stage's result: reused from ``state`` when its settings and files match, else run
    (its passes counted into ``result["passes"]``) and stored."""
    settings = stage.settings(run)
    data = state.stage(stage.name, settings, stage.files)
    if data is not None:
        log.info("%s: reused from %s", stage.name, state.path.name)
        return data
    counter = PassCounter(run.model)  # every pass a stage spends counts into the audit's total
    try:
        with counter:
            result = stage.run(run)
    except NotApplicable as exc:
        log.warning("%s: not applicable to %s: %s", stage.name, run.label, exc)
        result = not_applicable(str(exc))
    if isinstance(result, dict):
        result["passes"] = pass_record(counter.passes)
    return state.put_stage(stage.name, settings, result)


def audit_passes(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The whole audit's passes: ``{"forward", "backward", "suite", "stages": {name: record}}``,
    the suite's (its clean passes included) plus every stage's; None when the suite's were not
    counted (a state stored before the counter existed)."""
    suite = summary.get("passes")
    if not suite:
        return None
    stages = {st.name: summary[st.name]["passes"] for st in STAGES
              if isinstance(summary.get(st.name), dict) and "passes" in summary[st.name]}
    suite_record = {k: int(suite[k]) for k in ("forward", "backward")}
    return {**add_passes(suite_record, *stages.values()), "suite": suite_record, "stages": stages}


def _sweep_stage(r: AuditRun) -> dict[str, Any]:
    return run_sweep(r.model, r.x, r.y, r.opts.eps_sweep, r.out, device=r.device, alpha=r.alpha,
                      batch_size=r.opts.batch_size, seed=r.opts.seed, progress=r.progress)


def _masking_n(r: AuditRun) -> int:
    return min(r.opts.masking_n or len(r.x), len(r.x))


def _masking_settings(r: AuditRun) -> dict[str, Any]:
    from ..masking.findings import gradient_free_points

    m = _masking_n(r)
    return {"masking_n": m, "points": "seeded subset", "spsa_n": gradient_free_points(m, r.opts.masking_spsa_n)}


def _masking_stage(r: AuditRun) -> dict[str, Any]:
    from ..masking import run_masking_check

    # a seeded subset of the audited points; a non-cascade suite's FGSM, PGD(40/100) and SPSA
    # results on them are reused (the default cascade's are not: they cover only some points)
    report = run_masking_check(r.model, r.x, r.y, n=_masking_n(r), spsa_n=r.opts.masking_spsa_n, eps=r.eps,
                               device=r.device, seed=r.opts.seed,
                               pgd_alpha=r.alpha, spsa_iterations=r.opts.spsa_iterations,
                               batch_size=r.opts.batch_size, suite=r.measured, progress=r.progress)
    report.plot_scatter(r.out / "masking_scatter.png")
    log.info("\n%s\n", report.format_table())
    return report.to_dict()


def _geometry_settings(r: AuditRun) -> dict[str, Any]:
    return {"geometry_n": min(r.opts.geometry_n, len(r.x)), "h": r.opts.h or r.spec.default_h,
            "top_k": r.opts.top_k, "label": r.label}


#: What of ``geometry.json`` the audit summary keeps.
GEOMETRY_KEYS = ("top_eigenvalues", "bottom_eigenvalues", "sorted_profile", "hz_norm", "frobenius", "alignment",
                 "wci", "hvps", "seconds_per_point", "not_applicable")


def _geometry_stage(r: AuditRun) -> dict[str, Any]:
    from ..geometry import format_table as geometry_table
    from ..geometry import measure_geometry

    geo = measure_geometry(r.model, r.x, r.y, device=r.device, h=r.opts.h or r.spec.default_h, k=r.opts.top_k,
                           n_points=min(r.opts.geometry_n, len(r.x)), out_dir=r.out, eps=r.eps,
                           class_names=list(r.spec.class_names) or None, label=r.label, seed=r.opts.seed,
                           progress=r.progress)
    log.info("\n%s\n", geometry_table(geo))
    return {k: geo[k] for k in GEOMETRY_KEYS if k in geo}


def _features_n(r: AuditRun) -> int:
    return min(r.opts.features_n, len(r.x))


def _features_settings(r: AuditRun) -> dict[str, Any]:
    return {"features_n": _features_n(r), "layers": r.opts.features_layers, "label": r.label,
            "delta": "suite PGD(20)"}


def suite_pgd20_points(r: AuditRun, m: int) -> tuple[torch.Tensor, str]:
    """The adversarial points of the suite's PGD(20) on the first ``m`` audited points.

    The audit state keeps no adversarial images, so the suite's PGD unit is replayed on those
    points: per chunk the same seed (:func:`~cure_eval.attacks.units.chunk_seed`), step and ε,
    on the chunk's clean-correct points from its start (PGD's random start is drawn in that
    order, the steps act per point), which gives the suite's points. The share of points whose
    perturbation ℓ2 equals the suite's record (to 1e-6) is logged and returned in the text. In a
    cascade the suite attacked fewer points: the replay is then PGD(20) with the same settings."""
    from ..attacks import chunk_seed, run_attack

    x, y, bs = r.x[:m], r.y[:m], r.opts.batch_size
    correct = r.measured.clean_correct[:m]
    x_adv = x.clone()
    for k, start in enumerate(range(0, m, bs)):
        sub = correct[start:start + bs].nonzero().flatten() + start
        if len(sub):
            res = run_attack("pgd20", r.model, x[sub], y[sub], eps=r.eps, device=r.device, batch_size=bs,
                             seed=chunk_seed(r.opts.seed, k), pgd_alpha=r.alpha, progress=r.progress)
            x_adv[sub] = res.x_adv
    settings = f"ε {r.eps * 255:.4g}/255, step {r.alpha * 255:.4g}/255, the suite's seed per chunk"
    rec = r.measured.attacks.get("pgd20")
    if rec is None or r.measured.cascade:
        why = "the suite ran no pgd20" if rec is None else "the suite's cascade attacked fewer points"
        return x_adv, f"PGD(20) with the audit's settings ({settings}); {why}"
    done = correct.nonzero().flatten()
    l2 = (x_adv[done] - x[done]).double().flatten(1).norm(dim=1)
    same = float(((l2 - rec.l2[done].double()).abs() <= 1e-6).double().mean()) if len(done) else 1.0
    log.info("features: replayed PGD(20) points match the suite's ℓ2 records on %.1f %% of %d points",
             100 * same, len(done))
    return x_adv, f"the suite's PGD(20) ({settings}), replayed; ℓ2 equal to the suite's record on {100 * same:.1f} % of the points"


#: What of ``features.json`` the audit summary keeps (``per_point`` stays in the file).
FEATURES_KEYS = ("layers", "n_candidates", "n_points", "eps", "units", "random_delta", "adversarial_delta",
                 "sensitivity", "delta_l2", "confidence", "min_perturbation", "seconds", "config")


def _features_stage(r: AuditRun) -> dict[str, Any]:
    from ..attacks.base import require_input_gradients
    from ..features import format_table as features_table
    from ..features import measure_features, resolve_layers

    resolve_layers(r.model, r.opts.features_layers)  # no stage to measure: not applicable, before any attack
    require_input_gradients(r.model, r.x[:2].to(r.device))
    m = _features_n(r)
    t0 = time.perf_counter()
    x_adv, source = suite_pgd20_points(r, m)
    replay = time.perf_counter() - t0
    df = r.measured.attacks.get("deepfool_l2")
    min_norms, mn_source = None, None
    if df is not None and "min_norm" in df.extra:
        min_norms = df.extra["min_norm"][df.attacked]
        mn_source = "the suite's deepfool_l2 (min_norm of its attacked points" + (
            ", still robust in the cascade)" if r.measured.cascade else ", all clean-correct)")
    res = measure_features(r.model, r.x, r.y, out_dir=r.out, device=r.device, eps=r.eps, n_points=m,
                           layers=r.opts.features_layers, x_adv=x_adv, adversarial_source=source,
                           min_norms=min_norms, min_norm_source=mn_source, label=r.label, seed=r.opts.seed,
                           batch_size=r.opts.batch_size, progress=r.progress)
    log.info("\n%s\n", features_table({r.label: res}))
    return {**{k: res[k] for k in FEATURES_KEYS}, "seconds": {**res["seconds"], "pgd_replay": replay}}


#: The optional sections, in the order they run.
STAGES: tuple[Stage, ...] = (
    Stage("eps_sweep", lambda o: bool(o.eps_sweep), lambda r: {"eps_sweep": r.opts.eps_sweep},
          ("eps_sweep.json", "eps_sweep.png"), _sweep_stage),
    Stage("masking", lambda o: o.masking_check, _masking_settings, ("masking_scatter.png",), _masking_stage),
    Stage("geometry", lambda o: o.geometry, _geometry_settings, ("geometry.json",), _geometry_stage),
    Stage("features", lambda o: o.features, _features_settings,
          ("features.json", "features_sensitivity.png", "features_confidence.png"), _features_stage),
)


def run_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sweep: list[float], out: Path, *,
               device: torch.device, alpha: float, batch_size: int, seed: int, progress: bool) -> dict[str, Any]:
    """PGD(20) accuracy at ε = 0 and every ε of ``sweep``: ``eps_sweep.json`` and ``eps_sweep.png``."""
    positive = [e for e in sweep if e > 0]
    res = eps_sweep(model, x, y, positive, device=device, alpha=alpha, batch_size=batch_size, seed=seed,
                    progress=progress) if positive else None
    eps_255 = [0.0] + [e * 255 for e in (res.eps if res else [])]
    accs = [float((predict(model, x, device=device, batch_size=512) == y).double().mean())] + (res.robust_accuracy if res else [])
    data = {"eps_255": eps_255, "eps": [e / 255 for e in eps_255], "robust_accuracy": accs,
            "attack": "PGD(20)", "alpha": alpha, "monotone": bool(res.monotone) if res else True}
    write_json_atomic(out / "eps_sweep.json", data)
    fig = new_figure(5, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(eps_255, [100 * a for a in accs], marker="o")
    ax.set_xlabel("ε (×1/255)")
    ax.set_ylabel("PGD(20) accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "eps_sweep.png", dpi=120)
    return data
