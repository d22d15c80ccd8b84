"""Step cost of the paper's settings, and the wall time they need on one GPU.

    python benchmarks/bench_paper_cost.py [--models resnet18,wide_resnet] [--batch 8] [--rounds 3]
                                          [--gpu-tflops 25]
    python benchmarks/bench_paper_cost.py --tiny   # ResNet-18 only, batch 2, 1 round: a check, seconds

For each model of the paper (CIFAR-10 ResNet-18 and WRN-28-10; SVHN uses the same ResNet-18 on
the same 32×32 images) and each method's documented recipe (``standard`` as `defend` trains the
normal model, ``cure --preset paper``, ``pgd_at``) it runs the method's real ``step`` through the
plugin registry, side by side, and reports

* CPU seconds per step and the ratio to ``standard`` (median of ``--rounds`` interleaved rounds),
* FLOPs per image and step, counted with the formulas of ``torch.utils.flop_counter`` for every
  aten operator that runs (so the double backward of CURE and every PGD iteration count), and
  their ratio to ``standard``. (``FlopCounterMode`` itself cannot be used: its module tracker's
  backward hooks break ``torch.autograd.grad`` with respect to inputs, which CURE and PGD call.)
* an estimate of the GPU wall time per epoch and of each `defend` command in docs/gpu.md
  (normal model + method), from the FLOP count and an assumed sustained throughput
  ``--gpu-tflops`` (default 25 TFLOP/s: an A100-class GPU in TF32, PyTorch's default for
  convolutions, at ≈ 16 % of its 156 TFLOP/s peak, a typical fraction for batch-128 CIFAR-size
  convnets). The estimate scales linearly: halve it for a GPU twice as fast.

The CPU time ratios check that FLOPs are a fair proxy for cost: where they differ, the time
ratio is the measured one and the FLOP ratio the one the GPU estimate assumes.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

import cure_eval  # noqa: E402,F401  (registers the models)
from cure_eval.data import DatasetSpec, get_dataset_spec  # noqa: E402
from cure_eval.models import create_model, model_config_for  # noqa: E402
from cure_eval.training.methods import Method, TrainContext, get_method  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_if_degenerate, parse_args  # noqa: E402

#: training-set sizes (CIFAR-10 train split, SVHN train split)
TRAIN_SIZE = {"cifar10": 50_000, "svhn": 73_257}
#: (dataset, model alias, label) of the paper's settings
SETTINGS = [("cifar10", "resnet18", "CIFAR-10 ResNet-18"), ("cifar10", "wide_resnet", "CIFAR-10 WRN-28-10"),
            ("svhn", "resnet18", "SVHN ResNet-18")]
#: (method, preset) as the GPU commands of docs/gpu.md run them
RECIPES = [("standard", None), ("cure", "paper"), ("pgd_at", None)]


class FlopCount(TorchDispatchMode):
    """Sum of ``torch.utils.flop_counter``'s FLOP formulas over every aten operator run inside."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def make_method(name: str, preset: str | None, spec: DatasetSpec, model_name: str, device: torch.device) -> Method:
    cls = get_method(name)
    cfg = cls.make_config(spec, model_name, preset=preset)
    ctx = TrainContext(spec=spec, eps=spec.default_eps / 255, model_name=model_name, device=device,
                       epochs=cfg.epochs, steps_per_epoch=TRAIN_SIZE[spec.name] // cfg.batch_size)
    return cls(cfg, ctx)


def measure(alias: str, args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    """CPU seconds and FLOPs per step (batch ``args.batch``) of every recipe on one CIFAR-size model."""
    spec = get_dataset_spec("cifar10")
    mcfg = model_config_for(alias, spec)
    torch.manual_seed(0)
    model = create_model(mcfg).to(device).train()
    x = torch.rand(args.batch, *spec.input_shape, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    runs = {}
    for name, preset in RECIPES:
        method = make_method(name, preset, spec, mcfg.name, device)
        opt, _ = method.make_optimizer(model)
        runs[name] = (method, opt)
    flops: dict[str, float] = {}
    for name, (method, opt) in runs.items():  # warm-up step, counted
        with FlopCount() as counter:
            method.step(model, opt, x, y)
        flops[name] = counter.total / args.batch
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, (method, opt) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            method.step(model, opt, x, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {k: {"seconds": statistics.median(times[k]), "flops_per_image": flops[k]} for k in runs}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,wide_resnet", help="model aliases (default: resnet18,wide_resnet)")
    ap.add_argument("--batch", type=int, default=8, help="batch of the timed steps (default: 8)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gpu-tflops", type=float, default=25.0, help="assumed sustained GPU throughput (default: 25)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parse_args(ap, argv, tiny={"models": "resnet18", "batch": 2, "rounds": 1})
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    aliases = [a.strip() for a in args.models.split(",") if a.strip()]
    measured = {a: measure(a, args, device) for a in aliases}
    exit_if_degenerate(counts={f"{a} {name}: FLOPs per image": r["flops_per_image"]
                               for a, m in measured.items() for name, r in m.items()},
                       times={f"{a} {name}: seconds per step": r["seconds"] for a, m in measured.items()
                              for name, r in m.items()},
                       tables={"models": measured})

    print(f"CPU step cost, batch {args.batch}, device {device}, threads {torch.get_num_threads()}, "
          f"median of {args.rounds} rounds")
    rows = []
    for alias, m in measured.items():
        base = m["standard"]
        for name, r in m.items():
            rows.append([alias, name, f"{r['seconds']:.2f}", f"{r['seconds'] / base['seconds']:.2f}×",
                         f"{r['flops_per_image'] / 1e9:.2f}", f"{r['flops_per_image'] / base['flops_per_image']:.2f}×"])
    print(tabulate(rows, headers=["model", "method", "CPU s / step", "time vs standard", "GFLOP / image",
                                  "FLOPs vs standard"], tablefmt="github"))

    print(f"\nEstimated wall time on one GPU at a sustained {args.gpu_tflops:g} TFLOP/s "
          "(normal model + method, as `defend` runs them; evaluation not included)")
    rows = []
    for dataset, alias, label in SETTINGS:
        if alias not in measured:
            continue
        spec = get_dataset_spec(dataset)
        model_name = model_config_for(alias, spec).name
        n = TRAIN_SIZE[dataset]
        epoch_h = {name: measured[alias][name]["flops_per_image"] * n / (args.gpu_tflops * 1e12) / 3600
                   for name, _ in RECIPES}
        epochs = {name: get_method(name).make_config(spec, model_name, preset=preset).epochs for name, preset in RECIPES}
        std_h = epochs["standard"] * epoch_h["standard"]
        exit_if_degenerate(times={f"{label} {name}: GPU hours per epoch": v for name, v in epoch_h.items()})
        for name, _ in RECIPES[1:]:
            rows.append([label, name, f"{epoch_h[name] * 60:.2f}", epochs[name], f"{epochs[name] * epoch_h[name]:.2f}",
                         f"{std_h:.2f} ({epochs['standard']} epochs)", f"{std_h + epochs[name] * epoch_h[name]:.2f}"])
    exit_if_degenerate(tables={"estimated GPU wall time (no --models alias is a paper setting's)": rows})
    print(tabulate(rows, headers=["setting", "method", "min / epoch", "epochs", "method h", "normal model h",
                                  "total h"], tablefmt="github"))


if __name__ == "__main__":
    main()
