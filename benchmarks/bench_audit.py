"""Benchmark the attack suite: wall time, model evaluations, SPSA throughput, PGD-family savings.

Runs the full suite (cure_eval.attacks.run_suite) on N test points and reports, per attack:

* wall time and robust accuracy;
* forward and backward passes (samples), counted by the library's
  :class:`cure_eval.attacks.passes.PassCounter` around each attack's own ``run_suite`` call (the
  PGD family together), against the minimum that attack needs:
  FGSM 1 and PGD(k) k forward+backward passes per attacked point, SPSA 2×64 forwards per
  iteration per attacked point (counting the iterations each point really ran; SPSA also
  evaluates its current iterate once per iteration to stop early);
* SPSA's forward throughput (inputs/s) as a fraction of the model's plain batched forward
  throughput measured in the same run at the same batch size (target ≥ 70 %);
* the PGD(7/20/40/100) family from one MultiStepPGD trajectory against four separate
  torchattacks.PGD runs on the same points (target ≤ 0.65×), checking that the results agree.

It exits 1 when an attack's count comes out zero. (Its former counter, a model wrapper that
walked the Python stack for the suite's ``_run_fgsm``/``_run_pgd``/``_run_spsa`` functions, went
blind when the attacks became plugins with their own ``run`` methods: every call was then
attributed to the clean pass and every attack read 0.)

Usage::

    python benchmarks/bench_audit.py                       # trains the small digits CNN inline
    python benchmarks/bench_audit.py --checkpoint runs/x/cure/model.safetensors --n 500

Threads default to 1: on a small shared machine PyTorch's multi-threaded kernels spend most of
their time waiting for each other on models this small.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchattacks
from tabulate import tabulate
from torch import nn

from cure_eval.attacks import ATTACKS, MultiStepPGD, run_suite
from cure_eval.attacks.passes import PassCounter, Passes
from cure_eval.data import get_dataset_spec, load_dataset, select_points
from cure_eval.errors import CureEvalError
from cure_eval.models import NormalizedModel
from cure_eval.testing import small_cnn, train_plain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_if_degenerate, parse_args  # noqa: E402

log = logging.getLogger("bench_audit")

def run_counted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, groups: list[list[str]],
                **kw: Any) -> tuple[dict[str, Any], dict[str, Passes], float]:
    """Run each attack group (an attack alone, or the PGD family: one trajectory) through
    ``run_suite`` inside its own :class:`PassCounter`. Non-cascade suite attacks are independent
    (each runs on the clean-correct points from the same seed), so the per-group results are the
    full suite's. The counts include the clean pass (``n`` forwards, subtracted) and the suite's
    evaluation of the returned points (one forward per attacked point, more for PGD's best
    iterates), which stays in: the table says so."""
    results: dict[str, Any] = {}
    passes: dict[str, Passes] = {}
    seconds = 0.0
    for group in groups:
        with PassCounter(model) as counter:
            res = run_suite(model, x, y, attacks=group, **kw)
        p = counter.passes
        p.forward -= len(x)  # the suite's clean pass
        p.forward_calls -= -(-len(x) // kw["batch_size"])
        key = group[0] if len(group) == 1 else "pgd_family"
        passes[key] = p
        seconds += res.seconds
        results.update(res.attacks)
    return results, passes, seconds


def train_digits_model(seed: int = 0, epochs: int = 15) -> nn.Module:
    """A normally trained digits CNN, trained like the test fixture (Adam 1e-3, batch 64)."""
    torch.manual_seed(seed)
    spec = get_dataset_spec("digits")
    model = NormalizedModel(small_cnn(), spec.mean, spec.std)
    x, y = load_dataset("digits", "train").tensors
    return train_plain(model, x, y, epochs=epochs, seed=seed)


def plain_forward_throughput(model: nn.Module, shape: tuple[int, ...], batch: int,
                             device: torch.device, seconds: float = 1.0, rounds: int = 5) -> list[float]:
    """Inputs per second of ``model`` on random [0, 1] batches of ``batch`` (no grad), per round."""
    xb = torch.rand(batch, *shape, device=device)
    out = []
    with torch.no_grad():
        for _ in range(3):
            model(xb)
        for _ in range(rounds):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                model(xb)
                n += batch
            out.append(n / (time.perf_counter() - start))
    return out


def pgd_family_vs_separate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                           alpha: float, batch_size: int, seed: int, device: torch.device,
                           repeats: int) -> dict[str, Any]:
    """Time MultiStepPGD(7,20,40,100) against four torchattacks.PGD runs on the same batches."""
    steps = (7, 20, 40, 100)
    family_t, separate_t, identical = [], [], True
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        recs = [MultiStepPGD(model, eps=eps, alpha=alpha, steps=steps)(x[s:s + batch_size].to(device),
                                                                        y[s:s + batch_size].to(device))
                for s in range(0, len(x), batch_size)]
        family_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for k in steps:
            torch.manual_seed(seed)
            for j, s in enumerate(range(0, len(x), batch_size)):
                ref = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=k)(
                    x[s:s + batch_size].to(device), y[s:s + batch_size].to(device))
                identical &= bool(torch.equal(ref, recs[j][k]))
        separate_t.append(time.perf_counter() - t0)
    fam, sep = min(family_t), min(separate_t)
    return {"family_s": fam, "separate_s": sep, "ratio": fam / sep if sep else float("nan"),
            "identical": identical}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="cure_eval checkpoint (.safetensors or run folder); "
                    "default: train the small digits CNN inline")
    ap.add_argument("--n", type=int, default=200, help="test points (default 200)")
    ap.add_argument("--eps", type=float, default=None,
                    help="ℓ∞ radius in 1/255 units (default: the dataset's, 32 for digits)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--spsa-iterations", type=int, default=100)
    ap.add_argument("--spsa-max-batch", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--repeats", type=int, default=2, help="repeats of the PGD timing (best of)")
    ap.add_argument("--verbose", action="store_true")
    args = parse_args(ap, argv, tiny={"n": 12, "spsa_iterations": 3, "spsa_max_batch": 256, "repeats": 1})
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model: nn.Module
    try:
        if args.checkpoint:
            from cure_eval.models.checkpoint import load_checkpoint

            model, info = load_checkpoint(args.checkpoint, device=device)
            dataset = info.dataset
            source = f"checkpoint {args.checkpoint} ({info.model.name}, {info.method})"
        else:
            t0 = time.perf_counter()
            model, dataset = train_digits_model(args.seed).to(device), "digits"
            source = f"small digits CNN trained inline ({time.perf_counter() - t0:.1f}s)"
        spec = get_dataset_spec(dataset)
        ds = load_dataset(dataset, "test", data_dir=args.data_dir)
        xt, yt = ds.tensors
        idx = select_points(len(xt), min(args.n, len(xt)), args.seed)
        x, y = xt[idx], yt[idx]
        eps = (args.eps if args.eps is not None else spec.default_eps) / 255
    except CureEvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code

    # plain forward throughput at SPSA's call size: median of rounds before and after the suite
    # (a shared machine's speed drifts during a run)
    plain_before = plain_forward_throughput(model, tuple(x.shape[1:]), args.spsa_max_batch, device)
    groups = [["fgsm"], ["pgd7", "pgd20", "pgd40", "pgd100"], *[[a] for a in ATTACKS if not a.startswith("pgd")
                                                               and a != "fgsm"]]
    attacks, passes, suite_s = run_counted(
        model, x, y, groups, eps=eps, device=device, batch_size=args.batch_size, seed=args.seed,
        spsa_iterations=args.spsa_iterations, spsa_max_batch=args.spsa_max_batch, indices=idx, progress=False)
    with torch.no_grad():
        correct = model(x.to(device)).argmax(1).cpu() == y
    worst = correct.clone()
    for res in attacks.values():
        worst &= res.worst_case_robust
    # a blind counter must fail before anything is reported (benchmarks/_common.py)
    exit_if_degenerate(counts={f"{k} forward passes": p.forward for k, p in passes.items()})

    rows = []
    pgd_att = int(attacks["pgd7"].attacked.sum())
    for name in ATTACKS:
        res = attacks[name]
        att = int(res.attacked.sum())
        acc = f"{res.robust_accuracy:.3f}"
        if name.startswith("pgd"):
            k = int(name[3:])
            rows.append([name, acc, f"{res.seconds:.2f}", att, "(one trajectory, below)",
                         f"{k * att:,} ({k} fwd+bwd/pt)", ""])
            continue
        p = passes[name]
        if name == "fgsm":
            minimum, what, ratio = att, "1 fwd+bwd/pt", p.backward / max(att, 1)
        elif name == "spsa":
            it = int(res.extra["iterations"].sum())
            minimum, what = 128 * it, f"128 fwd × {it / max(att, 1):.1f} it/pt"
            ratio = p.forward / max(minimum, 1)
        else:
            minimum, what, ratio = 0, "n/a (runs to the boundary)", float("nan")
        rows.append([name, acc, f"{res.seconds:.2f}", att, f"{p.forward:,} f / {p.backward:,} b",
                     f"{minimum:,} ({what})" if minimum else what,
                     f"{ratio:.2f}x" if ratio == ratio else ""])
    fam = passes["pgd_family"]
    fam_s = max(attacks[a].seconds for a in ("pgd7", "pgd20", "pgd40", "pgd100"))
    rows.append(["pgd7..100 (one trajectory)", "", f"{fam_s:.2f}", pgd_att,
                 f"{fam.forward:,} f / {fam.backward:,} b",
                 f"{100 * pgd_att:,} (100 fwd+bwd/pt; 167/pt if run separately)",
                 f"{fam.backward / max(100 * pgd_att, 1):.2f}x"])
    print(f"model: {source}; dataset {dataset}; n = {len(x)}; eps = {eps * 255:g}/255; "
          f"seed {args.seed}; threads {args.threads}; device {device}")
    print(f"clean accuracy {float(correct.double().mean()):.3f}; worst case {float(worst.double().mean()):.3f}; "
          f"suite wall time {suite_s:.1f}s")
    print(tabulate(rows, headers=["attack", "robust acc", "seconds", "attacked",
                                  "passes (cure_eval.attacks.passes; incl. evaluation)", "minimum needed",
                                  "used/min"]))
    print("(per-PGD seconds: time until that step count within the shared trajectory; passes include the "
          "suite's evaluation of the returned points, one forward per attacked point)")

    # SPSA throughput vs the plain forward
    spsa_p = passes["spsa"]
    spsa_inputs = spsa_p.forward
    spsa_s = attacks["spsa"].seconds
    spsa_tp = spsa_inputs / spsa_s if spsa_s else float("nan")
    rounds = plain_before + plain_forward_throughput(model, tuple(x.shape[1:]), args.spsa_max_batch, device)
    plain_tp = float(torch.tensor(rounds).median())
    calls = spsa_p.forward_calls
    print(f"SPSA: {spsa_inputs:,} model inputs in {calls:,} calls ({spsa_inputs / max(calls, 1):.0f} per call), "
          f"{spsa_tp:,.0f} inputs/s; plain batched forward ({args.spsa_max_batch}/call, median of "
          f"{len(rounds)} rounds, range {min(rounds):,.0f}-{max(rounds):,.0f}) {plain_tp:,.0f} inputs/s "
          f"-> {spsa_tp / plain_tp:.0%} of plain (target >= 70%)")

    # Fig. 7 sanity: where did SPSA find a stronger point than PGD(100)?
    spsa, pgd100 = attacks["spsa"], attacks["pgd100"]
    both = spsa.attacked
    print(f"SPSA vs PGD(100) on {int(both.sum())} attacked points: SPSA lower margin on "
          f"{int((spsa.margin[both] < pgd100.margin[both]).sum())}, SPSA-only successes "
          f"{int((spsa.success & ~pgd100.success).sum())}, PGD(100)-only successes "
          f"{int((pgd100.success & ~spsa.success).sum())}")

    ok = correct
    t = pgd_family_vs_separate(model, x[ok], y[ok], eps=eps, alpha=2 / 255, batch_size=args.batch_size,
                               seed=args.seed, device=device, repeats=args.repeats)
    print(f"PGD(7/20/40/100) on {int(ok.sum())} points: one MultiStepPGD trajectory {t['family_s']:.2f}s vs "
          f"four torchattacks.PGD runs {t['separate_s']:.2f}s -> {t['ratio']:.2f}x (target <= 0.65x); "
          f"results identical: {t['identical']}")

    t0 = time.perf_counter()
    casc = run_suite(model, x, y, eps=eps, device=device, attacks=ATTACKS, batch_size=args.batch_size,
                     seed=args.seed, spsa_iterations=args.spsa_iterations,
                     spsa_max_batch=args.spsa_max_batch, indices=idx, progress=False, cascade=True)
    print(f"cascade: worst case {casc.worst_case_accuracy:.3f} (full suite {float(worst.double().mean()):.3f}) "
          f"in {time.perf_counter() - t0:.1f}s (full suite {suite_s:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
