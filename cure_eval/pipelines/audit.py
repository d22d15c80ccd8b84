"""The audit pipeline: the attack suite on a model, resumable and sharded, plus the optional
sections (ε sweep, gradient-masking check, geometry, feature sensitivity), written to an output folder.

Units: every ε and step is in [0, 1] pixel units. :func:`audit_model` audits one model into one
folder; :func:`audit_models` several (each in its own subfolder, with ``comparison.md``).
Outputs (``config.json`` first, ``results.json`` last) and resumption/sharding are described in
:mod:`cure_eval.audit` and :mod:`cure_eval.audit_state`.

A section that does not apply to a model (e.g. WCI on a model without conv/linear weights) is
reported as ``{"status": "not_applicable", "reason": ...}`` in place of its numbers, with the
other sections and the suite kept.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from .. import __version__
from ..attacks import ATTACKS, SuiteResult, eps_sweep, get_attack, list_attacks
from ..audit_state import (
    STATE_FILE,
    AuditState,
    Shard,
    audit_fingerprint,
    not_applicable,
    run_resumable_suite,
)
from ..checkpoint import CHECKPOINT_NAME, load_checkpoint, load_state, load_weights_file
from ..data import DatasetSpec, check_images, get_dataset_spec, load_dataset, select_points
from ..errors import CureEvalError, NotApplicable, UsageError
from ..evaluation import predict
from ..io import save_figure, write_json_atomic, write_text_atomic
from ..models import create_model, load_factory, model_config_for

log = logging.getLogger("cure_eval.audit")


@dataclass
class AuditOptions:
    """What to run in an audit. ε, PGD step and the sweep radii in [0, 1] pixel units
    (``None``: the dataset's default); ``n`` points (``None``: all on digits, 1000 otherwise);
    ``features_layers``: module names for ``features`` (``None``: the network's stages)."""

    eps: float | None = None
    alpha: float | None = None
    n: int | None = None
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    spsa_iterations: int = 100
    cascade: bool = False
    eps_sweep: list[float] = field(default_factory=list)
    masking_check: bool = False
    masking_n: int | None = None
    geometry: bool = False
    geometry_n: int = 20
    h: float | None = None
    top_k: int = 10
    features: bool = False
    features_n: int = 100
    features_layers: list[str] | None = None
    batch_size: int = 256
    seed: int = 0
    data_dir: str = "data"
    download: bool = False


def attack_label(name: str) -> str:
    """The report label of an attack (``clean`` or the registered attack's ``label``)."""
    return "clean" if name == "clean" else get_attack(name).display_name()


def load_audit_model(
    *, checkpoint: str | None, model: str | None, weights: str | None, dataset: str | None,
    depth: int | None, widen: int | None, device: torch.device, model_dir: str | None = None,
    threat_model: str = "Linf", download: bool = False,
) -> tuple[nn.Module, DatasetSpec, dict[str, Any]]:
    """Build the model to audit and say where it came from. Returns (model, dataset spec, description).

    ``model="robustbench:<name>"`` loads a RobustBench model through the ``robustbench`` package
    from ``model_dir`` (``dataset`` default cifar10, ``threat_model`` Linf; nothing is downloaded
    unless ``download``): see :mod:`cure_eval.robustbench_models`."""
    if (checkpoint is None) == (model is None):
        raise UsageError("give exactly one of --checkpoint PATH or --model NAME")
    if model is not None and model.startswith("robustbench:"):
        from ..robustbench_models import DEFAULT_MODEL_DIR, load_robustbench_model

        if weights is not None:
            raise UsageError("--weights does not go with a RobustBench model: its checkpoint comes from --model-dir")
        spec = get_dataset_spec(dataset or "cifar10")
        rb_net, rb_desc = load_robustbench_model(model.removeprefix("robustbench:"), model_dir=model_dir or DEFAULT_MODEL_DIR,
                                                 dataset=spec.name, threat_model=threat_model, download=download)
        return rb_net.to(device).eval(), spec, rb_desc
    if model_dir is not None:
        raise UsageError("--model-dir goes with --model robustbench:NAME")
    if checkpoint is not None:
        if weights is not None:
            raise UsageError("--weights goes with --model, not --checkpoint")
        loaded, info = load_checkpoint(checkpoint, device=device)
        spec = get_dataset_spec(dataset or info.dataset)
        if spec.name != info.dataset:
            log.warning("checkpoint was trained on %s, auditing on %s", info.dataset, spec.name)
        if info.model.num_classes != spec.num_classes or info.model.in_chans != spec.in_chans:
            raise CureEvalError(
                f"checkpoint has {info.model.num_classes} classes / {info.model.in_chans} channels but "
                f"{spec.name} has {spec.num_classes} / {spec.in_chans}: pass the matching --dataset"
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
                f"{str(exc).splitlines()[0][:160]} (does it fit --dataset {spec.name}?)"
            ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != spec.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CureEvalError(f"the model returned {shape}, expected (N, {spec.num_classes}) logits for {spec.name}")
    if not torch.isfinite(out).all():
        raise CureEvalError("the model's outputs contain NaN or infinite values: check its weights and input range")


def audit_models(
    loaded: Sequence[tuple[nn.Module, DatasetSpec, dict[str, Any]]], opts: AuditOptions, out: Path, *,
    device: torch.device, progress: bool = True, restart: bool = False, shard: Shard | None = None,
) -> dict[str, dict[str, Any]]:
    """Audit every ``(model, spec, description)``: one model into ``out``, several into
    ``out/<label>`` with ``comparison.md`` (and ``profiles.png``) on top. Returns
    ``{label: summary}`` on rank 0 (``{}`` on the other ranks of a shard)."""
    shard = shard or Shard()
    specs = {spec.name for _, spec, _ in loaded}
    if len(specs) > 1:
        raise UsageError(f"the checkpoints come from different datasets ({', '.join(sorted(specs))}): pass --dataset")
    labels = audit_labels([desc for _, _, desc in loaded])
    profiles: dict[str, Any] = {}
    combined: dict[str, dict[str, Any]] = {}
    for (model, spec, desc), label in zip(loaded, labels, strict=True):
        sub = out if len(loaded) == 1 else out / label
        summary = audit_model(model, spec, desc, opts, sub, device=device, progress=progress, label=label,
                              restart=restart, shard=shard)
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
    shard: Shard | None = None,
) -> dict[str, Any]:
    """Audit one model; write its files into ``out`` (``results.json`` last); return the summary.

    Resumes the audit state in ``out`` when its settings match (raises :class:`CureEvalError`
    when they do not, or when another audit is running in ``out``), or discards it with
    ``restart``. With a ``shard`` of several processes
    every rank must call this; rank 0 alone writes the outputs and returns the summary, the
    other ranks return ``{}``.
    """
    shard = shard or Shard()
    eps = spec.default_eps / 255 if opts.eps is None else float(opts.eps)
    if not 0.0 < eps <= 1.0:
        raise UsageError(f"eps = {eps:g} is not a radius in (0, 1] ([0, 1] pixel units; 0 attacks nothing)")
    alpha = spec.pgd_alpha / 255 if opts.alpha is None else float(opts.alpha)
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"the PGD step alpha = {alpha:g} must be in [0, 1] ([0, 1] pixel units)")
    test = load_dataset(spec.name, "test", data_dir=opts.data_dir, download=opts.download)
    n = opts.n if opts.n is not None else (None if spec.name == "digits" else 1000)
    idx = select_points(len(test), n, opts.seed)
    x, y = test.tensors[0][idx], test.tensors[1][idx]
    check_images(x, spec)
    check_model_outputs(model, x, spec, device)
    if opts.features and opts.features_layers:
        from ..features import resolve_layers

        resolve_layers(model, opts.features_layers)  # an unknown name fails now, not after the suite

    fingerprint = audit_fingerprint(
        model=model, desc=desc, dataset=spec.name, x=x, y=y, indices=idx, eps=eps, pgd_alpha=alpha,
        attacks=opts.attacks, cascade=opts.cascade, seed=opts.seed, spsa_iterations=opts.spsa_iterations,
        batch_size=opts.batch_size, device=device)
    state = AuditState.open(out, fingerprint, shard=shard, restart=restart)  # refuses other settings
    try:
        return _audit_with_state(model, spec, desc, opts, out, state, x=x, y=y, idx=idx, eps=eps, alpha=alpha,
                                 device=device, progress=progress, label=label, shard=shard)
    finally:
        state.close()


def _audit_with_state(
    model: nn.Module, spec: DatasetSpec, desc: dict[str, Any], opts: AuditOptions, out: Path, state: AuditState, *,
    x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, eps: float, alpha: float, device: torch.device,
    progress: bool, label: str, shard: Shard,
) -> dict[str, Any]:
    """:func:`audit_model` once the state is open (and this rank holds its lock)."""
    attacks = opts.attacks
    n_chunks = -(-len(x) // opts.batch_size)
    if shard.is_main:
        for stale in ("results.json", "results.md", "per_sample.csv"):
            (out / stale).unlink(missing_ok=True)  # an unfinished audit never looks finished
        config = {"cure_eval_version": __version__, "model": desc, "dataset": spec.name, "n_points": len(x),
                  **dataclasses.asdict(opts), "eps": eps, "pgd_alpha": alpha, "device": str(device),
                  "python": platform.python_version(), "world_size": shard.world_size, "chunks": n_chunks}
        write_json_atomic(out / "config.json", config)
        log.info("auditing %s on %d %s test points, ε = %g/255, PGD step %g/255, device %s%s",
                 label, len(x), spec.name, eps * 255, alpha * 255, device,
                 f", {shard.world_size} processes" if shard.sharded else "")
        if shard.world_size > n_chunks:
            log.warning("%d chunks of --batch-size %d points for %d processes: some processes have nothing "
                        "to do (use a smaller --batch-size)", n_chunks, opts.batch_size, shard.world_size)
        if state.complete:
            log.info("%s: this audit already finished: rewriting its outputs from the state", STATE_FILE)

    suite = run_resumable_suite(model, x, y, idx, eps=eps, device=device, attacks=attacks,
                                batch_size=opts.batch_size, seed=opts.seed, cascade=opts.cascade,
                                pgd_alpha=alpha, spsa_iterations=opts.spsa_iterations, state=state,
                                shard=shard, progress=progress)
    if suite is None or not shard.is_main:
        return {}
    summary: dict[str, Any] = {**suite.summary(), "dataset": spec.name, "model": desc, "pgd_alpha": alpha}
    summary["versions"]["cure_eval"] = __version__

    run = _Run(model=model, spec=spec, opts=opts, out=out, x=x, y=y, eps=eps, alpha=alpha, device=device,
               progress=progress, label=label, suite=suite)
    for stage in STAGES:  # the optional sections, in order; each resumable and allowed not to apply
        if stage.wanted(opts):
            summary[stage.name] = _run_stage(stage, run, state)

    write_text_atomic(out / "per_sample.csv", _csv(suite))
    table = format_results_table(summary)
    write_text_atomic(out / "results.md", f"# Audit of {label} on {spec.name}, ε = {eps * 255:g}/255\n\n{table}\n")
    write_json_atomic(out / "results.json", summary)
    state.mark_complete()
    log.info("audit of %s written to %s", label, out)
    return summary


# --------------------------------------------------------------------------------------------
# The optional sections: a table of stages the pipeline drives (each resumable from the state).
# --------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What every stage may read: the audited model, its points and settings, the suite's result."""

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
    suite: SuiteResult


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
    settings: Callable[[_Run], dict[str, Any]]
    files: tuple[str, ...]
    run: Callable[[_Run], Any]


def _run_stage(stage: Stage, run: _Run, state: AuditState) -> Any:
    settings = stage.settings(run)
    data = state.stage(stage.name, settings, stage.files)
    if data is not None:
        log.info("%s: reused from %s", stage.name, STATE_FILE)
        return data
    try:
        result = stage.run(run)
    except NotApplicable as exc:
        log.warning("%s: not applicable to %s: %s", stage.name, run.label, exc)
        result = not_applicable(str(exc))
    return state.put_stage(stage.name, settings, result)


def _sweep_stage(r: _Run) -> dict[str, Any]:
    return _run_sweep(r.model, r.x, r.y, r.opts.eps_sweep, r.out, device=r.device, alpha=r.alpha,
                      batch_size=r.opts.batch_size, seed=r.opts.seed, progress=r.progress)


def _masking_n(r: _Run) -> int:
    return min(r.opts.masking_n or len(r.x), len(r.x))


def _masking_stage(r: _Run) -> dict[str, Any]:
    from ..masking import run_masking_check

    # a seeded subset of the audited points: the suite's FGSM, PGD(40/100) and SPSA results on
    # them are reused, so the check adds no second SPSA run
    report = run_masking_check(r.model, r.x, r.y, n=_masking_n(r), eps=r.eps, device=r.device, seed=r.opts.seed,
                               pgd_alpha=r.alpha, spsa_iterations=r.opts.spsa_iterations,
                               batch_size=r.opts.batch_size, suite=r.suite, progress=r.progress)
    report.plot_scatter(r.out / "masking_scatter.png")
    log.info("\n%s\n", report.format_table())
    return report.to_dict()


def _geometry_settings(r: _Run) -> dict[str, Any]:
    return {"geometry_n": min(r.opts.geometry_n, len(r.x)), "h": r.opts.h or r.spec.default_h,
            "top_k": r.opts.top_k, "label": r.label}


#: What of ``geometry.json`` the audit summary keeps.
GEOMETRY_KEYS = ("top_eigenvalues", "bottom_eigenvalues", "sorted_profile", "hz_norm", "frobenius", "alignment",
                 "wci", "hvps", "seconds_per_point", "not_applicable")


def _geometry_stage(r: _Run) -> dict[str, Any]:
    from ..geometry import format_table as geometry_table
    from ..geometry import measure_geometry

    geo = measure_geometry(r.model, r.x, r.y, device=r.device, h=r.opts.h or r.spec.default_h, k=r.opts.top_k,
                           n_points=min(r.opts.geometry_n, len(r.x)), out_dir=r.out, eps=r.eps,
                           class_names=list(r.spec.class_names) or None, label=r.label, seed=r.opts.seed,
                           progress=r.progress)
    log.info("\n%s\n", geometry_table(geo))
    return {k: geo[k] for k in GEOMETRY_KEYS if k in geo}


def _features_n(r: _Run) -> int:
    return min(r.opts.features_n, len(r.x))


def _features_settings(r: _Run) -> dict[str, Any]:
    return {"features_n": _features_n(r), "layers": r.opts.features_layers, "label": r.label,
            "delta": "suite PGD(20)"}


def suite_pgd20_points(r: _Run, m: int) -> tuple[torch.Tensor, str]:
    """The adversarial points of the suite's PGD(20) on the first ``m`` audited points.

    The audit state keeps no adversarial images, so the suite's PGD unit is replayed on those
    points: per chunk the same seed (:func:`~cure_eval.audit_state.pgd_chunk_seed`), step and ε,
    on the chunk's clean-correct points from its start (PGD's random start is drawn in that
    order, the steps act per point), which gives the suite's points. The share of points whose
    perturbation ℓ2 equals the suite's record (to 1e-6) is logged and returned in the text. In a
    cascade the suite attacked fewer points: the replay is then PGD(20) with the same settings."""
    from ..attacks import run_attack
    from ..audit_state import pgd_chunk_seed

    x, y, bs = r.x[:m], r.y[:m], r.opts.batch_size
    correct = r.suite.clean_correct[:m]
    x_adv = x.clone()
    for k, start in enumerate(range(0, m, bs)):
        sub = correct[start:start + bs].nonzero().flatten() + start
        if len(sub):
            res = run_attack("pgd20", r.model, x[sub], y[sub], eps=r.eps, device=r.device, batch_size=bs,
                             seed=pgd_chunk_seed(r.opts.seed, k), pgd_alpha=r.alpha, progress=r.progress)
            x_adv[sub] = res.x_adv
    settings = f"ε {r.eps * 255:.4g}/255, step {r.alpha * 255:.4g}/255, the suite's seed per chunk"
    rec = r.suite.attacks.get("pgd20")
    if rec is None or r.suite.cascade:
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


def _features_stage(r: _Run) -> dict[str, Any]:
    from ..attacks.base import require_input_gradients
    from ..features import format_table as features_table
    from ..features import measure_features, resolve_layers

    resolve_layers(r.model, r.opts.features_layers)  # no stage to measure: not applicable, before any attack
    require_input_gradients(r.model, r.x[:2].to(r.device))
    m = _features_n(r)
    t0 = time.perf_counter()
    x_adv, source = suite_pgd20_points(r, m)
    replay = time.perf_counter() - t0
    df = r.suite.attacks.get("deepfool_l2")
    min_norms, mn_source = None, None
    if df is not None and "min_norm" in df.extra:
        min_norms = df.extra["min_norm"][df.attacked]
        mn_source = "the suite's deepfool_l2 (min_norm of its attacked points" + (
            ", still robust in the cascade)" if r.suite.cascade else ", all clean-correct)")
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
    Stage("masking", lambda o: o.masking_check, lambda r: {"masking_n": _masking_n(r), "points": "seeded subset"},
          ("masking_scatter.png",), _masking_stage),
    Stage("geometry", lambda o: o.geometry, _geometry_settings, ("geometry.json",), _geometry_stage),
    Stage("features", lambda o: o.features, _features_settings,
          ("features.json", "features_sensitivity.png", "features_confidence.png"), _features_stage),
)


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


def write_comparison(out: Path, combined: dict[str, dict[str, Any]], profiles: dict[str, Any]) -> None:
    """Side-by-side table of several audited models (and their curvature profiles on one figure)."""
    names = list(combined)
    attacks = [a for a in list_attacks() if any(a in combined[m]["attacks"] for m in names)]
    rows = []
    for m in names:
        s = combined[m]
        row = [m, f"{100 * s['clean_accuracy']:.1f}"]
        for a in attacks:
            r = s["attacks"].get(a, {})
            acc = r.get("robust_accuracy", r.get("cumulative_robust_accuracy"))
            row.append("" if acc is None else f"{100 * acc:.1f}")
        row.append(f"{100 * s['worst_case_accuracy']:.1f}")
        rows.append(row)
    table = tabulate(rows, headers=["model", "clean", *[attack_label(a) for a in attacks], "worst case"],
                     tablefmt="github")
    if profiles:
        from ..geometry import plot_profiles

        plot_profiles(profiles, out / "profiles.png")
        geo_rows = [[m, f"{g['top_eigenvalues'][0]:.4g}", f"{g['hz_norm']:.4g}", f"{g['frobenius']:.4g}",
                     f"{g['alignment']:.3f}", number(g.get("wci"), ".4g")] for m, g in profiles.items()]
        table += "\n\n" + tabulate(geo_rows, headers=["model", "λ_max", "‖Hz‖", "‖H‖_F", "alignment", "WCI"],
                                   tablefmt="github")
    write_text_atomic(out / "comparison.md", table + "\n")
    log.info("comparison written to %s", out / "comparison.md")


def write_features_comparison(out: Path, combined: dict[str, dict[str, Any]]) -> None:
    """The feature measurements of several audited models side by side: one line per model in
    ``features_sensitivity.png`` and ``features_confidence.png`` on top of ``out``, and their
    tables appended to ``comparison.md`` (nothing when fewer than two models have them)."""
    feats = {m: s["features"] for m, s in combined.items()
             if isinstance(s.get("features"), dict) and "sensitivity" in s["features"]}
    if len(feats) < 2:
        return
    from ..features import format_table as features_table
    from ..features import plot_confidence, plot_sensitivity

    plot_sensitivity(feats, out / "features_sensitivity.png")
    plot_confidence(feats, out / "features_confidence.png")
    text = (out / "comparison.md").read_text(encoding="utf-8")
    write_text_atomic(out / "comparison.md", text + "\n" + features_table(feats) + "\n")


def number(value: Any, spec: str) -> str:
    """``format(value, spec)``, or ``n/a`` for a measurement that did not apply (``None``)."""
    return "n/a" if value is None else format(value, spec)


def has_geometry(summary: dict[str, Any]) -> bool:
    """True when an audit summary holds a measured geometry (not absent, not "not applicable")."""
    g = summary.get("geometry")
    return isinstance(g, dict) and "top_eigenvalues" in g


def format_results_table(summary: dict[str, Any]) -> str:
    """The summary as a GitHub-flavoured table (accuracies in %)."""
    rows = [["clean", f"{100 * summary['clean_accuracy']:.1f}", "", ""]]
    for name, r in summary["attacks"].items():
        acc = r.get("robust_accuracy")
        if acc is None:
            acc = r.get("cumulative_robust_accuracy")
            label = f"{attack_label(name)} (cumulative)"
        else:
            label = attack_label(name)
        med = r.get("median_min_norm")
        rows.append([label, f"{100 * acc:.1f}", f"{r['seconds']:.1f}", "" if med is None else f"{med:.3f}"])
    rows.append(["worst case", f"{100 * summary['worst_case_accuracy']:.1f}", f"{summary['seconds']:.1f}", ""])
    table = tabulate(rows, headers=["attack", "accuracy %", "seconds", "median min. perturbation"], tablefmt="github")
    comparison = format_autoattack_comparison(summary)
    table += "\n\n" + comparison if comparison else ""
    feats = summary.get("features")
    if isinstance(feats, dict) and "sensitivity" in feats:
        from ..features import format_table as features_table

        label = str(summary.get("model", {}).get("method") or summary.get("model", {}).get("model") or "model")
        table += (f"\n\nFeature sensitivity ‖Δf_l‖₂/‖δ‖₂ on {feats['n_points']} points, ε = {feats['eps'] * 255:.4g}/255 "
                  f"(random sign δ vs the suite's PGD(20) δ), and confidence:\n\n" + features_table({label: feats}))
    return table


def format_autoattack_comparison(summary: dict[str, Any]) -> str:
    """AutoAttack next to the suite's own worst case, with the points where they disagree ('' if
    the summary has no such comparison)."""
    comp = summary.get("autoattack_comparison") or {}
    lines = []
    for name, c in comp.items():
        own = ", ".join(attack_label(a) for a in c["suite_attacks"])
        lines.append(
            f"{attack_label(name)} {100 * c['robust_accuracy']:.1f} % vs the suite's own worst case "
            f"{100 * c['suite_worst_case_accuracy']:.1f} % ({own}): gap {100 * c['gap']:+.1f} points; "
            f"{len(c['only_reference'])} points broken only by {attack_label(name)}"
            f"{_points(c['only_reference'])}, {len(c['only_suite'])} only by the suite{_points(c['only_suite'])}")
        broken = summary["attacks"].get(name, {}).get("broken_by")
        if broken:
            lines.append(f"{attack_label(name)} broke: " + ", ".join(f"{k} {v}" for k, v in broken.items()))
    return "\n\n".join(lines)


def _points(indices: list[int], most: int = 20) -> str:
    if not indices:
        return ""
    shown = ", ".join(map(str, indices[:most]))
    return f" (test indices {shown}{', …' if len(indices) > most else ''})"


def _csv(suite: SuiteResult) -> str:
    cols = ["index", "label", "clean_pred", "attack", "attacked", "adv_pred", "success", "robust",
            "adv_loss", "linf", "l2", "min_norm", "broken_by", "best_fooled"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for row in suite.rows():
        w.writerow({k: ("" if row[k] is None else row[k]) for k in cols})
    return buf.getvalue()


def _run_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sweep: list[float], out: Path, *,
               device: torch.device, alpha: float, batch_size: int, seed: int, progress: bool) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positive = [e for e in sweep if e > 0]
    res = eps_sweep(model, x, y, positive, device=device, alpha=alpha, batch_size=batch_size, seed=seed,
                    progress=progress) if positive else None
    eps_255 = [0.0] + [e * 255 for e in (res.eps if res else [])]
    accs = [float((predict(model, x, device=device, batch_size=512) == y).double().mean())] + (res.robust_accuracy if res else [])
    data = {"eps_255": eps_255, "eps": [e / 255 for e in eps_255], "robust_accuracy": accs,
            "attack": "PGD(20)", "alpha": alpha, "monotone": bool(res.monotone) if res else True}
    write_json_atomic(out / "eps_sweep.json", data)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(eps_255, [100 * a for a in accs], marker="o")
    ax.set_xlabel("ε (×1/255)")
    ax.set_ylabel("PGD(20) accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "eps_sweep.png", dpi=120)
    plt.close(fig)
    return data
