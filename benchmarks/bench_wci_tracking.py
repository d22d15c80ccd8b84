"""What per-epoch WCI tracking (``defend --track-wci``) adds to a PGD-AT epoch on digits.

    python benchmarks/bench_wci_tracking.py [--rounds 3] [--probe-n 64] [--probes 4] [--threads 1]
    python benchmarks/bench_wci_tracking.py --tiny   # 128 images, 1 round, small probes: a check, seconds

One epoch of ``pgd_at`` at the ``defend`` defaults on digits (WRN-16-4, the full training set,
batch 64, 10-step PGD, the loop's existing PGD(20) probe on 128 test points, checkpoint and state
written), with and without tracking, in interleaved rounds (``off`` then ``on`` in each, so load
changes hit both alike). Reported: the median wall time of the whole ``train()`` call for one
epoch, the median epoch-loop time (``metrics.jsonl``'s ``seconds``), the tracker's own
measurement time (``WCITracker.measure``, timed separately on the trained model) and the ratio
``on / off`` of the whole epoch — the issue's budget is ≤ 1.20.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

import cure_eval  # noqa: E402,F401
from cure_eval.core.io import read_jsonl  # noqa: E402
from cure_eval.data import get_dataset_spec, load_dataset, select_points  # noqa: E402
from cure_eval.models import create_model, model_config_for  # noqa: E402
from cure_eval.training import METRICS_NAME, train  # noqa: E402
from cure_eval.training.methods import TrainContext, get_method  # noqa: E402
from cure_eval.training.pipeline import epoch_hooks  # noqa: E402
from cure_eval.training.wci_tracking import DEFAULT_HUTCHINSON_PROBES, DEFAULT_PROBE_N, WCITracker  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_if_degenerate, parse_args  # noqa: E402

SPEC = get_dataset_spec("digits")
DEV = torch.device("cpu")


def _epoch(x: torch.Tensor, y: torch.Tensor, probe: tuple[torch.Tensor, torch.Tensor],
           tracker: WCITracker | None) -> tuple[float, float]:
    """(wall seconds of train() for one epoch, the epoch loop's seconds)."""
    mcfg = model_config_for("wide_resnet", SPEC)
    cls = get_method("pgd_at")
    cfg = cls.make_config(SPEC, mcfg.name, overrides={"epochs": 1})
    ctx = TrainContext(spec=SPEC, eps=SPEC.default_eps / 255, model_name=mcfg.name, device=DEV, epochs=1,
                       steps_per_epoch=len(x) // cfg.batch_size)
    torch.manual_seed(0)
    model = create_model(mcfg)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(model, cls(cfg, ctx), x, y, model_config=mcfg, out_dir=tmp, seed=0, progress=False,
              hooks=epoch_hooks(probe, wci=tracker))
        wall = time.perf_counter() - t0
        loop = float(read_jsonl(f"{tmp}/{METRICS_NAME}")[0]["seconds"])
    return wall, loop


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--probe-n", type=int, default=DEFAULT_PROBE_N)
    ap.add_argument("--probes", type=int, default=DEFAULT_HUTCHINSON_PROBES)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-n", type=int, default=None, help="only the first N training images (default: all)")
    ap.add_argument("--loop-probe-n", type=int, default=128, help="test points of the loop's PGD(20) probe (default: 128)")
    args = parse_args(ap, argv, tiny={"rounds": 1, "probe_n": 8, "probes": 1, "train_n": 128, "loop_probe_n": 16})
    torch.set_num_threads(args.threads)
    x, y = load_dataset("digits", "train").tensors
    x, y = x[:args.train_n], y[:args.train_n]
    xt, yt = load_dataset("digits", "test").tensors
    itr, ite = select_points(len(x), args.probe_n, 0), select_points(len(xt), args.probe_n, 0)
    tracker = WCITracker(train_probe=(x[itr], y[itr]), test_probe=(xt[ite], yt[ite]), eps=SPEC.default_eps / 255,
                         n_probes=args.probes, seed=0)
    probe = (xt[:args.loop_probe_n], yt[:args.loop_probe_n])
    runs: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    measure: list[float] = []
    mcfg = model_config_for("wide_resnet", SPEC)
    for r in range(args.rounds):
        runs["off"].append(_epoch(x, y, probe, None))
        runs["on"].append(_epoch(x, y, probe, tracker))
        torch.manual_seed(0)
        model = create_model(mcfg)
        t0 = time.perf_counter()
        tracker.measure(model, DEV)
        measure.append(time.perf_counter() - t0)
        print(f"round {r + 1}: train() / epoch loop s: off {runs['off'][-1][0]:.2f} / {runs['off'][-1][1]:.2f}, "
              f"on {runs['on'][-1][0]:.2f} / {runs['on'][-1][1]:.2f}; measure {measure[-1]:.2f} s",
              file=sys.stderr, flush=True)
    exit_if_degenerate(times={**{f"{k} round {r + 1} {what}": t for k, rs in runs.items() for r, run in enumerate(rs)
                                 for what, t in zip(("train()", "epoch loop"), run, strict=True)},
                              **{f"measure round {r + 1}": t for r, t in enumerate(measure)}})
    off_wall = statistics.median(w for w, _ in runs["off"])
    on_wall = statistics.median(w for w, _ in runs["on"])
    off_loop = statistics.median(lo for _, lo in runs["off"])
    med = statistics.median(measure)
    exit_if_degenerate(ratios={"on / off": on_wall / off_wall, "measure / untracked epoch": med / off_wall,
                               "measure / step loop": med / off_loop})
    rows = [["off", f"{off_wall:.2f}", f"{off_loop:.2f}", "1.00"],
            ["on", f"{on_wall:.2f}", f"{statistics.median(lo for _, lo in runs['on']):.2f}",
             f"{on_wall / off_wall:.2f}"]]
    print(f"pgd_at, digits, WRN-16-4, {len(x)} training images, {args.rounds} rounds, {args.threads} thread(s); "
          f"tracking: {args.probe_n} train + {args.probe_n} test probe points, {args.probes} Hutchinson probes\n")
    print(tabulate(rows, headers=["tracking", "train() s/epoch (median)", "epoch loop s (median)", "ratio"],
                   tablefmt="github"))
    print(f"\nWCITracker.measure alone: {med:.2f} s (median) = {med / off_wall:.1%} of an untracked epoch, "
          f"{med / off_loop:.1%} of its step loop")


if __name__ == "__main__":
    main()
