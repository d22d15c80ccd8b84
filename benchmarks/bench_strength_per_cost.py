"""Strength per cost: candidate attack cascades against AutoAttack ``standard``, in passes.

For one model and one set of points, each candidate suite runs as a cascade (each attack only on
the points still robust after the earlier ones, always from the clean input), every attack inside
its own :class:`cure_eval.attacks.passes.PassCounter`; AutoAttack ``standard`` (the authors'
``pyautoattack``, through :func:`cure_eval.attacks.run_autoattack`) runs on the same points,
counted the same way. Printed side by side: worst-case robust accuracy, the per-point
disagreement with AutoAttack (broken by AutoAttack and not by the suite, and the reverse),
forward and backward passes (samples; per clean-correct point) and seconds.

A point counts as broken by an attack when the model misclassifies the returned point, or the
run's best point where the attack returns one (PGD's first misclassified iterate); the points are
checked to lie in the ε-ball ∩ [0, 1]. The passes of each attack are its own (its ``run``) plus
one forward per attacked point to evaluate what it returned.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_strength_per_cost.py --tiny      # < 1 min, asserts
    OMP_NUM_THREADS=1 python benchmarks/bench_strength_per_cost.py --n 100     # the docs' table
    OMP_NUM_THREADS=1 python benchmarks/bench_strength_per_cost.py --checkpoint runs/x/cure --n 360
    python benchmarks/bench_strength_per_cost.py --autoattack-cifar --eps 2 --threads 2 --only default

Without ``--checkpoint`` it trains the small digits CNN inline, as the tests do. ε defaults to
the dataset's (32/255 on digits). ``--autoattack-cifar`` evaluates AutoAttack's own example
model instead: the CIFAR-10 ResNet-18 that ``pyautoattack`` ships (``examples/model_test.pt``,
inputs in [0, 1], loaded with ``weights_only=True``) on foolbox's 20 real CIFAR-10 test images
(``foolbox/data/cifar10_*.png``), nothing downloaded. ``--only default`` runs the audit's default
suite alone. ``--autoattack-cache FILE`` keeps AutoAttack's per-point result and counts in a JSON
file keyed by a hash of the weights, the points, ε, seed, batch size and library versions, and
reuses it when the key matches (AutoAttack is about 70 % of a 360-point run's time; a rerun of the
candidates on the same model then takes minutes). Exits 1 when a figure is degenerate (a zero count for an attack
that attacked points, a NaN ratio) or a returned point leaves the ε-ball.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from tabulate import tabulate
from torch import nn

from cure_eval.attacks import AttackConfig, AttackContext, get_attack, run_autoattack
from cure_eval.attacks.apgd import APGDConfig
from cure_eval.attacks.apgd_t import APGDTConfig
from cure_eval.attacks.passes import PassCounter, Passes
from cure_eval.attacks.pgd import PGDConfig
from cure_eval.attacks.spsa import SPSAConfig
from cure_eval.attacks.square import SquareConfig
from cure_eval.data import get_dataset_spec, load_dataset, select_points
from cure_eval.models import NormalizedModel
from cure_eval.testing import small_cnn, train_plain

EPS_TOL = 1e-5


@dataclass
class Step:
    """One attack of a cascade: a label, the registered name and its config."""

    label: str
    name: str
    config: AttackConfig | None = None


@dataclass
class Outcome:
    label: str
    robust: torch.Tensor  # after the whole cascade, over all points
    passes: Passes = field(default_factory=Passes)
    seconds: float = 0.0
    per_attack: list[tuple[str, int, int, Passes, float]] = field(default_factory=list)


def pgd(k: int, eps: float) -> Step:
    """PGD(k) with step 2.5·ε/k (Madry et al.: the budget reaches the ball's boundary)."""
    return Step(f"PGD({k})", f"pgd{k}", PGDConfig(alpha=2.5 * eps / k))


def apgd_t(k: int, ranking: str) -> Step:
    return Step(f"APGD-T({ranking},{k})", "apgd-t", APGDTConfig(targets=k, ranking=ranking))  # type: ignore[arg-type]


def square(q: int) -> Step:
    return Step(f"Square({q})", "square", SquareConfig(queries=q))


#: The audit's default settings, read from the library (not restated here): APGD-CE's random
#: starts, APGD-T's targets, Square's queries.
CE_RESTARTS, K_DEFAULT, SQ_DEFAULT = APGDConfig().restarts, APGDTConfig().targets, SquareConfig().queries


def _ce_label(restarts: int) -> str:
    return "CE" if restarts == 1 else f"CE({restarts}r)"


#: The audit's DEFAULT_ATTACKS as a cascade, labelled with its settings.
DEFAULT_SUITE = f"FGSM>PGD(20)>{_ce_label(CE_RESTARTS)}>T(malt,{K_DEFAULT})>Sq({SQ_DEFAULT})"


def candidate_suites(eps: float, *, tiny: bool) -> dict[str, list[Step]]:
    # "CE" is AutoAttack's APGD-CE, one random start, whatever the library's default
    ce = Step("APGD-CE", "apgd-ce", APGDConfig(restarts=1))
    dlr = Step("APGD-DLR", "apgd-dlr", APGDConfig(restarts=1))
    head = [Step("FGSM", "fgsm"), pgd(20, eps)]  # the default's cheap head
    if tiny:
        return {
            "FGSM>PGD(20)": head,
            "CE>T(malt,3)>Sq(100)": [ce, apgd_t(3, "malt"), square(100)],
        }
    suites: dict[str, list[Step]] = {
        "FGSM>PGD(20)": head,
        "APGD-CE": [ce],
        "CE>DLR": [ce, dlr],
    }
    for k in (1, 2, 3, 5, 9):
        for ranking in ("logit", "malt"):
            suites[f"CE>T({ranking},{k})"] = [ce, apgd_t(k, ranking)]
    for q in (100, 300, 1000, 5000):
        suites[f"CE>T(malt,3)>Sq({q})"] = [ce, apgd_t(3, "malt"), square(q)]
    # The full cascades: (APGD-CE starts, APGD-T targets, Square queries). The defaults of
    # 2026-12-05 (1, 3, 1000) and 2026-12-06 (1, 5, 1000), kept for the comparison; a second
    # random start for APGD-CE (the points AutoAttack's APGD-CE breaks with a luckier start: its
    # batches are not the cascade's), with smaller Square budgets to pay for it (the default since
    # 2026-12-06: two starts, Square(750); Square(500) was too weak on the shattered CNN).
    for r, k, q in sorted({(1, 3, 1000), (1, 5, 1000), (1, 5, 500), (2, 5, 500), (2, 5, 750), (2, 5, 1000),
                           (CE_RESTARTS, K_DEFAULT, SQ_DEFAULT)}):
        ce_r = ce if r == 1 else Step(f"APGD-CE({r} restarts)", "apgd-ce", APGDConfig(restarts=r))
        suites[f"FGSM>PGD(20)>{_ce_label(r)}>T(malt,{k})>Sq({q})"] = [*head, ce_r, apgd_t(k, "malt"), square(q)]
    suites["CE>SPSA(100it)"] = [ce, Step("SPSA", "spsa", SPSAConfig())]
    for q in (100, 300, 500, 750, 1000, 5000):
        suites[f"CE>Sq({q})"] = [ce, square(q)]
    return suites


def _check_ball(x: torch.Tensor, x_adv: torch.Tensor, eps: float, label: str) -> None:
    d = (x_adv - x).flatten(1).abs().amax(1) if len(x) else torch.zeros(0)
    if len(x) and (float(d.max()) > eps + EPS_TOL or float(x_adv.min()) < -EPS_TOL or float(x_adv.max()) > 1 + EPS_TOL):
        raise SystemExit(f"FAIL: {label} returned a point outside the ε-ball ∩ [0, 1]")


def run_cascade(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, steps: list[Step], *,
                eps: float, seed: int, batch_size: int, label: str) -> Outcome:
    ctx = AttackContext(model=model, device=torch.device("cpu"), batch_size=batch_size, progress=False, eps=eps,
                        eps_l2=eps, seed=seed)
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    out = Outcome(label, robust)
    for step in steps:
        idx = robust.nonzero().flatten()
        if not len(idx):
            out.per_attack.append((step.label, 0, 0, Passes(), 0.0))
            continue
        cls = get_attack(step.name)
        attack = cls(step.config)
        start = time.perf_counter()
        with PassCounter(model) as counter, torch.enable_grad():
            o = attack.run(ctx, x[idx], y[idx], ids[idx])
            mine = idx if o.attacked is None else idx[o.attacked]
            _check_ball(x[mine], o.x_adv, eps, step.label)
            with torch.no_grad():
                fooled = model(o.x_adv).argmax(1) != y[mine]
                if o.x_best is not None:
                    _check_ball(x[mine], o.x_best, eps, step.label)
                    fooled |= model(o.x_best).argmax(1) != y[mine]
        secs = time.perf_counter() - start
        robust = robust.clone()
        robust[mine[fooled]] = False
        out.passes = out.passes + counter.passes
        out.seconds += secs
        out.per_attack.append((step.label, len(mine), int(fooled.sum()), counter.passes, secs))
    out.robust = robust
    return out


def autoattack_key(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, seed: int,
                   batch_size: int) -> str:
    """What AutoAttack's result depends on: the weights, the points, ε, seed, batch size, versions."""
    import pyautoattack

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for t in (x, y):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    versions = f"torch {torch.__version__}, pyautoattack {getattr(pyautoattack, '__version__', '?')}"
    h.update(f"{eps!r} {seed} {batch_size} {versions}".encode())
    return h.hexdigest()


def load_autoattack_cache(path: str, key: str) -> Outcome | None:
    """The cached AutoAttack outcome if ``path`` holds one for ``key``, else None."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if state.get("key") != key:
            print(f"{path}: another model, points or settings; AutoAttack runs again", file=sys.stderr)
            return None
        out = Outcome("AutoAttack standard", torch.tensor(state["robust"], dtype=torch.bool),
                      Passes(state["forward"], state["backward"]), state["seconds"])
        out.per_attack = [(s, 0, b, Passes(), sec) for s, b, sec in state["per_attack"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"{path}: not an AutoAttack cache of this benchmark ({type(e).__name__}); AutoAttack runs again "
              "and overwrites it", file=sys.stderr)
        return None
    return out


def save_autoattack_cache(path: str, key: str, aa: Outcome) -> None:
    state = {"key": key, "robust": aa.robust.tolist(), "forward": aa.passes.forward, "backward": aa.passes.backward,
             "seconds": aa.seconds, "per_attack": [[s, b, sec] for s, _a, b, _p, sec in aa.per_attack]}
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
    os.replace(tmp, path)  # atomic: an interrupted write leaves the old cache or none


def autoattack_cifar() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """pyautoattack's example CIFAR-10 ResNet-18 and foolbox's 20 CIFAR-10 test images (in [0, 1])."""
    from pathlib import Path

    import foolbox
    import numpy as np
    import pyautoattack
    from PIL import Image
    from pyautoattack.examples.resnet import ResNet18

    model = ResNet18()
    weights = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))  # tensors only, no pickle code
    files = sorted((Path(foolbox.__file__).parent / "data").glob("cifar10_*.png"))  # cifar10_<index>_<label>.png
    x = torch.stack([torch.tensor(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]).float() / 255
    y = torch.tensor([int(f.stem.split("_")[2]) for f in files])
    return model, x, y


def train_digits_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    spec = get_dataset_spec("digits")
    model = NormalizedModel(small_cnn(), spec.mean, spec.std)
    xt, yt = load_dataset("digits", "train").tensors
    return train_plain(model, xt, yt, epochs=15, seed=seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="cure_eval checkpoint (file or run folder); default: the digits CNN")
    ap.add_argument("--autoattack-cifar", action="store_true", help="pyautoattack's example CIFAR-10 ResNet-18 on "
                    "foolbox's 20 CIFAR-10 test images (give --eps, e.g. 1 or 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--n", type=int, default=100, help="test points (default 100)")
    ap.add_argument("--eps", type=float, default=None, help="ℓ∞ radius in 1/255 units (default: the dataset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--tiny", action="store_true", help="20 points, two suites, Square(100): under a minute")
    ap.add_argument("--no-autoattack", action="store_true", help="skip AutoAttack (no disagreement columns)")
    ap.add_argument("--autoattack-cache", default="", metavar="FILE",
                    help="JSON file for AutoAttack's result: reused when weights, points and settings match")
    ap.add_argument("--only", default="", help="';'-separated suite labels to run (labels contain commas; "
                    f"'default' is {DEFAULT_SUITE}; default: all)")
    ap.add_argument("--mask", choices=("none", "shattered", "vanishing", "stochastic"), default="none",
                    help="wrap the model in a masking wrapper of cure_eval.testing (default: none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data: tuple[torch.Tensor, torch.Tensor] | None = None
    if args.autoattack_cifar:
        model, xc, yc = autoattack_cifar()
        dataset, source, data = "cifar10", "pyautoattack examples/model_test.pt (ResNet-18), foolbox's CIFAR-10 images", (xc, yc)
    elif args.checkpoint:
        from cure_eval.models.checkpoint import load_checkpoint

        model, info = load_checkpoint(args.checkpoint)
        dataset, source = info.dataset, f"{args.checkpoint} ({info.method})"
    else:
        model, dataset, source = train_digits_model(args.seed), "digits", "small digits CNN trained inline"
    if args.mask != "none":
        from cure_eval.testing import NoisyInput, QuantizedInput, SaturatedLogits

        wrap = {"shattered": lambda m: QuantizedInput(m, levels=8), "vanishing": lambda m: SaturatedLogits(m, scale=1e4),
                "stochastic": lambda m: NoisyInput(m, sigma=0.1)}[args.mask]
        model, source = wrap(model), f"{source}, {args.mask} (cure_eval.testing wrapper)"
    model = model.eval()
    n = 20 if args.tiny else args.n
    if data is None:
        test = load_dataset(dataset, "test")
        idx = select_points(len(test), min(n, len(test)), args.seed)
        x, y = test.tensors[0][idx], test.tensors[1][idx]
    else:
        x, y = data[0][:n], data[1][:n]
        idx = torch.arange(len(x))
    eps = (args.eps if args.eps is not None else get_dataset_spec(dataset).default_eps) / 255
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    n_ok = int(correct.sum())

    suites = candidate_suites(eps, tiny=args.tiny)
    if args.only:
        wanted = [DEFAULT_SUITE if s.strip() == "default" else s.strip() for s in args.only.split(";") if s.strip()]
        unknown = sorted(set(wanted) - set(suites))
        if unknown:
            print(f"error: unknown suite {', '.join(unknown)}: choose from {'; '.join(suites)}", file=sys.stderr)
            return 2
        suites = {k: v for k, v in suites.items() if k in wanted}
    outcomes = []
    for lab, steps in suites.items():  # a line on stderr per suite: a long run that is cut short still tells
        outcomes.append(run_cascade(model, x, y, idx, steps, eps=eps, seed=args.seed, batch_size=args.batch_size,
                                    label=lab))
        o = outcomes[-1]
        print(f"done {lab}: robust {int(o.robust.sum())}/{len(x)}, f {o.passes.forward:,} b {o.passes.backward:,}, "
              f"{o.seconds:.0f}s", file=sys.stderr, flush=True)
    aa: Outcome | None = None
    if not args.no_autoattack:
        # the key hashes every weight: only when there is a cache to look in or write
        key = autoattack_key(model, x, y, eps=eps, seed=args.seed, batch_size=args.batch_size) \
            if args.autoattack_cache else ""
        aa = load_autoattack_cache(args.autoattack_cache, key) if args.autoattack_cache else None
        if aa is not None:
            print(f"AutoAttack: reused {args.autoattack_cache} (its seconds are those of the run that wrote it)",
                  file=sys.stderr)
        else:
            start = time.perf_counter()
            with PassCounter(model) as counter:
                run = run_autoattack(model, x, y, eps=eps, device="cpu", version="standard", seed=args.seed,
                                     batch_size=args.batch_size)
            aa = Outcome("AutoAttack standard", run.robust(y) & correct, counter.passes, time.perf_counter() - start)
            aa.per_attack = [(s, 0, int((run.broken_by == k).sum()), Passes(), run.seconds.get(s, 0.0))
                             for k, s in enumerate(run.sub_attacks)]
            if args.autoattack_cache:
                save_autoattack_cache(args.autoattack_cache, key, aa)

    bad: list[str] = []
    rows = []
    aa_fb = aa.passes.total if aa is not None else float("nan")
    for o in [*outcomes, *([aa] if aa is not None else [])]:
        acc = float(o.robust.double().mean())
        aa_only = suite_only = float("nan")
        if aa is not None and o is not aa:
            aa_only = int((o.robust & ~aa.robust).sum())
            suite_only = int((~o.robust & aa.robust & correct).sum())
        ratio = o.passes.total / aa_fb if aa is not None else float("nan")
        rows.append([o.label, f"{100 * acc:.1f}", aa_only, suite_only, f"{o.passes.forward / max(n_ok, 1):,.0f}",
                     f"{o.passes.backward / max(n_ok, 1):,.0f}", f"{ratio:.3f}", f"{o.seconds:.1f}"])
        for lab, attacked, _broke, p, _s in o.per_attack:
            if attacked and p.forward <= 0:
                bad.append(f"{o.label}/{lab}: zero forward passes on {attacked} points")
        if o.passes.forward <= 0 or (aa is not None and math.isnan(ratio)):
            bad.append(f"{o.label}: degenerate figures (forward {o.passes.forward}, ratio {ratio})")
    print(f"model: {source}; dataset {dataset}; n = {len(x)} (clean-correct {n_ok}); eps = {eps * 255:g}/255; "
          f"seed {args.seed}; {args.threads} thread(s); setup {time.perf_counter() - t0:.0f}s total")
    print(tabulate(rows, headers=["suite (cascade)", "worst-case acc %", "AA breaks, suite not",
                                  "suite breaks, AA not", "fwd / pt", "bwd / pt", "(f+b) / AA's", "seconds"]))
    print("\nper attack (attacked points, broken, forward, backward, seconds):")
    for o in outcomes:
        print(f"  {o.label}: " + "; ".join(f"{lab} {a}/{b} f{p.forward:,} b{p.backward:,} {s:.1f}s"
                                            for lab, a, b, p, s in o.per_attack))
    if aa is not None:
        print("  AutoAttack broke per sub-attack: " + ", ".join(f"{lab} {b} ({s:.1f}s)"
                                                              for lab, _a, b, _p, s in aa.per_attack))
    if bad:
        print("FAIL: " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
