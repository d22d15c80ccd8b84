"""``python -m cure_eval.audit``: the attack suite on any model, with per-sample records.

What can be audited: ``--checkpoint`` (a checkpoint or run folder written by ``defend``), or ``--model`` as a timm
name, one of our aliases, ``robustbench:NAME`` (with ``--model-dir``), or ``module:factory`` / ``file.py:factory``
(optionally with ``--weights FILE``). With neither, the latest finished ``defend`` run under ``runs/``: its normal and
defended model side by side. Outputs in ``--out``:

    config.json       resolved configuration (written first)
    audit_state.json  per-sample progress, saved after every finished unit (resumption)
    per_sample.csv    one row per (point, attack)                 } only when the audit
    results.md        the table                                   } has finished;
    results.json      the summary (written last)                  } removed at the start
    eps_sweep.json / eps_sweep.png            with --eps-sweep
    masking_scatter.png, masking section      with --masking-check
    geometry.json, geometry PNGs, section     with --geometry
    features.json, features_*.png, section    with --features (per-layer sensitivity, confidence)

Resuming: the points are cut into chunks of ``--batch-size`` points and the suite runs unit by unit (one attack, the
PGD family counting as one, on one chunk); every finished unit's per-point results go into ``audit_state.json`` at
once (atomically), and so do the optional sections (ε sweep, masking check, geometry, features) when they finish.
After a crash or ``kill -9``, the same command resumes: it logs what it reuses and recomputes nothing that finished.
The state carries a fingerprint of everything the numbers depend on (the model's weights hash and identity, dataset,
points and their data hash, ε, attacks, cascade, seed, PGD step, SPSA iterations, batch size, device type, library
versions); a state made with other settings is refused (exit 1: use a new ``--out`` or ``--restart``, which discards
it). A rerun of a finished audit rewrites its outputs from the state.

Sharding: ``torchrun --nproc_per_node=N -m cure_eval.audit ...`` gives chunk ``k`` to rank ``k mod N`` (gloo; with
CUDA each rank takes GPU ``LOCAL_RANK``); rank 0 merges the per-sample records, runs the optional sections and alone
writes the outputs. A unit's result depends only on the settings and its chunk (PGD's random start of chunk ``k``
after ``torch.manual_seed(seed + 1000003·k)``, chunk 0: ``seed``; SPSA seeds each point from ``(seed, index)``), so
sharded, resumed and single-process audits give the same ``per_sample.csv`` and ``results.json`` (timings aside).
Under torchrun spell ``--n`` and ``--h`` as ``--n-points`` and ``--fd-step`` (torchrun reads them as its own). Details:
:mod:`cure_eval.auditing`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .attacks import check_attack_names, expand_presets, list_attacks
from .auditing import (
    STATE_FILE,
    AuditOptions,
    Shard,
    audit_labels,
    audit_model,  # noqa: F401  (re-exported: the name's old home)
    audit_models,
    defend_run_checkpoints,
    format_results_table,
    latest_defend_run,
    load_audit_model,
    process_group,
)
from .cli import (
    ArgumentParser,
    add_common_arguments,
    comma_list,
    eps_from_255,
    run_cli,
    set_threads,
    setup_logging,
)
from .core.device import resolve_device
from .data import list_datasets
from .errors import UsageError

log = logging.getLogger("cure_eval.audit")
RUNS_DIR = "runs"  #: where defend writes its run folders and audits go by default


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m cure_eval.audit",
        description="Attack a model with the attack suite (default: FGSM, PGD(20), APGD-CE, APGD-T, Square as a "
        "cascade) and write per-sample records, a summary and a table.",
    )
    m = p.add_argument_group("model (one of --checkpoint / --model; neither: the latest defend run under runs/)")
    m.add_argument("--checkpoint", action="append", default=None,
                   help="checkpoint file or run folder written by defend; repeat to audit several "
                   "(each into its own subfolder of --out, curvature profiles on one figure)")
    m.add_argument("--model", default=None,
                   help="timm name, alias (resnet18, wide_resnet), robustbench:NAME (the robustbench extra) or "
                   "module:factory / file.py:factory (runs that code: only use factories you trust)")
    m.add_argument("--model-dir", default=None, help="RobustBench models folder, its layout (default: ./models)")
    m.add_argument("--threat-model", default="Linf", help="RobustBench threat model of robustbench:NAME (default: Linf)")
    m.add_argument("--weights", default=None, help="weights for --model (.safetensors, or a .pt state dict; never unpickled)")
    m.add_argument("--depth", type=int, default=None, help="Wide-ResNet depth for --model wide_resnet")
    m.add_argument("--widen", type=int, default=None, help="Wide-ResNet widen factor for --model wide_resnet")

    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=None, help=f"{', '.join(list_datasets())} (default: the checkpoint's, else digits)")
    d.add_argument("--data-dir", default="data", help="folder with CIFAR-10/SVHN files (default: ./data)")
    d.add_argument("--download", action="store_true", help="download CIFAR-10/SVHN (and a RobustBench model) if missing")
    d.add_argument("--n", "--n-points", type=int, default=None,
                   help="test points: a fixed seeded subset (default: all on digits, 1000 otherwise); "
                   "spell it --n-points under torchrun")

    a = p.add_argument_group("attacks")
    a.add_argument("--eps", type=float, default=None, help="ℓ∞ radius in 1/255 units (default: 32 digits, 8 CIFAR-10, 12 SVHN)")
    a.add_argument("--attacks", default="default", help=f"comma list of installed attacks: {', '.join(['clean', *list_attacks()])}, "
                   "or a preset: default (fgsm,pgd20,apgd-ce,apgd-t,square; the default) or thorough (every built-in)")
    a.add_argument("--alpha", type=float, default=None, help="PGD step in 1/255 units (default: 2; 4 on digits)")
    a.add_argument("--spsa-iterations", type=int, default=100, help="SPSA iterations (default: 100)")
    a.add_argument("--cascade", action=argparse.BooleanOptionalAction, default=None, help="attack each point "
                   "only while it is still robust (default: on for the default suite, off for any other list)")
    a.add_argument("--eps-sweep", default=None, metavar="E1,E2,...",
                   help="also run PGD(20) at each ε (1/255 units), e.g. 0,2,4,8,16,32; writes eps_sweep.json/png")
    a.add_argument("--batch-size", type=int, default=256, help="points per attack batch (default: 256)")

    k = p.add_argument_group("checks")
    k.add_argument("--masking-check", action="store_true", help="gradient-masking checks and verdict")
    k.add_argument("--masking-n", type=int, default=None, help="points for the masking check, a seeded subset of the audited ones (default: all)")
    k.add_argument("--masking-spsa-n", default="auto", metavar="N|auto|all", help="masking-check points SPSA and "
                   "Square attack, a seeded subset (default auto: one in 16, at least 10)")
    k.add_argument("--fail-on-masking", action="store_true", help="exit 3 when masking is suspected")
    k.add_argument("--geometry", action="store_true", help="curvature profile, Hz, Theorem 1, landscapes, WCI")
    k.add_argument("--geometry-n", type=int, default=20, help="points for the geometry measurements (default: 20)")
    k.add_argument("--h", "--fd-step", type=float, default=None,
                   help="finite-difference step for curvature: ℓ2 length in [0, 1] pixel space (default: dataset's CURE h); "
                   "spell it --fd-step under torchrun")
    k.add_argument("--top-k", type=int, default=10, help="eigenvalues at each end of the spectrum (default: 10)")
    k.add_argument("--features", action="store_true", help="per-layer feature sensitivity and confidence (Jia et al. 2020)")
    k.add_argument("--features-n", type=int, default=100, help="first audited points for --features (default: 100)")
    k.add_argument("--features-layers", default=None, metavar="A,B", help="modules for --features (default: the stages)")

    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output folder (default: runs/audit_<model>); an unfinished "
                   "audit in it is resumed")
    o.add_argument("--restart", action="store_true",
                   help=f"discard the audit state ({STATE_FILE}) in --out and start over")
    o.add_argument("--save-adversarials", action="store_true", help="write each point's worst-case adversarial example to adversarials.safetensors and a grid to adversarials.png")
    add_common_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv, parser=build_parser, aliases={"layers": "features_layers"})


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose, quiet=args.quiet)
    set_threads(args.threads)
    for flag in ("n", "masking_n", "geometry_n", "features_n", "batch_size", "depth", "widen", "top_k", "h"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {v}")
    if args.spsa_iterations < 0:
        raise UsageError("--spsa-iterations must be >= 0")
    attacks = expand_presets(comma_list(args.attacks))
    check_attack_names(attacks or ["(none)"])  # unknown names list the registered ones
    sweep = _parse_sweep(args.eps_sweep)
    with process_group() as shard:
        if not shard.is_main and not args.verbose:
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 tells the story
        return _audit_all(args, attacks, sweep, shard)


def _audit_all(args: Any, attacks: list[str], sweep: list[float], shard: Shard) -> int:
    device = shard.device(resolve_device(args.device))
    checkpoints: list[str | None] = list(args.checkpoint) if args.checkpoint else [None]
    if len(checkpoints) > 1 and args.model is not None:
        raise UsageError("give either --checkpoint (one or more) or --model, not both")
    default_out: str | None = None
    if args.checkpoint is None and args.model is None:
        if (run := latest_defend_run(RUNS_DIR)) is None:
            raise UsageError(f"no model given and no finished defend run under {RUNS_DIR}/: run python -m "
                             f"cure_eval.defend first, or pass --checkpoint PATH or --model NAME")
        checkpoints, default_out = list(defend_run_checkpoints(run)), f"{RUNS_DIR}/audit_{run.name}"
        log.info("no model given: auditing the latest defend run %s (%s side by side)", run, " and ".join(Path(c).parent.name for c in checkpoints if c))
    loaded = [load_audit_model(checkpoint=c, model=args.model, weights=args.weights, dataset=args.dataset,
                               depth=args.depth, widen=args.widen, device=device, model_dir=args.model_dir,
                               threat_model=args.threat_model, download=args.download) for c in checkpoints]
    opts = AuditOptions(
        eps=None if args.eps is None else eps_from_255(args.eps),
        alpha=None if args.alpha is None else eps_from_255(args.alpha, "--alpha"),
        n=args.n, attacks=attacks, spsa_iterations=args.spsa_iterations, cascade=args.cascade,
        eps_sweep=[v / 255 for v in sweep], masking_check=args.masking_check, masking_n=args.masking_n,
        masking_spsa_n=int(args.masking_spsa_n) if args.masking_spsa_n.isdigit() else args.masking_spsa_n,
        geometry=args.geometry, geometry_n=args.geometry_n, h=args.h, top_k=args.top_k, features=args.features,
        features_n=args.features_n, features_layers=comma_list(args.features_layers) or None,
        batch_size=args.batch_size, seed=args.seed, data_dir=args.data_dir, download=args.download, save_adversarials=args.save_adversarials,
    )
    if opts.eps == 0:
        raise UsageError("--eps 0 attacks nothing: give a positive radius (1/255 units)")
    labels = audit_labels([desc for _, _, desc in loaded])
    out = Path(args.out or default_out or f"{RUNS_DIR}/audit_{labels[0] if len(loaded) == 1 else 'compare'}")
    results = audit_models(loaded, opts, out, device=device, progress=not args.no_progress and shard.is_main,
                           restart=args.restart, shard=shard)
    if not shard.is_main:
        return 0
    for label, summary in results.items():  # results on stdout, diagnostics on stderr
        title = f"{label}:\n" if len(results) > 1 else ""
        sys.stdout.write(f"{title}{format_results_table(summary)}\n\n")
    if len(results) > 1:
        sys.stdout.write((out / "comparison.md").read_text() + "\n")
    sys.stdout.write(f"output: {out}\n")
    if any(s.get("masking", {}).get("verdict") == "suspect" for s in results.values()) and args.fail_on_masking:
        log.error("gradient masking suspected (--fail-on-masking): exit 3")
        return 3
    return 0


def _parse_sweep(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--eps-sweep {text!r} must be a comma list of numbers in 1/255 units") from None
    return [v for v in values if eps_from_255(v, "--eps-sweep") >= 0]  # eps_from_255 refuses v outside [0, 255]


if __name__ == "__main__":
    raise SystemExit(main())
