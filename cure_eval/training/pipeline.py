"""The training pipeline behind ``defend`` and ``reproduce``: a normal model (trained or from
the cache), a defended one derived from it, clean and PGD(20) accuracy of both, a run folder.

Units: ε and the PGD step in [0, 1] pixel units. Entry points:

* :func:`run_defend` — the whole ``defend`` run described by a :class:`DefendSettings`;
* :func:`standard_model` — the normal model, trained into a folder or copied from the cache;
* :func:`train_method` — one method, from a copy of a given model or from scratch.

Run folder (``config.json`` first, ``results.json`` last): see :mod:`cure_eval.defend`. Under
``torchrun`` every rank calls these functions; rank 0 alone writes files and evaluates.

The per-epoch measurements are chosen here and passed to the loop as epoch hooks
(:func:`epoch_hooks`): the probe accuracy, WCI tracking and the WCI learning-rate policy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from .. import __version__
from ..attacks.evaluation import evaluate
from ..core import distributed
from ..core.io import read_jsonl, write_json_atomic, write_text_atomic
from ..data import DatasetSpec, load_dataset, select_points
from ..errors import NotApplicable, UsageError
from ..models import ModelConfig, count_parameters, create_model
from ..models.checkpoint import CHECKPOINT_NAME, load_checkpoint, unwrap
from .hooks import EpochHook
from .loop import METRICS_NAME, TrainResult, is_complete, train
from .methods import Method, MethodConfig, TrainContext, config_dict
from .probes import ProbeHook
from .wci_tracking import (
    DEFAULT_HUTCHINSON_PROBES,
    DEFAULT_PROBE_N,
    WCILRPolicy,
    WCITracker,
    plot_wci_tracking,
    tracking_summary,
    wci_hooks,
)

log = logging.getLogger("cure_eval.defend")

#: The command behind the paper's numbers (logged on digits, shown in the CLIs' help).
PAPER_HINT = (
    "paper setting (GPU): python -m cure_eval.defend --dataset cifar10 --data-dir data --download "
    "--model wide_resnet --method cure --preset paper   (WRN-28-10; --model resnet18 for ResNet-18)"
)


@dataclass
class DefendSettings:
    """Everything a ``defend`` run needs, resolved (ε and step in [0, 1] pixel units).

    ``init``: start the method from this checkpoint instead of a normal model. ``train_n``: use
    only the first N training images; ``eval_n``: evaluation points (``None``: all on digits,
    1000 otherwise). ``cache_dir``: where normal models are cached (``None``: no cache).
    ``track_wci``: per-epoch WCI and train/test robust accuracy of the *method's* training
    (:mod:`cure_eval.training.wci_tracking`) on ``wci_probe_n`` fixed train and test points with
    ``wci_probes`` Hutchinson probes; ``wci_policy``: the WCI learning-rate policy (implies
    tracking; a template, copied fresh for the run).
    """

    spec: DatasetSpec
    model_name: str
    mcfg: ModelConfig
    method_cls: type[Method[Any]]
    method_cfg: MethodConfig
    standard_cls: type[Method[Any]]
    std_cfg: MethodConfig
    eps: float
    alpha: float
    out: Path
    seed: int = 0
    preset: str | None = None
    init: str | None = None
    train_n: int | None = None
    eval_n: int | None = None
    data_dir: str = "data"
    download: bool = False
    resume: bool = False
    cache_dir: Path | None = None
    progress: bool = True
    track_wci: bool = False
    wci_probe_n: int = DEFAULT_PROBE_N
    wci_probes: int = DEFAULT_HUTCHINSON_PROBES
    wci_policy: WCILRPolicy | None = None


@dataclass
class DefendResult:
    """What :func:`run_defend` returns on rank 0: the summary written to ``results.json``, the
    results table (GitHub markdown) and the run folder."""

    summary: dict[str, Any]
    table: str
    out: Path


@dataclass
class _Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_test[:128], self.y_test[:128]


def run_defend(s: DefendSettings, *, device: torch.device) -> DefendResult | None:
    """Train the normal model (or load ``s.init``) and the method, evaluate both, write the run
    folder. Returns the result on rank 0, ``None`` on the other ranks of a process group."""
    _check_batch_sizes(s)
    data = _load_data(s)  # a missing data set fails before anything is written
    main_rank = distributed.is_main()
    if main_rank:
        _prepare_folder(s.out, resume=s.resume)
    with_standard = s.method_cls.name != "standard"
    _log_plan(s, data, device, with_standard=with_standard)
    if main_rank:
        write_json_atomic(s.out / "config.json", _config(s, data, device, with_standard=with_standard))
    distributed.barrier()

    torch.manual_seed(s.seed)
    results, timings, mcfg = _train_and_evaluate(s, data, device, with_standard=with_standard)
    if not main_rank:
        return None  # training is over; rank 0 evaluates and writes the results
    summary = {
        "dataset": s.spec.name, "model": mcfg.name, "model_kwargs": mcfg.kwargs, "method": s.method_cls.name,
        "eps": s.eps, "eps_255": s.eps * 255, "seed": s.seed, "n_eval": len(data.x_test),
        "attack": f"torchattacks.PGD(steps=20, alpha={s.spec.pgd_alpha:g}/255, random_start=True)",
        **results,
        "seconds_per_epoch": timings,
        "versions": versions(),
    }
    table = results_table({k: v for k, v in results.items() if k != "wci_tracking"})
    write_text_atomic(s.out / "results.md", f"# {s.spec.name} / {mcfg.name}, ε = {s.eps * 255:g}/255\n\n" + table + "\n")
    write_json_atomic(s.out / "results.json", summary)
    return DefendResult(summary=summary, table=table, out=s.out)


def _check_batch_sizes(s: DefendSettings) -> None:
    world = distributed.world_size()
    for cfg in (s.method_cfg, *(() if s.init else (s.std_cfg,))):
        if cfg.batch_size % world:  # each rank trains on batch_size / world of every global batch
            raise UsageError(f"batch size {cfg.batch_size} is not divisible by the {world} processes: "
                             f"pass a `batch_size` that is a multiple of {world}")


def _load_data(s: DefendSettings) -> _Data:
    train_ds = load_dataset(s.spec.name, "train", data_dir=s.data_dir, download=s.download)
    test_ds = load_dataset(s.spec.name, "test", data_dir=s.data_dir, download=s.download)
    x_train, y_train = train_ds.tensors
    if s.train_n is not None:
        x_train, y_train = x_train[: s.train_n], y_train[: s.train_n]
    eval_n = s.eval_n if s.eval_n is not None else (None if s.spec.name == "digits" else 1000)
    idx = select_points(len(test_ds), eval_n, s.seed)
    return _Data(x_train, y_train, test_ds.tensors[0][idx], test_ds.tensors[1][idx])


def _prepare_folder(out: Path, *, resume: bool) -> None:
    if out.exists() and not resume and any(out.iterdir()):
        log.info("run folder %s exists: starting over (pass --resume to continue it)", out)
    (out / "results.json").unlink(missing_ok=True)  # never leave a stale "finished" result behind
    (out / "results.md").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _log_plan(s: DefendSettings, data: _Data, device: torch.device, *, with_standard: bool) -> None:
    probe_model = create_model(s.mcfg)
    n_params = count_parameters(probe_model)
    del probe_model
    log.info("cure_eval %s | device %s | dataset %s (%d train, %d eval points) | ε = %g/255, PGD step %g/255",
             __version__, device, s.spec.name, len(data.x_train), len(data.x_test), s.eps * 255, s.spec.pgd_alpha)
    log.info("model %s %s (%.2f M parameters)", s.mcfg.name, s.mcfg.kwargs or "", n_params / 1e6)
    if with_standard:
        log.info("normal model: standard, %d epochs; then %s, %d epochs%s", s.std_cfg.epochs, s.method_cls.name,
                 s.method_cfg.epochs, f" from {s.init}" if s.init else "")
    if s.spec.name == "digits":
        log.info("%s", PAPER_HINT)


def _config(s: DefendSettings, data: _Data, device: torch.device, *, with_standard: bool) -> dict[str, Any]:
    config = {
        "cure_eval_version": __version__, "dataset": s.spec.name, "model": s.model_name,
        "model_config": s.mcfg.to_dict(), "method": s.method_cls.name, "method_config": config_dict(s.method_cfg),
        "preset": s.preset, "standard_config": config_dict(s.std_cfg) if with_standard else None,
        "init": s.init, "eps": s.eps, "eps_255": s.eps * 255, "seed": s.seed, "device": str(device),
        "eval_n": len(data.x_test), "train_n": len(data.x_train), "data_dir": s.data_dir,
        "torch": torch.__version__, "python": platform.python_version(),
    }
    if distributed.world_size() > 1:
        config["world_size"] = distributed.world_size()
    if s.track_wci or s.wci_policy is not None:
        config["wci_tracking"] = {"probe_n": s.wci_probe_n, "hutchinson_probes": s.wci_probes,
                                  "lr_policy": s.wci_policy.describe() if s.wci_policy is not None else None}
    return config


def _train_and_evaluate(
    s: DefendSettings, data: _Data, device: torch.device, *, with_standard: bool,
) -> tuple[dict[str, Any], dict[str, float], ModelConfig]:
    """Train (normal model, then the method) and evaluate on rank 0; returns the results, the
    seconds per epoch and the architecture (``--init``'s when it differs). Under torchrun rank 0
    evaluates after all training, so the other ranks never wait on it."""
    main_rank = distributed.is_main()
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    mcfg = s.mcfg

    def run_eval(model: torch.nn.Module) -> dict[str, Any]:
        return evaluate(model, data.x_test, data.y_test, eps=s.eps, alpha=s.alpha, device=device, seed=s.seed,
                        progress=s.progress)

    # 1. The normal model (or the --init checkpoint) that the method starts from / is compared to.
    base_model: torch.nn.Module | None = None
    base_name = "standard"
    if s.init:
        base_model, info = load_checkpoint(s.init, device=device)
        if info.model.to_dict() != mcfg.to_dict():
            log.info("--init checkpoint is a %s: using its architecture", info.model.name)
            mcfg = info.model
        base_name = "init"
    tracker = wci_tracker(s, data) if (s.track_wci or s.wci_policy is not None) else None
    policy = dataclasses.replace(s.wci_policy, decay_epochs=[]) if s.wci_policy is not None else None
    if not s.init:
        # ``--method standard`` *is* this training: tracked (and then never from the cache) if asked
        tracked = tracker is not None and s.method_cls.name == "standard"
        base_model, secs = standard_model(
            s.standard_cls, s.std_cfg, s.spec, mcfg, s.eps, device, data.x_train, data.y_train, s.out / "standard",
            cache_dir=None if tracked else s.cache_dir, seed=s.seed, resume=s.resume, probe=data.probe,
            progress=s.progress, wci=tracker if tracked else None, lr_policy=policy if tracked else None,
        )
        timings["standard"] = secs
        if tracked and main_rank and tracker is not None:
            metrics = read_jsonl(s.out / "standard" / METRICS_NAME)
            results["wci_tracking"] = {"standard": _tracking_result(s, metrics, tracker, policy)}

    def evaluate_base() -> None:
        assert base_model is not None
        results["standard"] = run_eval(base_model)
        results["standard"]["source"] = base_name
        log.info("standard: clean %.1f %%, PGD(20) %.1f %%", 100 * results["standard"]["clean_accuracy"],
                 100 * results["standard"]["pgd20_accuracy"])

    deferred = distributed.world_size() > 1
    compare_base = with_standard or bool(s.init)
    if compare_base and not deferred:
        evaluate_base()

    # 2. The method.
    if s.method_cls.name == "standard" and base_model is not None:
        if main_rank:
            results["standard"] = run_eval(base_model)
        return results, timings, mcfg
    start_from = base_model if (s.method_cls.fine_tunes or s.init) else None
    t0 = time.perf_counter()
    model, res = train_method(s.method_cls, s.method_cfg, spec=s.spec, mcfg=mcfg, eps=s.eps, device=device,
                              x=data.x_train, y=data.y_train, out_dir=s.out / s.method_cls.name, seed=s.seed,
                              resume=s.resume, probe=data.probe, progress=s.progress, start_from=start_from,
                              wci=tracker, lr_policy=policy)
    timings[s.method_cls.name] = res.seconds_per_epoch
    log.info("%s: %d epochs in %.1f s", s.method_cls.name, s.method_cfg.epochs, time.perf_counter() - t0)
    if main_rank and tracker is not None:
        results["wci_tracking"] = {s.method_cls.name: _tracking_result(s, res.metrics, tracker, policy)}
    if main_rank and deferred and compare_base:
        evaluate_base()
    if main_rank:
        results[s.method_cls.name] = run_eval(model)
    return results, timings, mcfg


def wci_tracker(s: DefendSettings, data: _Data) -> WCITracker:
    """The run's WCI tracker: ``s.wci_probe_n`` seeded training points (not augmented) and as many
    seeded evaluation points, the run's ε, the audit's PGD (10 steps) and seed."""
    if s.wci_probe_n < 1:
        raise UsageError(f"`wci_probe_n` must be positive, got {s.wci_probe_n}")
    n_tr, n_te = min(s.wci_probe_n, len(data.x_train)), min(s.wci_probe_n, len(data.x_test))
    itr, ite = select_points(len(data.x_train), n_tr, s.seed), select_points(len(data.x_test), n_te, s.seed)
    return WCITracker(train_probe=(data.x_train[itr], data.y_train[itr]), test_probe=(data.x_test[ite], data.y_test[ite]),
                      eps=s.eps, n_probes=s.wci_probes, seed=s.seed)


def _tracking_result(s: DefendSettings, metrics: list[dict[str, Any]], tracker: WCITracker,
                     policy: WCILRPolicy | None) -> dict[str, Any]:
    """``results.json``'s ``wci_tracking`` entry of the method, and its figure in the run folder."""
    try:
        summary = tracking_summary(metrics)
    except NotApplicable as exc:
        log.warning("%s: WCI tracking not applicable: %s", s.method_cls.name, exc)
        return {"not_applicable": str(exc), "settings": tracker.describe()}
    summary["decay_epochs"] = [int(r["epoch"]) for r in metrics if r.get("wci_lr_decay")]
    summary["settings"] = tracker.describe()
    summary["lr_policy"] = policy.describe() if policy is not None else None
    fig = plot_wci_tracking(summary, s.out / s.method_cls.name / "wci_tracking.png", title=s.method_cls.name)
    summary["figure"] = str(fig.relative_to(s.out))
    log.info("%s: Spearman ρ(WCI, robust gap) over %d epochs = %.3f; robust test final %.1f %%, best %.1f %% "
             "(epoch %d)", s.method_cls.name, len(summary["epochs"]), summary["spearman"],
             100 * summary["final_robust_test"], 100 * summary["best_robust_test"], summary["best_epoch"])
    return summary


def epoch_hooks(probe: tuple[torch.Tensor, torch.Tensor] | None = None, *, wci: WCITracker | None = None,
                lr_policy: WCILRPolicy | None = None) -> list[EpochHook]:
    """The epoch hooks of a training run, in the loop's order: the probe (clean and PGD(20)
    accuracy on ``probe``, :class:`~cure_eval.training.probes.ProbeHook`), WCI tracking, the WCI
    learning-rate policy (:func:`~cure_eval.training.wci_tracking.wci_hooks`; it needs ``wci``)."""
    return [*(() if probe is None else (ProbeHook(probe),)), *wci_hooks(wci, lr_policy)]


def train_method(
    cls: type[Method[Any]], cfg: Any, *, spec: DatasetSpec, mcfg: ModelConfig, eps: float, device: torch.device,
    x: torch.Tensor, y: torch.Tensor, out_dir: Path, seed: int, resume: bool = False,
    probe: tuple[torch.Tensor, torch.Tensor] | None = None, progress: bool = True,
    start_from: torch.nn.Module | None = None, wci: WCITracker | None = None,
    lr_policy: WCILRPolicy | None = None,
) -> tuple[torch.nn.Module, TrainResult]:
    """Train method ``cls`` into ``out_dir``, from a copy of ``start_from`` or from scratch
    (``probe``/``wci``/``lr_policy``: the epoch hooks, see :func:`epoch_hooks`)."""
    hooks = epoch_hooks(probe, wci=wci, lr_policy=lr_policy)
    if start_from is not None:
        model = _fresh_copy(start_from, mcfg, device)
    else:
        torch.manual_seed(seed + 1)
        model = create_model(mcfg).to(device)
    method = cls(cfg, _ctx(spec, eps, mcfg, device, cfg, len(x), cls.name))
    res = train(model, method, x, y, model_config=mcfg, out_dir=out_dir, seed=seed, resume=resume,
                hooks=hooks, progress=progress, checkpoint_extra={"eps": eps})
    return model, res


def standard_model(
    cls: type[Method[Any]], cfg: Any, spec: DatasetSpec, mcfg: ModelConfig, eps: float, device: torch.device,
    x: torch.Tensor, y: torch.Tensor, out: Path, *, cache_dir: Path | None, seed: int, resume: bool,
    probe: tuple[torch.Tensor, torch.Tensor], progress: bool, wci: WCITracker | None = None,
    lr_policy: WCILRPolicy | None = None,
) -> tuple[torch.nn.Module, float]:
    """Train the normal model into ``out`` or copy it from the cache; returns (model, s/epoch)
    (``probe``/``wci``/``lr_policy``: the epoch hooks, see :func:`epoch_hooks`; pass
    ``cache_dir=None`` with ``wci``).

    Under torchrun rank 0 alone copies to and from the cache; every rank loads the same files.
    """
    hooks = epoch_hooks(probe, wci=wci, lr_policy=lr_policy)
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
    method = cls(cfg, _ctx(spec, eps, mcfg, device, cfg, len(x), cls.name))
    res = train(model, method, x, y, model_config=mcfg, out_dir=out, seed=seed, resume=resume,
                hooks=hooks, progress=progress)
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


def _ctx(spec: DatasetSpec, eps: float, mcfg: ModelConfig, device: torch.device, cfg: Any, n: int, name: str) -> TrainContext:
    if cfg.batch_size > n:
        raise UsageError(f"{name}'s batch size {cfg.batch_size} is larger than the training set ({n} images): lower it")
    return TrainContext(spec=spec, eps=eps, model_name=mcfg.name, device=device, epochs=cfg.epochs,
                        steps_per_epoch=n // cfg.batch_size)


def _cache_key(spec: DatasetSpec, mcfg: ModelConfig, cfg: Any, seed: int, n: int) -> str:
    key: dict[str, Any] = {"v": 1, "data": spec.name, "n": n, "model": mcfg.to_dict(), "cfg": config_dict(cfg),
                           "seed": seed, "torch": torch.__version__.split("+")[0]}
    if distributed.world_size() > 1:  # per-rank BatchNorm statistics: not the one-process model
        key["world"] = distributed.world_size()
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """Clean and PGD(20) accuracy per trained model (GitHub markdown, %)."""
    rows = [[name, f"{100 * r['clean_accuracy']:.1f}", f"{100 * r['pgd20_accuracy']:.1f}"] for name, r in results.items()]
    return tabulate(rows, headers=["model", "clean %", "PGD(20) %"], tablefmt="github")


def versions() -> dict[str, str]:
    """Versions of cure_eval and of the libraries the numbers depend on."""
    import foolbox
    import timm
    import torchattacks

    return {"cure_eval": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "torchattacks": torchattacks.__version__, "foolbox": foolbox.__version__}
