"""The whole ``audit --masking-check`` against AutoAttack alone, in passes, with the verdicts.

For each model, on the same points: the audit with the default suite and ``--masking-check``
(in memory, :func:`cure_eval.auditing.audit_model`) once with SPSA and Square on every checked
point (``masking_spsa_n="all"``, what the check did before the subset) and once with the default
subset (``"auto"``); each audit's ``total_passes`` (the suite, the clean pass and every pass of
the check, counted by the library's :class:`~cure_eval.attacks.passes.PassCounter`), and
AutoAttack ``standard`` (``pyautoattack`` through :func:`cure_eval.attacks.run_autoattack`)
counted the same way. Printed: passes per point and as a share of AutoAttack's, the verdict, the
FAILs, the ``spsa_vs_pgd`` and ``square_vs_pgd`` values and seconds.

Models: without ``--checkpoint`` the small digits CNN trained inline and its three masking
wrappers (:mod:`cure_eval.testing`: shattered = input quantised to 8 levels, vanishing = logits
×10⁴, stochastic = input noise 0.1); with ``--checkpoint`` (repeatable) those checkpoints.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_masking_cost.py --tiny        # seconds, asserts
    OMP_NUM_THREADS=1 python benchmarks/bench_masking_cost.py --n 360       # the docs' table
    OMP_NUM_THREADS=1 python benchmarks/bench_masking_cost.py --n 360 --checkpoint RUN/standard/model.safetensors

Exits 1 when a figure is degenerate (a zero count, a NaN share).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from cure_eval.attacks import run_autoattack
from cure_eval.attacks.passes import PassCounter
from cure_eval.auditing import AuditOptions, audit_model
from cure_eval.data import DatasetSpec, get_dataset_spec, load_dataset, select_points
from cure_eval.models import NormalizedModel
from cure_eval.testing import NoisyInput, QuantizedInput, SaturatedLogits, small_cnn, train_plain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_if_degenerate, parse_args  # noqa: E402


def digits_models(seed: int, *, tiny: bool) -> list[tuple[str, nn.Module, DatasetSpec]]:
    """The small digits CNN (trained inline, as the tests do) and its masking wrappers."""
    spec = get_dataset_spec("digits")
    torch.manual_seed(seed)
    xt, yt = load_dataset("digits", "train").tensors
    base = train_plain(NormalizedModel(small_cnn(), spec.mean, spec.std), xt, yt, epochs=2 if tiny else 15, seed=seed)
    models: list[tuple[str, nn.Module, DatasetSpec]] = [("normal CNN", base, spec),
                                                        ("shattered", QuantizedInput(base, levels=8), spec)]
    if not tiny:
        models += [("vanishing", SaturatedLogits(base, scale=1e4), spec), ("stochastic", NoisyInput(base, sigma=0.1), spec)]
    return models


def checkpoint_models(paths: list[str]) -> list[tuple[str, nn.Module, DatasetSpec]]:
    from cure_eval.data import get_dataset_spec as spec_of
    from cure_eval.models.checkpoint import load_checkpoint

    out = []
    for p in paths:
        model, info = load_checkpoint(p)
        out.append((f"{Path(p).parent.name} ({info.method})", model, spec_of(info.dataset)))
    return out


def measure(label: str, model: nn.Module, spec: DatasetSpec, args: argparse.Namespace) -> list[dict[str, Any]]:
    model = model.eval()
    eps = spec.default_eps / 255
    test = load_dataset(spec.name, "test")
    idx = select_points(len(test), min(args.n, len(test)), args.seed)
    x, y = test.tensors[0][idx], test.tensors[1][idx]
    rows = []
    for subset in args.subsets.split(","):
        opts = AuditOptions(n=len(idx), masking_check=True, masking_spsa_n=subset, spsa_iterations=args.spsa_iterations,
                            seed=args.seed)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            torch.manual_seed(args.seed)  # the stochastic model draws its noise from the global generator
            s = audit_model(model, spec, {"model": label}, opts, Path(out), device=torch.device("cpu"),
                            progress=False, resumable=False)
        m = s["masking"]
        values = {f["name"]: f for f in m["findings"]}
        rows.append({"model": label, "what": f"audit --masking-check, SPSA/Square on {subset}",
                     "points": m["settings"]["gradient_free_points"], "passes": s["total_passes"],
                     "check": m["passes"], "verdict": m["verdict"], "failed": ",".join(m["failed"]) or "-",
                     "spsa": f"{values['spsa_vs_pgd']['value']:.3f} {values['spsa_vs_pgd']['status']}",
                     "square": f"{values['square_vs_pgd']['value']:.3f} {values['square_vs_pgd']['status']}",
                     "seconds": time.perf_counter() - t0, "n": len(idx)})
    if not args.no_autoattack:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        with PassCounter(model) as counter:
            run_autoattack(model, x, y, eps=eps, device="cpu", version="standard", seed=args.seed, batch_size=250)
        rows.append({"model": label, "what": "AutoAttack standard", "points": "", "verdict": "", "failed": "",
                     "spsa": "", "square": "", "n": len(idx), "seconds": time.perf_counter() - t0,
                     "passes": {"forward": counter.passes.forward, "backward": counter.passes.backward}})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", action="append", help="cure_eval checkpoint (repeatable); default: the digits CNN and its masks")
    ap.add_argument("--n", type=int, default=360, help="test points (default 360, all digits)")
    ap.add_argument("--spsa-iterations", type=int, default=100, help="SPSA iterations (default 100, the audit's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subsets", default="all,auto", help="masking_spsa_n values to audit with, comma-separated "
                    "(default all,auto: SPSA/Square on every checked point, then on the default subset)")
    ap.add_argument("--no-autoattack", action="store_true", help="skip AutoAttack (no share column)")
    args = parse_args(ap, argv, tiny={"n": 12, "spsa_iterations": 3})
    torch.set_num_threads(1)
    models = checkpoint_models(args.checkpoint) if args.checkpoint else digits_models(args.seed, tiny=args.tiny)
    rows: list[dict[str, Any]] = []
    for label, model, spec in models:
        rows.extend(measure(label, model, spec, args))
    table = []
    counts: dict[str, float] = {}
    shares: dict[str, float] = {}
    for r in rows:
        fb = r["passes"]["forward"] + r["passes"]["backward"]
        counts[f"{r['model']}/{r['what']}"] = fb
        aa = next((q for q in rows if q["model"] == r["model"] and q["what"] == "AutoAttack standard"), None)
        share = fb / (aa["passes"]["forward"] + aa["passes"]["backward"]) if aa else float("nan")
        if aa:
            shares[f"{r['model']}/{r['what']}"] = share
        table.append([r["model"], r["what"], r["points"], f"{r['passes']['forward'] / r['n']:,.0f}",
                      f"{r['passes']['backward'] / r['n']:,.0f}", "" if aa is None else f"{share:.3f}",
                      r["verdict"], r["failed"], r["spsa"], r["square"], f"{r['seconds']:.0f}"])
    exit_if_degenerate(counts=counts, ratios=shares, tables={"rows": table})
    print(f"digits/dataset defaults, ε = dataset default, n = {args.n}, SPSA {args.spsa_iterations} iterations, seed "
          f"{args.seed}, 1 thread; passes per audited point (forward, backward)")
    print(tabulate(table, headers=["model", "run", "SPSA/Square points", "fwd / pt", "bwd / pt", "(f+b) / AA's",
                                   "verdict", "FAILs", "spsa_vs_pgd", "square_vs_pgd", "s"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
