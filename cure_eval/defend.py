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

Data parallel on several processes or GPUs: ``torchrun --nproc_per_node=N -m cure_eval.defend ...``
(``gloo`` on the CPU, ``nccl`` with ``cuda:LOCAL_RANK`` on GPUs; see :mod:`cure_eval.distributed`).
``--batch-size`` stays the *global* batch (each rank trains on ``batch_size / N`` of it), so the
hyperparameters mean the same as in one process. Rank 0 alone writes the run folder and the cache;
the others wait at barriers. The evaluations (clean and PGD(20)) run on rank 0 only, after all
training (the normal model's too, so that no rank idles through an evaluation); the other ranks
exit when training is over.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from . import __version__, distributed
from .checkpoint import load_checkpoint, unwrap
from .cli import ArgumentParser, add_common_arguments, eps_from_255, run_cli, setup_logging
from .data import DatasetSpec, get_dataset_spec, list_datasets, load_dataset, select_points
from .device import resolve_device
from .errors import UsageError
from .evaluation import evaluate
from .io import write_json_atomic, write_text_atomic
from .methods import Method, TrainContext, config_dict, get_method, list_methods, parse_method_args
from .models import ModelConfig, count_parameters, create_model, model_config_for
from .training import CHECKPOINT_NAME, METRICS_NAME, TrainResult, is_complete, train

log = logging.getLogger("cure_eval.defend")

PAPER_HINT = (
    "paper setting (GPU): python -m cure_eval.defend --dataset cifar10 --data-dir data --download "
    "--model wide_resnet --method cure --preset paper   (WRN-28-10; --model resnet18 for ResNet-18)"
)


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
                   help="override a method option, e.g. --method-arg gamma=4 --method-arg h=0.6 (repeatable)")
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
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    _format_help(parser)
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose, quiet=args.quiet or distributed.env_rank() != 0)
    if args.list_methods:
        for name in list_methods():
            log.warning("%-14s %s", name, get_method(name).description)
        return 0
    for flag in ("epochs", "pretrain_epochs", "batch_size", "pretrain_batch_size", "eval_n", "train_n"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {v}")

    spec = get_dataset_spec(args.dataset)
    method_cls = get_method(args.method)
    standard_cls = get_method("standard")
    eps = eps_from_255(spec.default_eps if args.eps is None else args.eps)
    alpha = spec.pgd_alpha / 255
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
    device = distributed.setup(resolve_device(args.device))  # this rank's device under torchrun
    try:
        return _run(args, spec, method_cls, standard_cls, eps, alpha, mcfg, method_cfg, std_cfg, device)
    finally:
        distributed.teardown()


def _run(args: argparse.Namespace, spec: DatasetSpec, method_cls: type[Method], standard_cls: type[Method], eps: float,
         alpha: float, mcfg: ModelConfig, method_cfg: Any, std_cfg: Any, device: torch.device) -> int:
    main_rank = distributed.is_main()
    progress = not args.no_progress and main_rank
    world = distributed.world_size()
    for cfg in (method_cfg, *(() if args.init else (std_cfg,))):
        if cfg.batch_size % world:  # each rank trains on batch_size / world of every global batch
            raise UsageError(f"batch size {cfg.batch_size} is not divisible by the {world} processes: "
                             f"pass a --batch-size that is a multiple of {world}")

    # Data first: a missing data set fails before anything is written.
    train_ds = load_dataset(spec.name, "train", data_dir=args.data_dir, download=args.download)
    test_ds = load_dataset(spec.name, "test", data_dir=args.data_dir, download=args.download)
    x_train, y_train = train_ds.tensors
    if args.train_n is not None:
        x_train, y_train = x_train[: args.train_n], y_train[: args.train_n]
    eval_n = args.eval_n if args.eval_n is not None else (None if spec.name == "digits" else 1000)
    idx = select_points(len(test_ds), eval_n, args.seed)
    x_test, y_test = test_ds.tensors[0][idx], test_ds.tensors[1][idx]
    probe = (x_test[:128], y_test[:128])

    out = Path(args.out or f"runs/{spec.name}_{args.model}_{method_cls.name}_s{args.seed}")
    if main_rank:
        if out.exists() and not args.resume and any(out.iterdir()):
            log.info("run folder %s exists: starting over (pass --resume to continue it)", out)
        (out / "results.json").unlink(missing_ok=True)  # never leave a stale "finished" result behind
        (out / "results.md").unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)

    probe_model = create_model(mcfg)
    n_params = count_parameters(probe_model)
    del probe_model
    with_standard = method_cls.name != "standard"
    log.info("cure_eval %s | device %s | dataset %s (%d train, %d eval points) | ε = %g/255, PGD step %g/255",
             __version__, device, spec.name, len(x_train), len(x_test), eps * 255, spec.pgd_alpha)
    log.info("model %s %s (%.2f M parameters)", mcfg.name, mcfg.kwargs or "", n_params / 1e6)
    if with_standard:
        log.info("normal model: standard, %d epochs; then %s, %d epochs%s", std_cfg.epochs, method_cls.name,
                 method_cfg.epochs, f" from {args.init}" if args.init else "")
    if spec.name == "digits":
        log.info("%s", PAPER_HINT)

    config = {
        "cure_eval_version": __version__, "dataset": spec.name, "model": args.model, "model_config": mcfg.to_dict(),
        "method": method_cls.name, "method_config": config_dict(method_cfg), "preset": args.preset,
        "standard_config": config_dict(std_cfg) if with_standard else None, "init": args.init,
        "eps": eps, "eps_255": eps * 255, "seed": args.seed, "device": str(device), "eval_n": len(x_test),
        "train_n": len(x_train), "data_dir": args.data_dir, "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if distributed.world_size() > 1:
        config["world_size"] = distributed.world_size()
    if main_rank:
        write_json_atomic(out / "config.json", config)
    distributed.barrier()

    torch.manual_seed(args.seed)
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}

    # 1. The normal model (or the --init checkpoint) that the method starts from / is compared to.
    base_model: torch.nn.Module | None = None
    model: torch.nn.Module
    if args.init:
        base_model, info = load_checkpoint(args.init, device=device)
        if info.model.to_dict() != mcfg.to_dict():
            log.info("--init checkpoint is a %s: using its architecture", info.model.name)
            mcfg = info.model
        base_name = "init"
    elif with_standard or method_cls.name == "standard":
        base_model, secs = standard_model(
            standard_cls, std_cfg, spec, mcfg, eps, device, x_train, y_train, out / "standard",
            cache_dir=None if args.no_cache else Path(args.cache_dir), seed=args.seed,
            resume=args.resume, probe=probe, progress=progress,
        )
        timings["standard"] = secs
        base_name = "standard"

    def evaluate_base() -> None:
        assert base_model is not None
        results["standard"] = evaluate(base_model, x_test, y_test, eps=eps, alpha=alpha, device=device, seed=args.seed, progress=progress)
        results["standard"]["source"] = base_name
        log.info("standard: clean %.1f %%, PGD(20) %.1f %%", 100 * results["standard"]["clean_accuracy"],
                 100 * results["standard"]["pgd20_accuracy"])

    # Under torchrun rank 0 evaluates after all training, so the other ranks never wait on it.
    deferred = distributed.world_size() > 1
    if base_model is not None and (with_standard or args.init) and not deferred:
        evaluate_base()

    # 2. The method.
    if method_cls.name == "standard" and base_model is not None:
        model = base_model
        if main_rank:
            results["standard"] = evaluate(model, x_test, y_test, eps=eps, alpha=alpha, device=device, seed=args.seed, progress=progress)
    else:
        start_from = base_model if (method_cls.fine_tunes or args.init) else None
        t0 = time.perf_counter()
        model, res = train_method(method_cls, method_cfg, spec=spec, mcfg=mcfg, eps=eps, device=device,
                                  x=x_train, y=y_train, out_dir=out / method_cls.name, seed=args.seed,
                                  resume=args.resume, probe=probe, progress=progress, start_from=start_from)
        timings[method_cls.name] = res.seconds_per_epoch
        log.info("%s: %d epochs in %.1f s", method_cls.name, method_cfg.epochs, time.perf_counter() - t0)
        if main_rank and deferred and base_model is not None and (with_standard or args.init):
            evaluate_base()
        if main_rank:
            results[method_cls.name] = evaluate(model, x_test, y_test, eps=eps, alpha=alpha, device=device, seed=args.seed, progress=progress)
    if not main_rank:
        return 0  # training is over; rank 0 evaluates and writes the results

    summary = {
        "dataset": spec.name, "model": mcfg.name, "model_kwargs": mcfg.kwargs, "method": method_cls.name,
        "eps": eps, "eps_255": eps * 255, "seed": args.seed, "n_eval": len(x_test),
        "attack": f"torchattacks.PGD(steps=20, alpha={spec.pgd_alpha:g}/255, random_start=True)",
        **results,
        "seconds_per_epoch": timings,
        "versions": _versions(),
    }
    table = _table(results)
    write_text_atomic(out / "results.md", f"# {spec.name} / {mcfg.name}, ε = {eps * 255:g}/255\n\n" + table + "\n")
    write_json_atomic(out / "results.json", summary)
    print_table = logging.getLogger("cure_eval.defend").warning if args.quiet else log.info
    print_table("\n%s\n\nrun folder: %s", table, out)
    return 0


def train_method(
    cls: type[Method], cfg: Any, *, spec: DatasetSpec, mcfg: ModelConfig, eps: float, device: torch.device,
    x: torch.Tensor, y: torch.Tensor, out_dir: Path, seed: int, resume: bool = False,
    probe: tuple[torch.Tensor, torch.Tensor] | None = None, progress: bool = True,
    start_from: torch.nn.Module | None = None,
) -> tuple[torch.nn.Module, TrainResult]:
    """Train method ``cls`` into ``out_dir``, from a copy of ``start_from`` or from scratch."""
    if start_from is not None:
        model = _fresh_copy(start_from, mcfg, device)
    else:
        torch.manual_seed(seed + 1)
        model = create_model(mcfg).to(device)
    method = cls(cfg, _ctx(spec, eps, mcfg, device, cfg, len(x)))
    res = train(model, method, x, y, model_config=mcfg, out_dir=out_dir, seed=seed, resume=resume,
                probe=probe, progress=progress, checkpoint_extra={"eps": eps})
    return model, res


def standard_model(
    cls: type[Method], cfg: Any, spec: DatasetSpec, mcfg: ModelConfig, eps: float, device: torch.device,
    x: torch.Tensor, y: torch.Tensor, out: Path, *, cache_dir: Path | None, seed: int, resume: bool,
    probe: tuple[torch.Tensor, torch.Tensor], progress: bool,
) -> tuple[torch.nn.Module, float]:
    """Train the normal model into ``out`` or copy it from the cache; returns (model, s/epoch).

    Under torchrun rank 0 alone copies to and from the cache; every rank loads the same files.
    """
    key = _cache_key(spec, mcfg, cfg, seed, len(x))
    cached = cache_dir / f"standard-{key}" if cache_dir is not None else None
    if distributed.is_main() and cached is not None and is_complete(cached, cfg.epochs) and not is_complete(out, cfg.epochs):
        log.info("normal model: reusing cached %s", cached)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(cached, out)
    distributed.barrier()
    if distributed.broadcast_object(is_complete(out, cfg.epochs) and (resume or cached is not None)):
        model, _ = load_checkpoint(out / CHECKPOINT_NAME, device=device)
        metrics = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines() if line.strip()]
        secs = [float(r["seconds"]) for r in metrics if "seconds" in r]
        return model, (sum(secs) / len(secs)) if secs else float("nan")
    torch.manual_seed(seed)
    model = create_model(mcfg).to(device)
    method = cls(cfg, _ctx(spec, eps, mcfg, device, cfg, len(x)))
    res = train(model, method, x, y, model_config=mcfg, out_dir=out, seed=seed, resume=resume,
                probe=probe, progress=progress)
    if cached is not None and distributed.is_main():
        tmp = cached.with_name(cached.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(out, tmp)
        if cached.exists():
            shutil.rmtree(cached)
        tmp.rename(cached)
    return res.model, res.seconds_per_epoch


def _fresh_copy(model: torch.nn.Module, mcfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    """A separate copy so that fine-tuning never changes the normal model being compared."""
    copy = create_model(mcfg).to(device)
    copy.load_state_dict(unwrap(model).state_dict())
    return copy


def _ctx(spec: DatasetSpec, eps: float, mcfg: ModelConfig, device: torch.device, cfg: Any, n: int) -> TrainContext:
    if cfg.batch_size > n:
        raise UsageError(f"batch size {cfg.batch_size} is larger than the training set ({n}): lower --batch-size")
    return TrainContext(spec=spec, eps=eps, model_name=mcfg.name, device=device, epochs=cfg.epochs,
                        steps_per_epoch=n // cfg.batch_size)


def _cache_key(spec: DatasetSpec, mcfg: ModelConfig, cfg: Any, seed: int, n: int) -> str:
    key: dict[str, Any] = {"v": 1, "data": spec.name, "n": n, "model": mcfg.to_dict(), "cfg": config_dict(cfg),
                           "seed": seed, "torch": torch.__version__.split("+")[0]}
    if distributed.world_size() > 1:  # per-rank BatchNorm statistics: not the one-process model
        key["world"] = distributed.world_size()
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _table(results: dict[str, dict[str, Any]]) -> str:
    rows = [[name, f"{100 * r['clean_accuracy']:.1f}", f"{100 * r['pgd20_accuracy']:.1f}"] for name, r in results.items()]
    return tabulate(rows, headers=["model", "clean %", "PGD(20) %"], tablefmt="github")


def _versions() -> dict[str, str]:
    import foolbox
    import timm
    import torchattacks

    return {"cure_eval": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "torchattacks": torchattacks.__version__, "foolbox": foolbox.__version__}


if __name__ == "__main__":
    raise SystemExit(main())
