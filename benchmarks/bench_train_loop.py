"""What the training loop's GPU-oriented bookkeeping costs on the CPU (it should cost nothing).

    python benchmarks/bench_train_loop.py [--rounds 5] [--methods standard,cure] [--threads 2] [--train-n N]
    python benchmarks/bench_train_loop.py --tiny   # 128 images, 1 round: a check that it runs, seconds

One epoch of each method on the digits training set (WRN-16-4, the ``defend`` defaults), side by
side in interleaved rounds, median seconds of the epoch loop:

* ``bare``: the minimum — batches, augmentation, ``method.step``, ``scheduler.step``, nothing else;
* ``before``: the loop as it was before the GPU work — every step's metrics converted with
  ``float()`` (one host sync per value on a GPU), checked for NaN and summed in Python;
* ``train (sync_every=50)``: :func:`cure_eval.training.train` as shipped — metrics summed on the
  device in float64, read every 50 steps and at the epoch's end;
* ``train (sync_every=1)``: the same, read after every step.

``train`` also writes the epoch's checkpoint and training state; its time here is the epoch loop
alone (``metrics.jsonl``'s ``seconds``), like the two hand-written loops.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

import cure_eval  # noqa: E402,F401
from cure_eval.core.io import read_jsonl  # noqa: E402
from cure_eval.data import get_dataset_spec, load_dataset  # noqa: E402
from cure_eval.models import create_model, model_config_for  # noqa: E402
from cure_eval.training import augment, epoch_batches, train  # noqa: E402
from cure_eval.training.methods import Method, TrainContext, get_method  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_if_degenerate, parse_args  # noqa: E402

SPEC = get_dataset_spec("digits")


def _setup(name: str, x: torch.Tensor) -> tuple[torch.nn.Module, Method, torch.optim.Optimizer, object]:
    mcfg = model_config_for("wide_resnet", SPEC)
    cls = get_method(name)
    cfg = cls.make_config(SPEC, mcfg.name, overrides={"epochs": 1})
    ctx = TrainContext(spec=SPEC, eps=SPEC.default_eps / 255, model_name=mcfg.name, device=torch.device("cpu"),
                       epochs=1, steps_per_epoch=len(x) // cfg.batch_size)
    torch.manual_seed(0)
    model = create_model(mcfg).train()
    method = cls(cfg, ctx)
    method.start_epoch(0)
    opt, sched = method.make_optimizer(model)
    return model, method, opt, sched


def _hand_loop(name: str, x: torch.Tensor, y: torch.Tensor, *, before: bool) -> float:
    model, method, opt, sched = _setup(name, x)
    gen = torch.Generator().manual_seed(1)
    batches = epoch_batches(len(x), method.config.batch_size, seed=0, epoch=0)
    sums: dict[str, float] = {}
    t0 = time.perf_counter()
    for idx in batches:
        xb = augment(x[idx], SPEC, gen)
        stats = method.step(model, opt, xb, y[idx])
        sched.step()  # type: ignore[attr-defined]
        if before:
            floats = {k: float(v) for k, v in stats.items()}
            if not all(math.isfinite(v) for v in floats.values()):
                raise RuntimeError("diverged")
            for k, v in floats.items():
                sums[k] = sums.get(k, 0.0) + v
    return time.perf_counter() - t0


def _train(name: str, x: torch.Tensor, y: torch.Tensor, *, sync_every: int) -> float:
    model, method, _, _ = _setup(name, x)
    mcfg = model_config_for("wide_resnet", SPEC)
    with tempfile.TemporaryDirectory() as tmp:
        train(model, method, x, y, model_config=mcfg, out_dir=tmp, progress=False, sync_every=sync_every)
        return float(read_jsonl(Path(tmp) / "metrics.jsonl")[0]["seconds"])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--methods", default="standard,cure")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--train-n", type=int, default=None, help="only the first N training images (default: all)")
    args = parse_args(ap, argv, tiny={"rounds": 1, "train_n": 128})
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset("digits", "train")
    x, y = ds.tensors
    x, y = x[:args.train_n], y[:args.train_n]
    variants: dict[str, Callable[[str], float]] = {
        "bare": lambda m: _hand_loop(m, x, y, before=False),
        "before": lambda m: _hand_loop(m, x, y, before=True),
        "train (sync_every=50)": lambda m: _train(m, x, y, sync_every=50),
        "train (sync_every=1)": lambda m: _train(m, x, y, sync_every=1),
    }
    rows = []
    for name in args.methods.split(","):
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v, fn in variants.items():
                times[v].append(fn(name))
        med = {v: statistics.median(t) for v, t in times.items()}
        exit_if_degenerate(times={f"{name} {v}": t for v, t in med.items()})
        exit_if_degenerate(ratios={f"{name} {v} / {base}": t / med[base] for v, t in med.items()
                                   for base in ("bare", "before")})
        rows += [[name, v, f"{med[v]:.3f}", f"{med[v] / med['bare']:.3f}", f"{med[v] / med['before']:.3f}"] for v in variants]
    exit_if_degenerate(tables={"methods": rows})
    print(f"# one digits epoch ({len(x)} images, WRN-16-4), CPU, {torch.get_num_threads()} threads, median of {args.rounds}")
    print(tabulate(rows, headers=["method", "loop", "seconds", "/ bare", "/ before"], tablefmt="github"))


if __name__ == "__main__":
    main()
