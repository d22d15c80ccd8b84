"""AutoAttack's cost next to the suite's, on the same points: seconds and model evaluations.

Runs, each on its own, from the same clean-correct points: the original AutoAttack (package
``pyautoattack``, ``standard`` version, sub-attack by sub-attack), and the suite's attacks (FGSM,
the PGD(7/20/40/100) family, SPSA). Model evaluations are counted as images through the model's
forward (a forward+backward pass counts once, like a forward), by a wrapper around the model.
Prints one table with seconds, evaluations and robust accuracy per attack, and the ratios
AutoAttack / suite.

Usage::

    python benchmarks/bench_autoattack.py --checkpoint runs/digits_wide_resnet_cure_s0/cure --n 200
    python benchmarks/bench_autoattack.py            # the small digits CNN, trained inline, 100 points
    python benchmarks/bench_autoattack.py --tiny     # 8 points: a check that it runs, not a measurement

Threads default to 1 (small models on a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from cure_eval.attacks import run_autoattack, run_suite
from cure_eval.data import get_dataset_spec, load_dataset, select_points
from cure_eval.errors import CureEvalError
from cure_eval.models import NormalizedModel
from cure_eval.models.checkpoint import load_checkpoint
from cure_eval.testing import small_cnn, train_plain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_if_degenerate, parse_args  # noqa: E402

SUITE = ("fgsm", "pgd7,pgd20,pgd40,pgd100", "spsa")


class Counting(nn.Module):
    """Counts the images that go through ``model``'s forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        out: torch.Tensor = self.model(x)
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint or defend run subfolder (default: a small CNN)")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--eps", type=float, default=None, help="1/255 units (default: the dataset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = parse_args(p, argv, tiny={"n": 8})
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.checkpoint:
        try:
            model, info = load_checkpoint(args.checkpoint, device=torch.device("cpu"))
        except CureEvalError as exc:
            raise SystemExit(f"bench_autoattack.py: {exc}") from None
        spec = get_dataset_spec(info.dataset)
    else:
        spec = get_dataset_spec("digits")
        torch.manual_seed(0)
        train = load_dataset("digits", "train")
        model = train_plain(NormalizedModel(small_cnn(), spec.mean, spec.std), *train.tensors)
    model.eval()
    eps = (args.eps if args.eps is not None else spec.default_eps) / 255
    test = load_dataset(spec.name, "test")
    idx = select_points(len(test), args.n, args.seed)
    x, y = test.tensors[0][idx], test.tensors[1][idx]
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    xc, yc, ic = x[correct], y[correct], idx[correct]
    exit_if_degenerate(counts={"clean-correct points": len(xc)})
    counting = Counting(model).eval()
    rows: list[dict[str, Any]] = []

    start = time.perf_counter()
    run = run_autoattack(counting, xc, yc, eps=eps, device="cpu", seed=args.seed)
    aa_s, aa_n = time.perf_counter() - start, counting.images
    rows.append({"attack": "AutoAttack (standard)", "seconds": aa_s, "evaluations": aa_n,
                 "robust": float(run.robust(yc).double().sum()) / len(x)})
    for sub, s in run.seconds.items():
        rows.append({"attack": f"  {sub}", "seconds": s, "evaluations": None,
                     "robust": None, "broke": int((run.broken_by == run.sub_attacks.index(sub)).sum())})
    suite_s, suite_n = 0.0, 0
    for attacks in SUITE:
        counting.images = 0
        start = time.perf_counter()
        res = run_suite(counting, xc, yc, eps=eps, device="cpu", attacks=attacks, seed=args.seed, indices=ic,
                        pgd_alpha=spec.pgd_alpha / 255, progress=False)
        secs, n_eval = time.perf_counter() - start, counting.images
        suite_s, suite_n = suite_s + secs, suite_n + n_eval
        rows.append({"attack": attacks, "seconds": secs, "evaluations": n_eval,
                     "robust": float(res.worst_case.double().sum()) / len(x)})  # PGD: any iterate
    rows.append({"attack": "suite (FGSM, PGD family, SPSA)", "seconds": suite_s, "evaluations": suite_n, "robust": None})
    table = tabulate([[r["attack"], f"{r['seconds']:.1f}", "" if r["evaluations"] is None else f"{r['evaluations']:,}",
                       "" if r["robust"] is None else f"{100 * r['robust']:.1f}", r.get("broke", "")] for r in rows],
                     headers=["attack", "seconds", "model evaluations", "robust %", "points broken"], tablefmt="github",
                     disable_numparse=True)
    attacked = [r for r in rows if r["evaluations"] is not None]
    exit_if_degenerate(counts={f"{r['attack']}: model evaluations": r["evaluations"] for r in attacked},
                       times={f"{r['attack']}: seconds": r["seconds"] for r in rows},
                       ratios={f"{r['attack']}: robust": r["robust"] for r in rows if r["robust"] is not None})
    ratio = {"seconds": aa_s / suite_s, "evaluations": aa_n / suite_n}
    exit_if_degenerate(ratios={f"AutoAttack / suite {k}": v for k, v in ratio.items()})
    sys.stdout.write(f"{spec.name}, {len(x)} points ({len(xc)} clean-correct), ε = {eps * 255:g}/255\n\n{table}\n\n"
                     f"AutoAttack / suite: {ratio['seconds']:.2f}× the seconds, {ratio['evaluations']:.2f}× the "
                     f"model evaluations\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"rows": rows, "ratio": ratio, "n": len(x), "eps": eps}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
