"""``python -m cure_eval.reproduce``: the CURE paper's claims regenerated on your setting.

Trains the normal model once, derives the defended models from it (CURE, adversarial
fine-tuning, PGD-AT by default; TRADES/AWP on request), audits every model (the full attack suite,
an ε sweep, the gradient-masking check, the curvature geometry), and writes one report::

    runs/reproduce_<dataset>/
        report.md               tables + figures (the paper's Table 1/2 layout, Fig. 2/6/7/9)
        results.json            every number in the report
        config.json             resolved configuration
        train/<method>/         checkpoints and per-epoch metrics
        audit/<method>/         per_sample.csv, results.json, geometry.json, PNGs
        profiles.png, eps_curves.png
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli import (
    ArgumentParser,
    add_common_arguments,
    eps_from_255,
    run_cli,
    set_threads,
    setup_logging,
)
from .core.device import resolve_device, tune_for_fixed_shapes
from .data import get_dataset_spec, list_datasets
from .errors import UsageError
from .models import model_config_for
from .pipelines.reproduce import (
    DEFAULT_METHODS,
    DIGITS_N,
    ReproduceSettings,
    main_table,
    run_reproduce,
)
from .training.methods import get_method, list_methods
from .training.pipeline import PAPER_HINT

log = logging.getLogger("cure_eval.reproduce")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m cure_eval.reproduce",
                       description="Regenerate the CURE paper's tables and figures on one setting.",
                       epilog=PAPER_HINT)
    g = p.add_argument_group("setting")
    g.add_argument("--dataset", default="digits", help=f"one of {', '.join(list_datasets())} (default: digits)")
    g.add_argument("--data-dir", default="data")
    g.add_argument("--download", action="store_true")
    g.add_argument("--model", default="wide_resnet", help="model name or alias (default: wide_resnet)")
    g.add_argument("--depth", type=int, default=None)
    g.add_argument("--widen", type=int, default=None)
    g.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"methods derived from the normal model (default: {','.join(DEFAULT_METHODS)}; add trades,awp)")
    g.add_argument("--eps", type=float, default=None, help="ℓ∞ radius in 1/255 units (default: dataset's)")
    g.add_argument("--pretrain-epochs", type=int, default=None, help="epochs of the normal model")
    g.add_argument("--epochs", type=int, default=None, help="epochs of every derived method (default: each method's)")
    g.add_argument("--train-n", type=int, default=None, help="use only the first N training images")
    a = p.add_argument_group("audit")
    a.add_argument("--n", type=int, default=None,
                   help=f"audit points (default: {DIGITS_N} on digits, 1000 otherwise)")
    a.add_argument("--masking-n", type=int, default=None,
                   help="points for the masking check (default: all audit points; the suite's SPSA is reused)")
    a.add_argument("--geometry-n", type=int, default=20, help="points for curvature (default: 20)")
    a.add_argument("--spsa-iterations", type=int, default=100)
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output folder (default: runs/reproduce_<dataset>)")
    o.add_argument("--cache-dir", default="runs/cache")
    o.add_argument("--resume", action="store_true", help="continue interrupted training runs")
    add_common_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv, parser=build_parser)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose, quiet=args.quiet)
    set_threads(args.threads)
    spec = get_dataset_spec(args.dataset)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        get_method(m)  # an unknown name lists the valid ones
    if "standard" in methods:
        raise UsageError(f"the normal model is always trained: drop 'standard' from --methods ({', '.join(list_methods())})")
    settings = ReproduceSettings(
        spec=spec, mcfg=model_config_for(args.model, spec, depth=args.depth, widen=args.widen), methods=methods,
        eps=eps_from_255(spec.default_eps if args.eps is None else args.eps),
        out=Path(args.out or f"runs/reproduce_{spec.name}"), seed=args.seed, pretrain_epochs=args.pretrain_epochs,
        epochs=args.epochs, train_n=args.train_n, n=args.n, masking_n=args.masking_n, geometry_n=args.geometry_n,
        spsa_iterations=args.spsa_iterations, data_dir=args.data_dir, download=args.download,
        cache_dir=Path(args.cache_dir), resume=args.resume, progress=not args.no_progress,
        command=" ".join(a for a in (argv or []) if a not in ("--no-progress",)),
    )
    device = resolve_device(args.device)
    tune_for_fixed_shapes(device)
    results = run_reproduce(settings, device=device)
    sys.stdout.write(f"{main_table(results)}\n\nreport: {settings.out / 'report.md'} ({results['seconds'] / 60:.1f} min)\n")
    failed = [c["claim"] for c in results["claims"] if c["holds"] is False]
    if failed:
        log.warning("claims that do not hold here: %s", "; ".join(failed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
