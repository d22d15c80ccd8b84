"""Masking probes that run the model: input gradients, randomised forward passes, probability
outputs and random noise, each giving a :class:`Finding` (or the per-point mask a check reads).
Model in eval mode on its device; the caller's modes restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..core.device import seeded_rng
from ..core.modes import check_device, eval_mode
from ..errors import UsageError
from .findings import (
    GRADIENTS_FAIL,
    NOISE_DRAWS,
    PROBABILITY_ATOL,
    PROBABILITY_FAIL,
    RANDOM_FORWARD_FAIL,
    RANDOM_FORWARD_PASSES,
    Finding,
    pct,
    status_of,
)


@contextmanager
def _model_on(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Model on ``device`` in eval mode; the caller's train/eval modes restored afterwards."""
    check_device(model, device)
    with eval_mode(model):
        yield model

def _logits(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            out.append(model(x[s:s + batch_size].to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)

def check_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device | str,
    eps: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
    threshold: float = GRADIENTS_FAIL,
) -> Finding:
    """Zero, NaN or infinite input gradients of the cross-entropy, per point.

    The gradient of the per-point cross-entropy (the loss PGD and FGSM follow) is taken at the
    clean input and, if ``eps`` is given, at one uniform random point of the ε-ball. A point is
    *unavailable* when either gradient is all zeros or contains NaN/inf; if the model's output is
    not connected to its input at all (``.detach()``, numpy inside), every point is. ``value``:
    share of the given points that are unavailable (pass the attacked points). FAIL above
    ``threshold``; WARN on any.

    Zero gradients can be honest: a softmax saturated beyond float32 (margin > ~104 logits)
    gives an exact 0 — a real obstacle for cross-entropy attacks all the same.
    """
    dev = torch.device(device)
    n = len(x)
    zero = torch.zeros(n, dtype=torch.bool)
    nonfinite = torch.zeros(n, dtype=torch.bool)
    broken = ""
    with _model_on(model, dev), seeded_rng(seed, dev), torch.enable_grad():
        for s in range(0, n, batch_size):
            xb = x[s:s + batch_size].detach().to(dev)
            yb = y[s:s + batch_size].to(dev)
            starts = [xb]
            if eps is not None:
                starts.append(torch.clamp(xb + torch.empty_like(xb).uniform_(-eps, eps), 0, 1))
            for xs in starts:
                xs = xs.clone().requires_grad_(True)
                out = model(xs)
                if not out.requires_grad:  # output not connected to the input
                    broken = "the model's output does not require grad (detach, no_grad or numpy inside)"
                    zero[s:s + len(xb)] = True
                    continue
                loss = F.cross_entropy(out, yb, reduction="sum")
                (g,) = torch.autograd.grad(loss, xs, allow_unused=True)
                if g is None:  # the loss depends on parameters only, not on the input
                    broken = "the output does not depend on the input in the autograd graph"
                    zero[s:s + len(xb)] = True
                    continue
                g = g.detach().flatten(1).cpu()
                zero[s:s + len(xb)] |= (g == 0).all(dim=1)
                nonfinite[s:s + len(xb)] |= ~torch.isfinite(g).all(dim=1)
    bad = zero | nonfinite
    value = float(bad.double().mean()) if n else float("nan")
    status = status_of(value, threshold, warn=bool(bad.any()), count=int(bad.sum()))
    what = "graph broken" if broken else f"{int(zero.sum())} zero, {int(nonfinite.sum())} NaN/inf"
    message = f"input gradient of the cross-entropy unavailable on {pct(value)} of the points ({what})"
    message += {"FAIL": ": gradient attacks cannot move, robustness under them means nothing",
                "WARN": ": a few points (e.g. a softmax saturated beyond float32)",
                "PASS": ": gradients are usable"}[status]
    return Finding("gradients", status, value, threshold, message,
                   {"zero": int(zero.sum()), "nonfinite": int(nonfinite.sum()), "points": n,
                    "graph_broken": broken or None, "random_point_too": eps is not None})

def check_randomised_forward(
    model: nn.Module,
    x: torch.Tensor,
    *,
    device: torch.device | str,
    passes: int = RANDOM_FORWARD_PASSES,
    batch_size: int = 256,
    threshold: float = RANDOM_FORWARD_FAIL,
) -> Finding:
    """The same input must give the same logits: ``passes`` forward passes in eval mode.

    AutoAttack's check (logits differing by more than 1e-4 across passes mean a randomised
    defence, which needs EOT-style attacks). ``value``: the largest absolute logit difference
    between passes divided by ``max(1, max |logit|)`` — AutoAttack's absolute 1e-4 for ordinary
    logits, but float round-off of logits ×10⁴ (non-deterministic GPU kernels) does not trip it.
    Batches are identical in every pass. FAIL above ``threshold``.
    """
    if passes < 2:
        raise UsageError(f"randomised-forward check needs >= 2 passes, got {passes}")
    dev = torch.device(device)
    with _model_on(model, dev):
        outs = torch.stack([_logits(model, x, dev, batch_size) for _ in range(passes)])
    spread = (outs.amax(dim=0) - outs.amin(dim=0)).flatten(1).amax(dim=1)  # per point
    scale = max(1.0, float(outs.abs().max())) if outs.numel() else 1.0
    value = float(spread.max()) / scale if len(spread) else float("nan")
    differ = spread / scale > threshold
    flips = (outs.argmax(dim=2) != outs[0].argmax(dim=1)[None]).any(dim=0)
    status = status_of(value, threshold, warn=False)
    message = (f"{passes} passes on the same input: logits differ by up to {value:.3g} "
               f"(relative), on {pct(float(differ.double().mean()))} of the points, "
               f"prediction flips on {pct(float(flips.double().mean()))}")
    message += (": randomised model, gradients are noisy; attack it with EOT" if status == "FAIL"
                else ": deterministic")
    return Finding("randomised_forward", status, value, threshold, message,
                   {"points_differing": int(differ.sum()), "prediction_flips": int(flips.sum()),
                    "passes": passes, "logit_scale": scale, "max_abs_difference": float(spread.max())
                    if len(spread) else float("nan")})

def check_probability_outputs(
    model: nn.Module,
    x: torch.Tensor,
    *,
    device: torch.device | str,
    batch_size: int = 256,
    atol: float = PROBABILITY_ATOL,
    threshold: float = PROBABILITY_FAIL,
) -> Finding:
    """The model must return logits, not probabilities (AutoAttack's check).

    A row "looks like probabilities" when it is non-negative and sums to 1 within ``atol``.
    Cross-entropy of softmax(probabilities) is nearly flat, so PGD and FGSM get weak gradients,
    and the margins of Fig. 7 lose their meaning. ``value``: share of rows that look like
    probabilities. FAIL above ``threshold`` (a logit model essentially never gives such rows).
    """
    dev = torch.device(device)
    with _model_on(model, dev):
        out = _logits(model, x, dev, batch_size).double()
    probs = (out >= 0).all(dim=1) & ((out.sum(dim=1) - 1).abs() <= atol)
    value = float(probs.double().mean()) if len(out) else float("nan")
    status = status_of(value, threshold, warn=bool(probs.any()))
    message = f"{pct(value)} of the output rows are non-negative and sum to 1"
    message += {"FAIL": ": the model returns probabilities; remove the softmax, attacks need logits",
                "WARN": ": a few rows by coincidence; outputs are logits",
                "PASS": ": outputs are logits"}[status]
    return Finding("probability_outputs", status, value, threshold, message,
                   {"probability_rows": int(probs.sum()), "points": len(out), "atol": atol})

def random_noise_fooled(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    device: torch.device | str,
    draws: int = NOISE_DRAWS,
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Per point: is any of ``draws`` uniform draws ``clip(x + U(-ε, ε), 0, 1)`` misclassified?

    Draws come from a CPU generator seeded with ``seed`` (same noise on any device); points are
    processed ``max(1, 4·batch_size // draws)`` at a time, all their draws in one model call.
    """
    if draws < 1:
        raise UsageError(f"noise draws must be >= 1, got {draws}")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    fooled = torch.zeros(n, dtype=torch.bool)
    per = max(1, (4 * batch_size) // draws)
    with _model_on(model, dev), torch.no_grad():
        for s in range(0, n, per):
            xb = x[s:s + per].detach().cpu()
            noise = (torch.rand((len(xb), draws, *xb.shape[1:]), generator=gen) * 2 - 1) * eps
            xn = torch.clamp(xb[:, None] + noise, 0, 1).flatten(0, 1)
            pred = torch.cat([model(xn[i:i + 4 * batch_size].to(dev)).argmax(dim=1).cpu()
                              for i in range(0, len(xn), 4 * batch_size)])
            fooled[s:s + len(xb)] = (pred.view(len(xb), draws) != y[s:s + per, None].cpu()).any(dim=1)
    return fooled
