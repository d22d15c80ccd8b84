"""Two training jobs on one small machine: how much slower each gets, and what the CLIs do about it.

    python benchmarks/bench_two_jobs.py [--repeats 3] [--epochs 2] [--eval-n 40] [--train-n N]
    python benchmarks/bench_two_jobs.py --tiny   # see below: a check that it runs, not a measurement

Runs a short ``python -m cure_eval.defend`` (digits, WRN-16-4, ``--pretrain-epochs/--epochs``
``--epochs``, ``--eval-n`` evaluation points, no cache) alone and as two copies side by side, for
three settings, interleaved, ``--repeats`` times each, and prints the median wall times and the
slowdown of the pair over one job alone (on 2 cores the fair share is 2×):

* ``libgomp default``: OpenMP's own waiting (idle workers spin for a while after each parallel
  region); torch is imported before the CLI's hook runs, which is how every release before the
  hook behaved;
* ``CLI default``: plain ``python -m cure_eval.defend``: passive OpenMP waiting, set by the hook in
  ``cure_eval/__init__.py`` before torch loads (``cure_eval/_openmp.py``);
* ``--threads 1``: the CLI default and one torch thread per job.

Measure with nothing else running. ``--tiny`` runs the ``libgomp default`` setting once (the one
that starts the CLI by hand), 1 + 1 epochs on 64 training images, 4 evaluation points, and keeps
the caller's ``OMP_NUM_THREADS`` (the measurement removes it, so that each job picks its threads).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_if_degenerate, parse_args  # noqa: E402

# torch first, then the CLI: the hook sees torch loaded and leaves OpenMP's default in place
_TORCH_FIRST = "import torch, runpy, sys; sys.argv[0] = 'defend'; runpy.run_module('cure_eval.defend', run_name='__main__')"


def _command(setting: str, out: Path, args: argparse.Namespace) -> list[str]:
    cli = ["--model", "wide_resnet", "--method", "cure", "--pretrain-epochs", str(args.epochs), "--epochs",
           str(args.epochs), "--eval-n", str(args.eval_n), "--no-cache", "--no-progress", "--quiet",
           "--out", str(out), "--cache-dir", str(out / "cache")]
    if args.train_n is not None:
        cli += ["--train-n", str(args.train_n)]
    if setting == "libgomp default":
        return [sys.executable, "-c", _TORCH_FIRST, *cli]
    if setting == "--threads 1":
        return [sys.executable, "-m", "cure_eval.defend", *cli, "--threads", "1"]
    return [sys.executable, "-m", "cure_eval.defend", *cli]


def _run(setting: str, jobs: int, work: Path, args: argparse.Namespace) -> float:
    """Wall time until all ``jobs`` copies have finished."""
    drop = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") + (() if args.tiny else ("OMP_NUM_THREADS",))
    env = {k: v for k, v in os.environ.items() if k not in drop}
    t0 = time.perf_counter()
    procs = [subprocess.Popen(_command(setting, work / f"job{j}", args), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for j in range(jobs)]
    errors = [p.communicate()[1] for p in procs]  # every copy finishes before a failure is reported
    wall = time.perf_counter() - t0
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            last = (err.strip().splitlines() or ["(no output)"])[-1]
            raise SystemExit(f"bench_two_jobs.py: {setting}: defend failed ({p.returncode}): {last}")
    return wall


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the normal model and of CURE (default: 2)")
    ap.add_argument("--eval-n", type=int, default=40)
    ap.add_argument("--train-n", type=int, default=None, help="only the first N training images (default: all)")
    ap.add_argument("--settings", default="libgomp default,CLI default,--threads 1")
    args = parse_args(ap, argv, tiny={"repeats": 1, "epochs": 1, "eval_n": 4, "train_n": 64,
                                      "settings": "libgomp default"})
    settings = args.settings.split(",")
    times: dict[tuple[str, int], list[float]] = {(s, j): [] for s in settings for j in (1, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for s in settings:
                for jobs in (1, 2):
                    times[(s, jobs)].append(_run(s, jobs, Path(tmp) / f"{r}_{jobs}", args))
                    print(f"repeat {r + 1}: {s}, {jobs} job(s): {times[(s, jobs)][-1]:.1f} s", file=sys.stderr)
    exit_if_degenerate(times={f"{s}, {j} job(s), repeat {r + 1}": t for (s, j), ts in times.items()
                              for r, t in enumerate(ts)})
    rows, ratios = [], {}
    base = statistics.median(times[(settings[0], 1)])
    for s in settings:
        alone, pair = statistics.median(times[(s, 1)]), statistics.median(times[(s, 2)])
        ratios[f"{s}: pair / alone"], ratios[f"{s}: alone vs {settings[0]}"] = pair / alone, alone / base
        rows.append([s, f"{alone:.1f}", f"{pair:.1f}", f"{pair / alone:.2f}×", f"{alone / base:.2f}",
                     " ".join(f"{t:.0f}" for t in times[(s, 1)]) + " / " + " ".join(f"{t:.0f}" for t in times[(s, 2)])])
    exit_if_degenerate(ratios=ratios, tables={"settings": rows})
    print(f"# defend, digits WRN-16-4, {args.epochs} + {args.epochs} epochs, {args.eval_n} evaluation points, "
          f"{os.cpu_count()} cores; median of {args.repeats}")
    print(tabulate(rows, headers=["setting", "one job (s)", "two jobs side by side (s)", "pair / alone",
                                  f"alone vs {settings[0]}", "all runs (alone / pair)"], tablefmt="github"))


if __name__ == "__main__":
    main()
