"""``python -m cure_eval.defend``: train a normal model and a defended one, evaluate both.

With no flags: the embedded digits data, a small CIFAR-style Wide-ResNet, a normal model (trained
or taken from the cache), CURE fine-tuning of it, clean and PGD(20) accuracy of both, a
side-by-side table and a run folder::

    runs/<dataset>_<model>_<method>_s<seed>/
        config.json            resolved configuration (written first)
        standard/              model.safetensors, metrics.jsonl, train_state.pt
        <method>/              model.safetensors, metrics.jsonl, train_state.pt
        results.json           written last, only when everything finished
        results.md             the table

``--track-wci`` adds per-epoch WCI and train/test robust accuracy to ``<method>/metrics.jsonl``,
``<method>/wci_tracking.png`` and ``wci_tracking`` to ``results.json``; ``--lr-policy wci`` also
cuts the learning rate when WCI keeps rising (:mod:`cure_eval.training.wci_tracking`).

Data parallel on several processes or GPUs: ``torchrun --nproc_per_node=N -m cure_eval.defend ...``
(``gloo`` on the CPU, ``nccl`` with ``cuda:LOCAL_RANK`` on GPUs; see :mod:`cure_eval.core.distributed`).
``--batch-size`` stays the *global* batch (each rank trains on ``batch_size / N`` of it), so the
hyperparameters mean the same as in one process. Rank 0 alone writes the run folder and the cache;
the others wait at barriers. The evaluations (clean and PGD(20)) run on rank 0 only, after all
training (the normal model's too, so that no rank idles through an evaluation); the other ranks
exit when training is over.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cli import (
    ArgumentParser,
    add_common_arguments,
    eps_from_255,
    run_cli,
    set_threads,
    setup_logging,
)
from .core import distributed
from .core.device import resolve_device, tune_for_fixed_shapes
from .data import get_dataset_spec, list_datasets
from .errors import UsageError
from .models import model_config_for
from .training.methods import get_method, list_methods, parse_method_args
from .training.pipeline import (
    PAPER_HINT,
    DefendSettings,
    run_defend,
    standard_model,  # noqa: F401  (re-exported: the name's old home)
    train_method,  # noqa: F401  (re-exported: the name's old home)
)
from .training.wci_tracking import DEFAULT_HUTCHINSON_PROBES, DEFAULT_PROBE_N, WCILRPolicy

log = logging.getLogger("cure_eval.defend")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m cure_eval.defend",
        description="Train a normal model and a defended one (CURE by default), evaluate both with "
        "clean and PGD(20) accuracy, and write a run folder.",
        epilog=PAPER_HINT,
    )
    m = p.add_argument_group("model and method")
    m.add_argument("--model", default="wide_resnet",
                   help="resnet18, wide_resnet (WRN-d-k, see --depth/--widen) or any timm model name (default: wide_resnet)")
    m.add_argument("--depth", type=int, default=None, help="Wide-ResNet depth (default: 16 on digits, 28 otherwise)")
    m.add_argument("--widen", type=int, default=None, help="Wide-ResNet widen factor (default: 4 on digits, 10 otherwise)")
    m.add_argument("--method", default="cure", help="training method (installed: %(choices_text)s; default: cure)")
    m.add_argument("--preset", default=None, help="a named preset of the method (cure: paper, reference)")
    m.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method option, e.g. --method-arg gamma=4 --method-arg h=3 (repeatable; cure: h and γ in normalised-input units)")
    m.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start the method from this checkpoint instead of a freshly trained normal model")
    m.add_argument("--epochs", type=int, default=None, help="epochs of the method (default: the method's)")
    m.add_argument("--pretrain-epochs", type=int, default=None, help="epochs of the normal model (default: standard's)")
    m.add_argument("--batch-size", type=int, default=None, help="training batch size (default: the method's)")
    m.add_argument("--pretrain-batch-size", type=int, default=None,
                   help="batch size of the normal model (default: standard's)")
    m.add_argument("--list-methods", action="store_true", help="list the installed methods and exit")

    d = p.add_argument_group("data and evaluation")
    d.add_argument("--dataset", default="digits", help=f"one of {', '.join(list_datasets())} (default: digits, embedded)")
    d.add_argument("--data-dir", default="data", help="folder with CIFAR-10/SVHN files (default: ./data)")
    d.add_argument("--download", action="store_true", help="download CIFAR-10/SVHN into --data-dir if missing")
    d.add_argument("--eps", type=float, default=None,
                   help="ℓ∞ radius in 1/255 units (default: 32 on digits, 8 on CIFAR-10, 12 on SVHN)")
    d.add_argument("--eval-n", type=int, default=None,
                   help="test points for the evaluation (default: all on digits, 1000 otherwise)")
    d.add_argument("--train-n", type=int, default=None, help="use only the first N training images (quick runs)")

    w = p.add_argument_group("WCI over training (Xu & Zhang, arXiv 2410.07719)")
    w.add_argument("--track-wci", action="store_true",
                   help="per-epoch WCI and train/test robust accuracy of the method on fixed probes (metrics.jsonl, "
                        "results.json wci_tracking, <method>/wci_tracking.png)")
    w.add_argument("--wci-probe-n", type=int, default=DEFAULT_PROBE_N,
                   help=f"train and test probe points of --track-wci (default: {DEFAULT_PROBE_N})")
    w.add_argument("--wci-probes", type=int, default=DEFAULT_HUTCHINSON_PROBES,
                   help=f"Hutchinson probes of the per-epoch WCI (default: {DEFAULT_HUTCHINSON_PROBES})")
    w.add_argument("--lr-policy", choices=("schedule", "wci"), default="schedule",
                   help="wci: also cut the LR when WCI rose for --wci-patience epochs (implies --track-wci; "
                        "default: schedule, the method's own)")
    w.add_argument("--wci-patience", type=int, default=2, help="consecutive WCI rises before a cut (default: 2)")
    w.add_argument("--wci-decay", type=float, default=0.1, help="LR multiplier of a cut (default: 0.1)")
    w.add_argument("--wci-max-decays", type=int, default=2, help="at most this many cuts (default: 2)")
    w.add_argument("--wci-warmup", type=int, default=0, help="epochs whose WCI rises do not count (default: 0)")

    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="run folder (default: runs/<dataset>_<model>_<method>_s<seed>)")
    o.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its last completed epoch")
    o.add_argument("--cache-dir", default="runs/cache", help="where normal models are cached for reuse (default: runs/cache)")
    o.add_argument("--no-cache", action="store_true", help="always train the normal model")
    add_common_arguments(p)
    return p


def _format_help(p: ArgumentParser) -> None:
    for action in p._actions:
        if action.help and "%(choices_text)s" in action.help:
            action.help = action.help.replace("%(choices_text)s", ", ".join(list_methods()))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv, parser=build_parser)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    _format_help(parser)
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose, quiet=args.quiet or distributed.env_rank() != 0)
    set_threads(args.threads)
    if args.list_methods:  # a result: stdout
        for name in list_methods():
            sys.stdout.write(f"{name:<14} {get_method(name).description}\n")
        return 0
    for flag in ("epochs", "pretrain_epochs", "batch_size", "pretrain_batch_size", "eval_n", "train_n",
                 "wci_probe_n", "wci_probes"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {v}")
    settings = _settings(args)
    device = distributed.setup(resolve_device(args.device))  # this rank's device under torchrun
    tune_for_fixed_shapes(device)
    try:
        result = run_defend(settings, device=device)
    finally:
        distributed.teardown()
    if result is not None:  # rank 0: results on stdout
        sys.stdout.write(f"{result.table}\n\nrun folder: {result.out}\n")
    return 0


def _settings(args: Any) -> DefendSettings:
    """The parsed flags resolved into library settings (ε in [0, 1] units, method configs)."""
    spec = get_dataset_spec(args.dataset)
    method_cls = get_method(args.method)
    standard_cls = get_method("standard")
    eps = eps_from_255(spec.default_eps if args.eps is None else args.eps)
    mcfg = model_config_for(args.model, spec, depth=args.depth, widen=args.widen)
    overrides = parse_method_args(method_cls, args.method_arg)
    for key, flag in (("epochs", args.epochs), ("batch_size", args.batch_size)):
        if flag is not None:
            overrides[key] = flag
    method_cfg = method_cls.make_config(spec, mcfg.name, preset=args.preset, overrides=overrides)
    std_over: dict[str, Any] = {}
    for key, flag in (("epochs", args.pretrain_epochs), ("batch_size", args.pretrain_batch_size)):
        if flag is not None:
            std_over[key] = flag
    std_cfg = standard_cls.make_config(spec, mcfg.name, overrides=std_over)
    return DefendSettings(
        spec=spec, model_name=args.model, mcfg=mcfg, method_cls=method_cls, method_cfg=method_cfg,
        standard_cls=standard_cls, std_cfg=std_cfg, eps=eps, alpha=spec.pgd_alpha / 255,
        out=Path(args.out or f"runs/{spec.name}_{args.model}_{method_cls.name}_s{args.seed}"), seed=args.seed,
        preset=args.preset, init=args.init, train_n=args.train_n, eval_n=args.eval_n, data_dir=args.data_dir,
        download=args.download, resume=args.resume, cache_dir=None if args.no_cache else Path(args.cache_dir),
        progress=not args.no_progress and distributed.env_rank() == 0,
        track_wci=args.track_wci, wci_probe_n=args.wci_probe_n, wci_probes=args.wci_probes,
        wci_policy=WCILRPolicy(patience=args.wci_patience, factor=args.wci_decay, max_decays=args.wci_max_decays,
                               warmup=args.wci_warmup)
        if args.lr_policy == "wci" else None,
    )


if __name__ == "__main__":
    raise SystemExit(main())
