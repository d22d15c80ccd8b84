"""Measure the ``suite_vs_autoattack`` finding on honest and masked digits models (the numbers
behind its threshold in docs/masking.md).

Models: the small digits CNN trained normally (as the tests train it), and the same CNN behind
the three masking wrappers of :mod:`cure_eval.testing` (shattered, vanishing, stochastic);
optionally defend checkpoints (``--checkpoint``, repeatable). Per model: the whole suite
(FGSM, PGD(7/20/40/100) with the best iterate, both DeepFools, SPSA) and the original AutoAttack
on the same points; prints clean accuracy, the suite's own worst case, AutoAttack's robust
accuracy, the share of attacked points only AutoAttack breaks (the finding's value) and only the
suite breaks.

Usage::

    python benchmarks/measure_autoattack_gap.py --n 200
    python benchmarks/measure_autoattack_gap.py --n 200 --checkpoint runs/x/standard --checkpoint runs/x/cure
    python benchmarks/measure_autoattack_gap.py --tiny   # 6 points: a check that it runs, not a measurement
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

from cure_eval.attacks import autoattack_comparison, run_suite
from cure_eval.data import get_dataset_spec, load_dataset, select_points
from cure_eval.errors import CureEvalError
from cure_eval.models import NormalizedModel
from cure_eval.models.checkpoint import load_checkpoint
from cure_eval.testing import NoisyInput, QuantizedInput, SaturatedLogits, small_cnn, train_plain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_if_degenerate, parse_args  # noqa: E402

ATTACKS = "fgsm,pgd7,pgd20,pgd40,pgd100,apgd-ce,apgd-dlr,deepfool_linf,deepfool_l2,spsa,autoattack"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", action="append", default=[])
    p.add_argument("--no-wrappers", action="store_true", help="only the --checkpoint models")
    p.add_argument("--json", default=None)
    args = parse_args(p, argv, tiny={"n": 6})
    torch.set_num_threads(1)
    spec = get_dataset_spec("digits")
    models: dict[str, nn.Module] = {}
    if not args.no_wrappers:
        torch.manual_seed(0)
        train = load_dataset("digits", "train")
        cnn = train_plain(NormalizedModel(small_cnn(), spec.mean, spec.std), *train.tensors)
        models.update({"cnn normal": cnn, "cnn shattered": QuantizedInput(cnn, levels=8),
                       "cnn vanishing": SaturatedLogits(cnn, scale=1e4), "cnn stochastic": NoisyInput(cnn, sigma=0.1)})
    for c in args.checkpoint:
        try:
            model, info = load_checkpoint(c, device=torch.device("cpu"))
        except CureEvalError as exc:
            raise SystemExit(f"measure_autoattack_gap.py: {exc}") from None
        models[f"{info.model.name} {info.method}"] = model
    test = load_dataset("digits", "test")
    idx = select_points(len(test), args.n, args.seed)
    x, y = test.tensors[0][idx], test.tensors[1][idx]
    rows, out = [], {}
    for name, model in models.items():
        start = time.perf_counter()
        res = run_suite(model.eval(), x, y, eps=spec.default_eps / 255, device="cpu", attacks=ATTACKS, seed=args.seed,
                        indices=idx, pgd_alpha=spec.pgd_alpha / 255, progress=False)
        comp = autoattack_comparison(res)["autoattack"]
        attacked = int(res.clean_correct.sum())
        only_aa, only_suite = len(comp["only_reference"]), len(comp["only_suite"])
        summary = res.summary()
        pgd = summary["attacks"]["pgd100"]
        entry = {"clean": res.clean_accuracy, "suite_worst_case": comp["suite_worst_case_accuracy"],
                 "autoattack": comp["robust_accuracy"], "only_autoattack": only_aa, "only_suite": only_suite,
                 "attacked": attacked, "value": only_aa / max(attacked, 1),
                 "pgd100_last": pgd["robust_accuracy"], "pgd100_any_iterate": pgd.get("any_iterate_robust_accuracy"),
                 "spsa": summary["attacks"]["spsa"]["robust_accuracy"],
                 "broken_by": summary["attacks"]["autoattack"]["broken_by"],
                 "seconds": {a: r["seconds"] for a, r in summary["attacks"].items()},
                 "total_seconds": time.perf_counter() - start}
        exit_if_degenerate(counts={f"{name}: attacked points": attacked},
                           times={**{f"{name}: {a} seconds": t for a, t in entry["seconds"].items()},
                                  f"{name}: seconds": entry["total_seconds"]},
                           ratios={f"{name}: {k}": entry[k] for k in ("clean", "suite_worst_case", "autoattack", "value")})
        out[name] = entry
        rows.append([name, f"{100 * entry['clean']:.1f}", f"{100 * entry['suite_worst_case']:.1f}",
                     f"{100 * entry['autoattack']:.1f}", f"{only_aa} ({entry['value']:.3f})", only_suite,
                     f"{entry['total_seconds']:.0f}"])
        sys.stderr.write(f"{name}: {json.dumps(entry)}\n")
    exit_if_degenerate(tables={"models (--no-wrappers needs a --checkpoint)": rows})
    sys.stdout.write(tabulate(rows, headers=["model", "clean %", "suite worst %", "AutoAttack %",
                                             "only AutoAttack (share)", "only suite", "seconds"],
                              tablefmt="github") + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
