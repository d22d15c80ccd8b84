"""Cost of one optimiser step, side by side in one run, as ratios to a plain training step.

    python benchmarks/bench_cure_step.py [--model cifar_resnet18] [--batch 32] [--rounds 3]
    python benchmarks/bench_cure_step.py --tiny   # batch 2, 1 round: a check that it runs, seconds

Steps timed (CIFAR-size input, CPU unless --device says otherwise):
* plain      cross-entropy forward/backward/step
* cure       our CURE step as configured by default (cure_eval.training.cure.cure_terms, bn_mode="eval":
             running-statistics BatchNorm in the regulariser passes as in the reference code,
             3 forwards, nothing computed twice)
* cure_train our CURE step with bn_mode="train" (batch statistics; the loss forward is shared
             with ∇ℓ(x): 2 forwards)
* reference  a CURE step structured like the reference code (F-Salehi/CURE_robustness): a
             train-mode forward for the loss, two eval-mode forwards (one unused) and a backward
             to find z, eval-mode forwards at x + hz and x with create_graph, then the backward.
             Written here only for comparison.
* pgd10_at   a PGD(10) adversarial-training step (torchattacks.PGD + the training step)
The steps are interleaved round by round so that machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchattacks
from tabulate import tabulate
from torch import nn

import cure_eval  # noqa: F401  (registers the models)
from cure_eval.data import get_dataset_spec
from cure_eval.models import create_model, model_config_for
from cure_eval.training.cure import cure_terms, pixel_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_if_degenerate, parse_args  # noqa: E402


def reference_structured_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, h: float, gamma: float) -> None:
    """Mirrors CURE.py's per-step structure (five forwards), ported to current PyTorch."""
    model.train()
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)  # forward 1 (train mode)
    # _find_z: eval-mode forwards, one of them unused, and a backward
    model.eval()
    x_ = x.detach().requires_grad_(True)
    _unused = model(x_)  # forward 2 (unused, as in the reference)
    loss_z = F.cross_entropy(model(x_), y, reduction="none")  # forward 3
    g = torch.autograd.grad(loss_z.sum(), x_)[0]
    z = torch.sign(g).detach()
    z = z / z.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    # regulariser: eval-mode forwards at x + hz and x, create_graph
    xp = (x + h * z).detach().requires_grad_(True)
    xo = x.detach().requires_grad_(True)
    lp = F.cross_entropy(model(xp), y, reduction="none")  # forward 4
    lo = F.cross_entropy(model(xo), y, reduction="none")  # forward 5
    gp = torch.autograd.grad(lp.sum(), xp, create_graph=True)[0]
    go = torch.autograd.grad(lo.sum(), xo, create_graph=True)[0]
    reg = (gp - go).flatten(1).norm(dim=1)
    model.train()
    (loss + gamma * reg.mean()).backward()
    opt.step()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parse_args(ap, argv, tiny={"batch": 2, "rounds": 1})
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = get_dataset_spec("cifar10")
    torch.manual_seed(0)
    model = create_model(model_config_for(args.model, spec)).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(args.batch, *spec.input_shape, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    # h = 3 in the normalised units cure_terms takes (the reference's); its pixel-space length for
    # the reference structure, which differentiates w.r.t. the [0, 1] image
    h_norm, gamma, eps = 3.0, 4.0, 8 / 255
    h = pixel_step(model, h_norm)
    pgd = torchattacks.PGD(model, eps=eps, alpha=2 / 255, steps=10, random_start=True)

    def plain() -> None:
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def cure(bn_mode: str) -> Callable[[], None]:
        def step() -> None:
            model.train()
            t = cure_terms(model, x, y, h=h_norm, bn_mode=bn_mode)  # type: ignore[arg-type]
            opt.zero_grad()
            (t.loss + gamma * t.reg).backward()
            opt.step()
        return step

    def pgd_at() -> None:
        adv = pgd(x, y)
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(adv), y).backward()
        opt.step()

    steps: dict[str, Callable[[], None]] = {
        "plain": plain, "cure": cure("eval"), "cure_train": cure("train"),
        "reference": lambda: reference_structured_step(model, opt, x, y, h, gamma), "pgd10_at": pgd_at,
    }
    for fn in steps.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    exit_if_degenerate(times={f"{k} step": v for k, v in med.items()})
    exit_if_degenerate(ratios={f"{k} / plain": v / med["plain"] for k, v in med.items()})
    rows = [[k, f"{med[k]:.3f}", f"{med[k] / med['plain']:.2f}×"] for k in steps]
    print(f"model {args.model}, batch {args.batch}, {spec.input_shape}, device {device}, "
          f"threads {torch.get_num_threads()}, median of {args.rounds} rounds")
    print(tabulate(rows, headers=["step", "seconds", "vs plain"], tablefmt="github"))
    for name in ("cure", "cure_train"):
        print(f"{name}: reference-structured / ours {med['reference'] / med[name]:.2f}× (target ≥ 1.35×); "
              f"ours / plain {med[name] / med['plain']:.2f}× (target ≤ 4.5×)")


if __name__ == "__main__":
    main()
