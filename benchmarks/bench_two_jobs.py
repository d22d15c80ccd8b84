"""Two training jobs on one small machine: how much slower each gets, and what the CLIs do about it.

    python benchmarks/bench_two_jobs.py [--repeats 3] [--epochs 2] [--eval-n 40]

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

Measure with nothing else running.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

# torch first, then the CLI: the hook sees torch loaded and leaves OpenMP's default in place
_TORCH_FIRST = "import torch, runpy, sys; sys.argv[0] = 'defend'; runpy.run_module('cure_eval.defend', run_name='__main__')"


def _command(setting: str, out: Path, args: argparse.Namespace) -> list[str]:
    cli = ["--model", "wide_resnet", "--method", "cure", "--pretrain-epochs", str(args.epochs), "--epochs",
           str(args.epochs), "--eval-n", str(args.eval_n), "--no-cache", "--no-progress", "--quiet",
           "--out", str(out), "--cache-dir", str(out / "cache")]
    if setting == "libgomp default":
        return [sys.executable, "-c", _TORCH_FIRST, *cli]
    if setting == "--threads 1":
        return [sys.executable, "-m", "cure_eval.defend", *cli, "--threads", "1"]
    return [sys.executable, "-m", "cure_eval.defend", *cli]


def _run(setting: str, jobs: int, work: Path, args: argparse.Namespace) -> float:
    """Wall time until all ``jobs`` copies have finished."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    t0 = time.perf_counter()
    procs = [subprocess.Popen(_command(setting, work / f"job{j}", args), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for j in range(jobs)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{setting}: defend failed ({p.returncode}): {err.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the normal model and of CURE (default: 2)")
    ap.add_argument("--eval-n", type=int, default=40)
    ap.add_argument("--settings", default="libgomp default,CLI default,--threads 1")
    args = ap.parse_args()
    settings = args.settings.split(",")
    times: dict[tuple[str, int], list[float]] = {(s, j): [] for s in settings for j in (1, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for s in settings:
                for jobs in (1, 2):
                    times[(s, jobs)].append(_run(s, jobs, Path(tmp) / f"{r}_{jobs}", args))
                    print(f"repeat {r + 1}: {s}, {jobs} job(s): {times[(s, jobs)][-1]:.1f} s", file=sys.stderr)
    rows = []
    base = statistics.median(times[(settings[0], 1)])
    for s in settings:
        alone, pair = statistics.median(times[(s, 1)]), statistics.median(times[(s, 2)])
        rows.append([s, f"{alone:.1f}", f"{pair:.1f}", f"{pair / alone:.2f}×", f"{alone / base:.2f}",
                     " ".join(f"{t:.0f}" for t in times[(s, 1)]) + " / " + " ".join(f"{t:.0f}" for t in times[(s, 2)])])
    print(f"# defend, digits WRN-16-4, {args.epochs} + {args.epochs} epochs, {args.eval_n} evaluation points, "
          f"{os.cpu_count()} cores; median of {args.repeats}")
    print(tabulate(rows, headers=["setting", "one job (s)", "two jobs side by side (s)", "pair / alone",
                                  f"alone vs {settings[0]}", "all runs (alone / pair)"], tablefmt="github"))


if __name__ == "__main__":
    main()
