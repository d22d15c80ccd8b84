"""Benchmark: input-Hessian eigenvalues of a WRN-16-4 on digits, and HVP throughput.

    python benchmarks/bench_geometry.py [--points 20] [--k 10] [--train-epochs 2] [--threads 2]
    python benchmarks/bench_geometry.py --tiny   # 2 points, k = 2, untrained, 1 thread: a check, seconds

1. Top-k eigenvalues (Lanczos, ``eigsh`` per point, products batched across points) for
   ``--points`` digits test points of ``timm.create_model('wide_resnet16_4', num_classes=10,
   in_chans=1)`` wrapped in :class:`cure_eval.models.NormalizedModel`, eval mode, optionally
   trained for a few epochs first. Also the full 64×64 spectrum, for comparison.
2. Hessian-vector-product throughput side by side: batched central finite differences (many
   directions per forward/backward), batched exact double-backprop, one-vector-per-call finite
   differences, and the single-vector forward-over-reverse ``jvp(grad)``.

The script sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets it: with 2
OpenMP threads and other processes competing for the cores, small batches otherwise spend most
of their time spinning in thread barriers (10-50x slower on a loaded 2-core machine).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import copy  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

import cure_eval  # noqa: F401, E402  (registers wide_resnet16_4 in timm)
from cure_eval.data import get_dataset_spec, load_dataset  # noqa: E402
from cure_eval.geometry import curvature_profile, hvp_jvp, input_hvp  # noqa: E402
from cure_eval.models import NormalizedModel  # noqa: E402
from cure_eval.testing import train_plain  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_if_degenerate, parse_args  # noqa: E402


def build_model(train_epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = get_dataset_spec("digits")
    net = timm.create_model("wide_resnet16_4", num_classes=10, in_chans=1)
    model = NormalizedModel(net, spec.mean, spec.std)
    if train_epochs > 0:
        x, y = load_dataset("digits", "train").tensors
        return train_plain(model, x, y, epochs=train_epochs, seed=seed, lr=2e-3, batch_size=128)
    return model.eval()


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    fn()  # warm-up (oneDNN primitive creation)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--h", type=float, default=None, help="FD step (default: digits default_h)")
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sequential", action="store_true",
                    help="also time eigsh one point at a time (no batching across points)")
    args = parse_args(ap, argv, tiny={"points": 2, "k": 2, "train_epochs": 0, "threads": 1, "sequential": True})
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    spec = get_dataset_spec("digits")
    h = args.h if args.h is not None else spec.default_h
    dev = torch.device("cpu")

    t0 = time.perf_counter()
    model = build_model(args.train_epochs, args.seed)
    t_train = time.perf_counter() - t0
    x, y = load_dataset("digits", "test").tensors
    x, y = x[:args.points], y[:args.points]
    with torch.no_grad():
        acc = float((model(load_dataset("digits", "test").tensors[0]).argmax(1)
                     == load_dataset("digits", "test").tensors[1]).float().mean())
    exit_if_degenerate(counts={"points": len(x)}, times={"model set-up": t_train}, ratios={"test accuracy": acc})
    print(f"WRN-16-4 on digits: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
          f"trained {args.train_epochs} epochs in {t_train:.1f} s, test accuracy {acc:.3f}; "
          f"h = {h}, threads = {torch.get_num_threads()}")

    rows = []
    runs: list[tuple[str, dict[str, object]]] = [
        (f"eigsh top/bottom-{args.k}, batched across {args.points} points",
         {"full_spectrum": False, "points_per_batch": args.points}),
        ("full 64×64 spectrum (64 batched HVPs/point)", {"full_spectrum": True, "lanczos": False}),
    ]
    if args.sequential:
        runs.append((f"eigsh top/bottom-{args.k}, one point at a time",
                     {"full_spectrum": False, "points_per_batch": 1}))
    profiles = {}
    for name, kw in runs:
        t0 = time.perf_counter()
        prof = curvature_profile(model, x, y, h=h, k=args.k, device=dev, progress=False,
                                 seed=args.seed, **kw)  # type: ignore[arg-type]
        dt = time.perf_counter() - t0
        profiles[name] = prof
        exit_if_degenerate(counts={f"{name}: HVPs": prof.hvps}, times={name: dt},
                           ratios={f"{name}: top eigenvalue {i + 1}": v for i, v in enumerate(prof.top_eigenvalues)})
        rows.append([name, f"{dt:.1f}", f"{dt / args.points:.3f}", f"{prof.hvps / args.points:.0f}",
                     " ".join(f"{v:.3g}" for v in prof.top_eigenvalues[:5])])
    print()
    print(tabulate(rows, headers=["curvature profile", "total s", "s/point", "HVPs/point",
                                  "mean top-5 eigenvalues"]))
    lan = next(iter(profiles.values()))
    exit_if_degenerate(ratios={"max Rayleigh–Ritz residual": lan.to_dict()["max_residual"],
                               "mean top Rayleigh quotient": lan.to_dict()["mean_top_rayleigh"]})
    print(f"\nLanczos: max Rayleigh–Ritz residual {lan.to_dict()['max_residual']:.3g}; mean top "
          f"Rayleigh quotient u·A(u) {lan.to_dict()['mean_top_rayleigh']:.4g} vs top eigenvalue "
          f"{lan.top_eigenvalues[0]:.4g}")

    # HVP throughput
    gen = torch.Generator().manual_seed(args.seed)
    x1, y1 = x[:1], y[:1]
    v64 = torch.randn(1, 64, 1, 8, 8, generator=gen)
    vpts = torch.randn(len(x), 1, 1, 8, 8, generator=gen)
    n_single = 16
    cases = [
        ("batched central FD, 1 point × 64 directions", 64,
         lambda: input_hvp(model, x1, y1, v64, h=h, device=dev)),
        (f"batched central FD, {len(x)} points × 1 direction", len(x),
         lambda: input_hvp(model, x, y, vpts, h=h, device=dev)),
        ("batched exact (double backprop), 1 point × 64", 64,
         lambda: input_hvp(model, x1, y1, v64, h=h, scheme="exact", device=dev)),
        (f"central FD, one vector per call (×{n_single})", n_single,
         lambda: [input_hvp(model, x1, y1, v64[:, j:j + 1], h=h, device=dev) for j in range(n_single)]),
        (f"jvp(grad) single vector (×{n_single})", n_single,
         lambda: [hvp_jvp(model, x1[0], y1[0], v64[0, j], device=dev) for j in range(n_single)]),
    ]
    rows = []
    rates = {}
    for name, count, fn in cases:
        dt = timed(fn)
        exit_if_degenerate(times={name: dt})
        rates[name] = count / dt
        rows.append([name, count, f"{dt * 1e3:.0f}", f"{count / dt:.0f}"])
    ref = rates[cases[-1][0]]
    exit_if_degenerate(ratios={f"{name} / jvp(grad)": rate / ref for name, rate in rates.items()})
    for row, (name, *_rest) in zip(rows, cases, strict=True):
        row.append(f"{rates[name] / ref:.1f}×")
    print()
    print(tabulate(rows, headers=["HVP method", "HVPs", "ms", "HVPs/s", "vs jvp(grad)"]))
    # agreement of the methods on the same vector. The ReLU network is piecewise linear: the FD
    # operator equals the exact (Gauss-Newton) Hessian only while x ± h·v̂ stays in one linear
    # region, i.e. for tiny h (and then float64 is needed to beat round-off).
    ex = input_hvp(model, x1, y1, v64[:, :1], h=1.0, scheme="exact", device=dev).reshape(-1)
    jv = hvp_jvp(model, x1[0], y1[0], v64[0, 0], device=dev).reshape(-1)
    differences = {"exact double backprop vs jvp(grad)": float((ex - jv).norm() / jv.norm())}
    m64 = copy.deepcopy(model).double()
    x64, v64d = x1.double(), v64[:, :1].double()
    ex64 = input_hvp(m64, x64, y1, v64d, h=1.0, scheme="exact", device=dev).reshape(-1)
    for step in (1e-5, 1e-3, h):
        fd64 = input_hvp(m64, x64, y1, v64d, h=step, device=dev).reshape(-1)
        differences[f"central FD (h={step:g}, float64) vs exact"] = float((fd64 - ex64).norm() / ex64.norm())
    exact_prof = curvature_profile(model, x, y, h=h, k=args.k, device=dev, scheme="exact",
                                   full_spectrum=False, points_per_batch=args.points, progress=False)
    top = {f"FD at h={h}": float(np.mean(lan.lambda_max)), "exact Hessian": float(np.mean(exact_prof.lambda_max))}
    exit_if_degenerate(ratios={**{f"relative difference, {k}": v for k, v in differences.items()},
                               **{f"mean top eigenvalue, {k}": v for k, v in top.items()}})
    print()
    for name, diff in differences.items():
        print(f"relative difference, {name}: {diff:.1e}")
    print(f"mean top eigenvalue: FD at h={h} {top[f'FD at h={h}']:.4g}, exact Hessian "
          f"{top['exact Hessian']:.4g} (the paper's point: finite h sees larger-scale "
          f"curvature than the pointwise Hessian of a ReLU net)")


if __name__ == "__main__":
    main()
