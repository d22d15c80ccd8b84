"""Benchmark: ``audit --features`` on 100 digits points of a WRN-16-4, against a plain forward pass.

    python benchmarks/bench_features.py [--checkpoint RUN/standard] [--points 100] [--threads 1]
    python benchmarks/bench_features.py --tiny   # 10 points, 1 epoch, 2 Jacobian points: a check, seconds

Times, side by side in one run on the same points: one batched forward pass over the points
(the unit), the PGD(20) that gives the adversarial ``δ`` (the audit replays the suite's PGD(20)
on these points; here :func:`compute_features` runs it with the same settings), the per-layer
sensitivity (random and adversarial ``δ``, three forward passes with hooks), the Jacobian's top
singular values (5 points, 10 subspace iterations, all layers), the confidence summary and the
two figures with ``features.json`` (written to a temporary folder). The model: ``--checkpoint``
(e.g. the default ``defend`` run's normal WRN-16-4, ``RUN/standard``) when given, else a WRN-16-4
trained here for ``--train-epochs``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

import cure_eval  # noqa: F401, E402  (registers wide_resnet16_4 in timm)
from cure_eval.data import get_dataset_spec, load_dataset  # noqa: E402
from cure_eval.errors import CureEvalError  # noqa: E402
from cure_eval.features import compute_features, write_features  # noqa: E402
from cure_eval.models import create_model, model_config_for  # noqa: E402
from cure_eval.models.checkpoint import load_checkpoint  # noqa: E402
from cure_eval.testing import train_plain  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_if_degenerate, parse_args  # noqa: E402


def build_model(checkpoint: str | None, train_epochs: int, seed: int) -> tuple[torch.nn.Module, str]:
    if checkpoint is not None:
        if not Path(checkpoint).exists():
            raise SystemExit(f"bench_features.py: no checkpoint at {checkpoint}: pass --checkpoint a defend run's "
                             "model folder (e.g. RUN/standard), or leave it out to train a WRN-16-4 here")
        try:
            model, _ = load_checkpoint(checkpoint, device=torch.device("cpu"))
        except CureEvalError as exc:
            raise SystemExit(f"bench_features.py: {exc}") from None
        return model.eval(), checkpoint
    torch.manual_seed(seed)
    model = create_model(model_config_for("wide_resnet", get_dataset_spec("digits")))
    x, y = load_dataset("digits", "train").tensors
    return train_plain(model, x, y, epochs=train_epochs, seed=seed, lr=2e-3, batch_size=128), f"trained {train_epochs} epochs here"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a defend run's model folder (default: train a WRN-16-4 here)")
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--points", type=int, default=100)
    ap.add_argument("--jacobian-points", type=int, default=5)
    ap.add_argument("--jacobian-iterations", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = parse_args(ap, argv, tiny={"train_epochs": 1, "points": 10, "jacobian_points": 2,
                                      "jacobian_iterations": 3})
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    spec = get_dataset_spec("digits")
    model, source = build_model(args.checkpoint, args.train_epochs, args.seed)
    x, y = load_dataset("digits", "test").tensors
    x, y = x[:args.points], y[:args.points]
    dev = torch.device("cpu")

    with torch.no_grad():
        model(x)  # warm-up (oneDNN primitive creation)
        t0 = time.perf_counter()
        for _ in range(5):
            model(x)
        t_fwd = (time.perf_counter() - t0) / 5

    t0 = time.perf_counter()
    res = compute_features(model, x, y, device=dev, eps=spec.default_eps / 255, pgd_alpha=spec.pgd_alpha / 255,
                           n_points=args.points, jacobian_points=args.jacobian_points,
                           jacobian_iterations=args.jacobian_iterations, seed=args.seed, progress=False)
    t_compute = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_features(res, tmp, label="standard")
        t_write = time.perf_counter() - t0
    secs = res["seconds"]
    t_pgd = secs["clean_and_attack"]
    total = t_compute + t_write  # compute_features in all (its own clock misses nothing outside it)
    steps = {"plain forward pass": t_fwd, "clean logits + PGD(20)": t_pgd, "sensitivity": secs["sensitivity"],
             "Jacobian σ": secs["jacobian"], "figures + features.json": t_write, "--features in all": total}
    exit_if_degenerate(counts={"clean-correct and attacked points": res["n_points"], "layers": len(res["layers"]),
                               "Jacobian points": res["config"]["jacobian_points"]},
                       times=steps)
    exit_if_degenerate(ratios={f"{k} / forward pass": v / t_fwd for k, v in steps.items()})
    print(f"WRN-16-4 ({source}) on {args.points} digits points ({res['n_points']} clean-correct and attacked), "
          f"{len(res['layers'])} layers, threads = {torch.get_num_threads()}")
    rows = [
        ["plain forward pass (batched)", f"{t_fwd:.3f}", "1.0"],
        ["clean logits (all points) + PGD(20) δ", f"{t_pgd:.2f}", f"{t_pgd / t_fwd:.0f}"],
        ["sensitivity: random + adversarial δ", f"{secs['sensitivity']:.2f}", f"{secs['sensitivity'] / t_fwd:.0f}"],
        [f"Jacobian σ ({res['config']['jacobian_points']} points, {res['config']['jacobian_iterations']} iter.)",
         f"{secs['jacobian']:.2f}", f"{secs['jacobian'] / t_fwd:.0f}"],
        ["figures + features.json", f"{t_write:.2f}", f"{t_write / t_fwd:.0f}"],
        ["--features in all", f"{total:.2f}", f"{total / t_fwd:.0f}"],
    ]
    print(tabulate(rows, headers=["step", "seconds", "× forward pass"], tablefmt="github"))


if __name__ == "__main__":
    main()
