"""Where SPSA's passes go, and what cutting them changes: the masking verdicts before and after.

For the normally trained digits CNN and its three masking wrappers (:mod:`cure_eval.testing`:
shattered = input quantised to 8 levels, vanishing = logits ×10⁴, stochastic = input noise 0.1),
on the same digits test points as ``tests/test_masking.py`` (seeded subset), it runs FGSM,
PGD(40), PGD(100) once and then SPSA under each candidate setting, each SPSA run inside a
:class:`cure_eval.attacks.passes.PassCounter`, and feeds the suite to
:func:`cure_eval.masking.run_masking_check` (which reuses it). Printed per model and setting:
SPSA's forward passes (total and per attacked point), mean iterations per point, points it broke,
the ``spsa_vs_pgd`` finding's value and status, and the whole check's verdict and FAILs.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/measure_spsa_cost.py --n 80
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

from cure_eval.attacks import run_suite
from cure_eval.attacks.passes import PassCounter
from cure_eval.attacks.spsa import SPSAConfig
from cure_eval.data import get_dataset_spec, load_dataset, select_points
from cure_eval.masking import run_masking_check
from cure_eval.models import NormalizedModel
from cure_eval.testing import NoisyInput, QuantizedInput, SaturatedLogits, small_cnn, train_plain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_if_degenerate, parse_args  # noqa: E402

SETTINGS: dict[str, SPSAConfig] = {
    "reference (100 it, 128 samples)": SPSAConfig(),
    "plateau 10/1%": SPSAConfig(plateau_window=10, plateau_tol=0.01),
    "plateau 20/1%": SPSAConfig(plateau_window=20, plateau_tol=0.01),
    "plateau 20/5%": SPSAConfig(plateau_window=20, plateau_tol=0.05),
    "64 samples": SPSAConfig(samples=64),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="setting labels separated by ';' (labels contain commas; default: all)")
    ap.add_argument("--iterations", type=int, default=None, help="SPSA iterations of every setting (default: each setting's)")
    args = parse_args(ap, argv, tiny={"n": 10, "iterations": 3, "only": "reference (100 it, 128 samples);64 samples"})
    torch.set_num_threads(1)
    spec = get_dataset_spec("digits")
    torch.manual_seed(0)
    base = NormalizedModel(small_cnn(), spec.mean, spec.std)
    xt, yt = load_dataset("digits", "train").tensors
    base = train_plain(base, xt, yt).eval()
    test = load_dataset("digits", "test")
    idx = select_points(len(test), args.n, args.seed)
    x, y = test.tensors[0][idx], test.tensors[1][idx]
    eps, alpha = spec.default_eps / 255, spec.pgd_alpha / 255
    models: dict[str, nn.Module] = {"normal": base, "shattered": QuantizedInput(base, levels=8),
                                    "vanishing": SaturatedLogits(base, scale=1e4),
                                    "stochastic": NoisyInput(base, sigma=0.1)}
    settings = {k: v if args.iterations is None else dataclasses.replace(v, iterations=args.iterations)
                for k, v in SETTINGS.items() if not args.only or k in args.only.split(";")}
    rows: list[list[object]] = []
    counts: dict[str, int] = {}
    for mname, model in models.items():
        model.eval()
        grad_part = run_suite(model, x, y, eps=eps, device="cpu", attacks=["fgsm", "pgd40", "pgd100"], seed=args.seed,
                              pgd_alpha=alpha, indices=idx, progress=False)
        for sname, cfg in settings.items():
            start = time.perf_counter()
            with PassCounter(model) as counter:
                sp = run_suite(model, x, y, eps=eps, device="cpu", attacks=["spsa"], seed=args.seed, indices=idx,
                               progress=False, configs={"spsa": cfg})
            secs = time.perf_counter() - start
            suite = dataclasses.replace(grad_part, attacks={**grad_part.attacks, "spsa": sp.attacks["spsa"]})
            report = run_masking_check(model, x, y, eps=eps, device="cpu", seed=args.seed, pgd_alpha=alpha,
                                       suite=suite, progress=False)
            r = sp.attacks["spsa"]
            att = int(r.attacked.sum())
            counts[f"{mname} / {sname} SPSA forwards"] = counter.passes.forward - len(x)
            f = report.finding("spsa_vs_pgd")
            rows.append([mname, sname, f"{counter.passes.forward - len(x):,}",
                         f"{(counter.passes.forward - len(x)) / max(att, 1):,.0f}",
                         f"{float(r.extra['iterations'][r.attacked].float().mean()):.1f}", int(r.success.sum()),
                         f"{f.value:.3f} {f.status}", report.verdict,
                         ",".join(g.name for g in report.failed) or "-", f"{secs:.1f}"])
            print(*rows[-1], sep=" | ", flush=True)
    exit_if_degenerate(counts=counts, tables={"settings": rows})
    print(tabulate(rows, headers=["model", "SPSA setting", "SPSA fwd (incl. eval)", "fwd / attacked pt",
                                  "iterations / pt", "SPSA broke", "spsa_vs_pgd", "verdict", "FAILs", "SPSA s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
