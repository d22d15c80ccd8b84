"""``python -m cure_eval.audit``: the attack suite on any model, with per-sample records.

What can be audited: ``--checkpoint`` (a checkpoint or run folder written by ``defend``), or
``--model`` as a timm name, one of our aliases, or ``module:factory`` / ``file.py:factory``
(optionally with ``--weights FILE``). Outputs in ``--out``:

    config.json       resolved configuration (written first)
    audit_state.json  per-sample progress, saved after every finished unit (resumption)
    per_sample.csv    one row per (point, attack)                 } only when the audit
    results.md        the table                                   } has finished;
    results.json      the summary (written last)                  } removed at the start
    eps_sweep.json / eps_sweep.png            with --eps-sweep
    masking_scatter.png, masking section      with --masking-check
    geometry.json, geometry PNGs, section     with --geometry

Resuming: the points are cut into chunks of ``--batch-size`` points and the suite runs unit by
unit (one attack, the PGD family counting as one, on one chunk); every finished unit's per-point
results go into ``audit_state.json`` at once (atomically), and so do the ε sweep, the masking
check and the geometry when they finish. After a crash or ``kill -9``, the same command resumes:
it logs what it reuses and recomputes nothing that finished. The state carries a fingerprint of
everything the numbers depend on (the model's weights hash and identity, dataset, points and
their data hash, ε, attacks, cascade, seed, PGD step, SPSA iterations, batch size, device type,
library versions); a state made with other settings is refused (exit 1: use a new ``--out`` or
``--restart``, which discards it). A rerun of a finished audit rewrites its outputs from the state.

Sharding: ``torchrun --nproc_per_node=N -m cure_eval.audit ...`` gives chunk ``k`` to rank
``k mod N`` (gloo process group; with CUDA each rank takes GPU ``LOCAL_RANK``). Rank 0 gathers and
merges the per-sample records, runs the ε sweep, masking check and geometry, and alone writes the
outputs. A unit's result depends only on the settings and its chunk: FGSM and DeepFool are
deterministic, SPSA seeds each point from ``(seed, dataset index)``, and PGD's random start of
chunk ``k`` is drawn like ``torchattacks.PGD`` after ``torch.manual_seed(seed + 1000003·k)``
(chunk 0: ``seed``, so up to ``--batch-size`` points the audit equals ``torchattacks.PGD`` after
``torch.manual_seed(seed)`` exactly). Sharded, resumed and uninterrupted single-process audits
of the same command therefore give the same ``per_sample.csv`` and ``results.json`` (timings
aside). Reported seconds are summed over units (over ranks, and over resumed runs). Under
torchrun spell ``--n`` and ``--h`` as ``--n-points`` and ``--fd-step``: torchrun's own parser reads
``--n`` and ``--h`` as abbreviations of its options. Details: :mod:`cure_eval.audit_state`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from . import __version__
from .attacks import ATTACK_NAMES, ATTACKS, SuiteResult, eps_sweep
from .audit_state import (
    STATE_FILE,
    AuditState,
    Shard,
    audit_fingerprint,
    close_shard,
    run_resumable_suite,
    shard_from_env,
)
from .checkpoint import load_checkpoint, load_state, load_weights_file
from .cli import (
    ArgumentParser,
    add_common_arguments,
    eps_from_255,
    run_cli,
    set_threads,
    setup_logging,
)
from .data import (
    DatasetSpec,
    check_images,
    get_dataset_spec,
    list_datasets,
    load_dataset,
    select_points,
)
from .device import resolve_device
from .errors import CureEvalError, UsageError
from .io import write_json_atomic, write_text_atomic
from .models import create_model, load_factory, model_config_for

log = logging.getLogger("cure_eval.audit")

@dataclass
class AuditOptions:
    """What to run in an audit (the CLI's flags; ε and PGD step in 1/255 units, None = dataset default)."""

    eps_255: float | None = None
    alpha_255: float | None = None
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
    batch_size: int = 256
    seed: int = 0
    data_dir: str = "data"
    download: bool = False


ATTACK_LABELS = {
    "clean": "clean", "fgsm": "FGSM", "pgd7": "PGD(7)", "pgd20": "PGD(20)", "pgd40": "PGD(40)",
    "pgd100": "PGD(100)", "deepfool_linf": "ℓ∞-DeepFool", "deepfool_l2": "ℓ2-DeepFool", "spsa": "SPSA",
}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m cure_eval.audit",
        description="Attack a model with the full suite (FGSM, PGD(7/20/40/100), DeepFool, SPSA) and "
        "write per-sample records, a summary and a table.",
    )
    m = p.add_argument_group("model (one of --checkpoint / --model)")
    m.add_argument("--checkpoint", action="append", default=None,
                   help="checkpoint file or run folder written by defend; repeat to audit several "
                   "(each into its own subfolder of --out, curvature profiles on one figure)")
    m.add_argument("--model", default=None,
                   help="timm name, alias (resnet18, wide_resnet) or module:factory / file.py:factory "
                   "(runs that code: only use factories you trust)")
    m.add_argument("--weights", default=None, help="weights for --model (.safetensors, or a .pt state dict; never unpickled)")
    m.add_argument("--depth", type=int, default=None, help="Wide-ResNet depth for --model wide_resnet")
    m.add_argument("--widen", type=int, default=None, help="Wide-ResNet widen factor for --model wide_resnet")

    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=None, help=f"{', '.join(list_datasets())} (default: the checkpoint's, else digits)")
    d.add_argument("--data-dir", default="data", help="folder with CIFAR-10/SVHN files (default: ./data)")
    d.add_argument("--download", action="store_true", help="download CIFAR-10/SVHN if missing")
    d.add_argument("--n", "--n-points", type=int, default=None,
                   help="test points: a fixed seeded subset (default: all on digits, 1000 otherwise); "
                   "spell it --n-points under torchrun")

    a = p.add_argument_group("attacks")
    a.add_argument("--eps", type=float, default=None, help="ℓ∞ radius in 1/255 units (default: 32 digits, 8 CIFAR-10, 12 SVHN)")
    a.add_argument("--attacks", default=",".join(ATTACKS),
                   help=f"comma list from {', '.join(ATTACK_NAMES)} (default: all)")
    a.add_argument("--alpha", type=float, default=None, help="PGD step in 1/255 units (default: 2; 4 on digits)")
    a.add_argument("--spsa-iterations", type=int, default=100, help="SPSA iterations (default: 100)")
    a.add_argument("--cascade", action="store_true",
                   help="compute only the worst case: attack each point only while it is still robust")
    a.add_argument("--eps-sweep", default=None, metavar="E1,E2,...",
                   help="also run PGD(20) at each ε (1/255 units), e.g. 0,2,4,8,16,32; writes eps_sweep.json/png")
    a.add_argument("--batch-size", type=int, default=256, help="points per attack batch (default: 256)")

    k = p.add_argument_group("checks")
    k.add_argument("--masking-check", action="store_true", help="gradient-masking checks and verdict")
    k.add_argument("--masking-n", type=int, default=None, help="points for the masking check, a seeded subset of the audited ones (default: all)")
    k.add_argument("--fail-on-masking", action="store_true", help="exit 3 when masking is suspected")
    k.add_argument("--geometry", action="store_true", help="curvature profile, Hz, Theorem 1, landscapes, WCI")
    k.add_argument("--geometry-n", type=int, default=20, help="points for the geometry measurements (default: 20)")
    k.add_argument("--h", "--fd-step", type=float, default=None,
                   help="finite-difference step for curvature: ℓ2 length in [0, 1] pixel space (default: dataset's CURE h); "
                   "spell it --fd-step under torchrun")
    k.add_argument("--top-k", type=int, default=10, help="eigenvalues at each end of the spectrum (default: 10)")

    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output folder (default: runs/audit_<model>); an unfinished "
                   "audit in it is resumed")
    o.add_argument("--restart", action="store_true",
                   help=f"discard the audit state ({STATE_FILE}) in --out and start over")
    add_common_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def load_audit_model(
    *, checkpoint: str | None, model: str | None, weights: str | None, dataset: str | None,
    depth: int | None, widen: int | None, device: torch.device,
) -> tuple[nn.Module, DatasetSpec, dict[str, Any]]:
    """Build the model to audit and say where it came from. Returns (model, dataset spec, description)."""
    if (checkpoint is None) == (model is None):
        raise UsageError("give exactly one of --checkpoint PATH or --model NAME")
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


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose, quiet=args.quiet)
    set_threads(args.threads)
    for flag in ("n", "masking_n", "geometry_n", "batch_size", "depth", "widen", "top_k", "h"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {v}")
    if args.spsa_iterations < 0:
        raise UsageError("--spsa-iterations must be >= 0")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in attacks if a not in ATTACK_NAMES]
    if unknown or not attacks:
        raise UsageError(f"unknown attack {', '.join(unknown) or '(none)'}: choose from {', '.join(ATTACK_NAMES)}")
    sweep = _parse_sweep(args.eps_sweep)
    shard = shard_from_env()
    try:
        if not shard.is_main and not args.verbose:
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 tells the story
        return _audit_all(args, attacks, sweep, shard)
    finally:
        close_shard(shard)


def _audit_all(args: Any, attacks: list[str], sweep: list[float], shard: Shard) -> int:
    device = shard.device(resolve_device(args.device))
    progress = not args.no_progress and shard.is_main

    checkpoints: list[str | None] = list(args.checkpoint) if args.checkpoint else [None]
    if len(checkpoints) > 1 and args.model is not None:
        raise UsageError("give either --checkpoint (one or more) or --model, not both")
    loaded = [load_audit_model(checkpoint=c, model=args.model, weights=args.weights, dataset=args.dataset,
                               depth=args.depth, widen=args.widen, device=device) for c in checkpoints]
    specs = {spec.name for _, spec, _ in loaded}
    if len(specs) > 1:
        raise UsageError(f"the checkpoints come from different datasets ({', '.join(sorted(specs))}): pass --dataset")
    labels = _labels([desc for _, _, desc in loaded])
    opts = AuditOptions(
        eps_255=args.eps, alpha_255=args.alpha, n=args.n, attacks=attacks, spsa_iterations=args.spsa_iterations,
        cascade=args.cascade, eps_sweep=sweep, masking_check=args.masking_check, masking_n=args.masking_n,
        geometry=args.geometry, geometry_n=args.geometry_n, h=args.h, top_k=args.top_k,
        batch_size=args.batch_size, seed=args.seed, data_dir=args.data_dir, download=args.download,
    )
    first = labels[0]
    out = Path(args.out or f"runs/audit_{first if len(loaded) == 1 else 'compare'}")
    exit_code = 0
    profiles: dict[str, Any] = {}
    combined: dict[str, dict[str, Any]] = {}
    for (model, spec, desc), label in zip(loaded, labels, strict=True):
        sub = out if len(loaded) == 1 else out / label
        summary = audit_model(model, spec, desc, opts, sub, device=device, progress=progress, label=label,
                              restart=args.restart, shard=shard)
        if not shard.is_main:
            continue  # rank 0 holds the merged results
        combined[label] = summary
        if "geometry" in summary:
            profiles[label] = summary["geometry"]
        if summary.get("masking", {}).get("verdict") == "suspect" and args.fail_on_masking:
            exit_code = 3
    if len(loaded) > 1 and shard.is_main:
        _write_comparison(out, combined, profiles)
    if exit_code:
        log.error("gradient masking suspected (--fail-on-masking): exit %d", exit_code)
    return exit_code


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
    eps = eps_from_255(spec.default_eps if opts.eps_255 is None else opts.eps_255)
    if eps == 0:
        raise UsageError("--eps 0 attacks nothing: give a positive radius (1/255 units)")
    alpha = eps_from_255(spec.pgd_alpha if opts.alpha_255 is None else opts.alpha_255, "--alpha")
    test = load_dataset(spec.name, "test", data_dir=opts.data_dir, download=opts.download)
    n = opts.n if opts.n is not None else (None if spec.name == "digits" else 1000)
    idx = select_points(len(test), n, opts.seed)
    x, y = test.tensors[0][idx], test.tensors[1][idx]
    check_images(x, spec)
    check_model_outputs(model, x, spec, device)

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
    sweep, attacks = opts.eps_sweep, opts.attacks
    n_chunks = -(-len(x) // opts.batch_size)
    if shard.is_main:
        for stale in ("results.json", "results.md", "per_sample.csv"):
            (out / stale).unlink(missing_ok=True)  # an unfinished audit never looks finished
        config = {"cure_eval_version": __version__, "model": desc, "dataset": spec.name, "n_points": len(x),
                  "eps": eps, "pgd_alpha": alpha, **dataclasses.asdict(opts), "device": str(device),
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

    if sweep:
        settings: dict[str, Any] = {"eps_sweep": sweep}
        data = state.stage("eps_sweep", settings, ["eps_sweep.json", "eps_sweep.png"])
        if data is None:
            data = state.put_stage("eps_sweep", settings, _run_sweep(
                model, x, y, sweep, out, device=device, alpha=alpha, batch_size=opts.batch_size,
                seed=opts.seed, progress=progress))
        else:
            log.info("ε sweep: reused from %s", STATE_FILE)
        summary["eps_sweep"] = data

    if opts.masking_check:
        m_n = min(opts.masking_n or len(x), len(x))
        settings = {"masking_n": m_n, "points": "seeded subset"}
        masking = state.stage("masking", settings, ["masking_scatter.png"])
        if masking is None:
            from .masking import run_masking_check

            # a seeded subset of the audited points: the suite's FGSM, PGD(40/100) and SPSA
            # results on them are reused, so the check adds no second SPSA run
            report = run_masking_check(model, x, y, n=m_n, eps=eps, device=device, seed=opts.seed,
                                       pgd_alpha=alpha, spsa_iterations=opts.spsa_iterations,
                                       batch_size=opts.batch_size, suite=suite, progress=progress)
            report.plot_scatter(out / "masking_scatter.png")
            masking = state.put_stage("masking", settings, report.to_dict())
            log.info("\n%s\n", report.format_table())
        else:
            log.info("masking check: reused from %s (verdict: %s)", STATE_FILE, masking.get("verdict"))
        summary["masking"] = masking

    if opts.geometry:
        settings = {"geometry_n": min(opts.geometry_n, len(x)), "h": opts.h or spec.default_h, "top_k": opts.top_k,
                    "label": label}
        geometry = state.stage("geometry", settings, ["geometry.json"])
        if geometry is None:
            from .geometry import format_table as geometry_table
            from .geometry import measure_geometry

            geo = measure_geometry(model, x, y, device=device, h=opts.h or spec.default_h, k=opts.top_k,
                                   n_points=min(opts.geometry_n, len(x)), out_dir=out, eps=eps,
                                   class_names=list(spec.class_names) or None, label=label, seed=opts.seed,
                                   progress=progress)
            geometry = state.put_stage("geometry", settings, {
                k: geo[k] for k in ("top_eigenvalues", "bottom_eigenvalues", "sorted_profile", "hz_norm",
                                    "frobenius", "alignment", "wci", "hvps", "seconds_per_point") if k in geo})
            log.info("\n%s\n", geometry_table(geo))
        else:
            log.info("geometry: reused from %s", STATE_FILE)
        summary["geometry"] = geometry

    write_text_atomic(out / "per_sample.csv", _csv(suite))
    table = format_results_table(summary)
    write_text_atomic(out / "results.md", f"# Audit of {label} on {spec.name}, ε = {eps * 255:g}/255\n\n{table}\n")
    write_json_atomic(out / "results.json", summary)
    state.mark_complete()
    log.info("\n%s\n\noutput: %s", table, out)
    return summary


def _labels(descs: list[dict[str, Any]]) -> list[str]:
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


def _write_comparison(out: Path, combined: dict[str, dict[str, Any]], profiles: dict[str, Any]) -> None:
    """Side-by-side table of several audited models (and their curvature profiles on one figure)."""
    names = list(combined)
    attacks = [a for a in ATTACKS if any(a in combined[m]["attacks"] for m in names)]
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
    table = tabulate(rows, headers=["model", "clean", *[ATTACK_LABELS[a] for a in attacks], "worst case"],
                     tablefmt="github")
    if profiles:
        from .geometry import plot_profiles

        plot_profiles(profiles, out / "profiles.png")
        geo_rows = [[m, f"{g['top_eigenvalues'][0]:.4g}", f"{g['hz_norm']:.4g}", f"{g['frobenius']:.4g}",
                     f"{g['alignment']:.3f}", f"{g['wci']:.4g}"] for m, g in profiles.items()]
        table += "\n\n" + tabulate(geo_rows, headers=["model", "λ_max", "‖Hz‖", "‖H‖_F", "alignment", "WCI"],
                                   tablefmt="github")
    write_text_atomic(out / "comparison.md", table + "\n")
    log.info("\n%s\n\ncomparison: %s", table, out / "comparison.md")


def format_results_table(summary: dict[str, Any]) -> str:
    """The summary as a GitHub-flavoured table (accuracies in %)."""
    rows = [["clean", f"{100 * summary['clean_accuracy']:.1f}", "", ""]]
    for name, r in summary["attacks"].items():
        acc = r.get("robust_accuracy")
        if acc is None:
            acc = r.get("cumulative_robust_accuracy")
            label = f"{ATTACK_LABELS.get(name, name)} (cumulative)"
        else:
            label = ATTACK_LABELS.get(name, name)
        med = r.get("median_min_norm")
        rows.append([label, f"{100 * acc:.1f}", f"{r['seconds']:.1f}", "" if med is None else f"{med:.3f}"])
    rows.append(["worst case", f"{100 * summary['worst_case_accuracy']:.1f}", f"{summary['seconds']:.1f}", ""])
    return tabulate(rows, headers=["attack", "accuracy %", "seconds", "median min. perturbation"], tablefmt="github")


def _csv(suite: SuiteResult) -> str:
    cols = ["index", "label", "clean_pred", "attack", "attacked", "adv_pred", "success", "robust",
            "adv_loss", "linf", "l2", "min_norm"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for row in suite.rows():
        w.writerow({k: ("" if row[k] is None else row[k]) for k in cols})
    return buf.getvalue()


def _parse_sweep(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--eps-sweep {text!r} must be a comma list of numbers in 1/255 units") from None
    for v in values:
        eps_from_255(v, "--eps-sweep")
    return values


def _run_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sweep: list[float], out: Path, *,
               device: torch.device, alpha: float, batch_size: int, seed: int, progress: bool) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positive = [v / 255 for v in sweep if v > 0]
    res = eps_sweep(model, x, y, positive, device=device, alpha=alpha, batch_size=batch_size, seed=seed,
                    progress=progress) if positive else None
    eps_255 = [0.0] + [e * 255 for e in (res.eps if res else [])]
    accs = [float((_clean_pred(model, x, device) == y).double().mean())] + (res.robust_accuracy if res else [])
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
    fig.savefig(out / "eps_sweep.png", dpi=120)
    plt.close(fig)
    return data


@torch.no_grad()
def _clean_pred(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat([model(x[i:i + 512].to(device)).argmax(1).cpu() for i in range(0, len(x), 512)])


if __name__ == "__main__":
    raise SystemExit(main())
