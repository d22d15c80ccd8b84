"""Flatness in weight space: Hutchinson traces, the Weight-Curvature Index, AWP-style curves.

* :func:`hutchinson_trace` — ``Tr ∇²_{W_k} L`` for every conv/linear weight tensor ``W_k`` by
  Hutchinson's estimator with Rademacher probes (as PyHessian does): ``Tr A = E[zᵀAz]``. One
  probe ``z`` covers all tensors at once; ``E[z_kᵀ(Hz)_k] = Tr H_kk`` because the off-diagonal
  blocks average out. Products ``Hz`` by double backpropagation.
* :func:`weight_curvature_index` — WCI (arXiv:2410.07719, 2024, seed 004; only the abstract is
  available, docs/references.md §8). The formula used here is::

      WCI = Σ_k ||W_k||_F · sqrt(max(0, T̂_k)),   T̂_k ≈ Tr ∇²_{W_k} L_adv(W)

  over conv/linear weight tensors (biases and normalisation parameters excluded), where
  ``L_adv`` is the *mean* cross-entropy over the batch at PGD adversarial points (ℓ∞, computed
  once with ``torchattacks.PGD`` against the unperturbed model and then held fixed) and ``T̂_k``
  the Hutchinson estimate. The true trace of a non-convex loss can be negative, and so can a
  noisy estimate; negative estimates are clamped at 0 (the layer contributes nothing) and
  reported (``clamped``). Units: ``||W||_F`` in weight units, trace in loss per weight unit²,
  so WCI is in sqrt(loss) — comparable between models of the same architecture and batch.
* :func:`weight_loss_curve` — the loss at ``w + α d`` for one filter-normalised random direction
  ``d`` (Li et al. 2018, as AWP's landscape figure, seed 002): for every conv/linear weight,
  ``d`` is Gaussian and each filter (slice along the output dimension) is rescaled to the norm
  of the matching filter of ``W``; biases and BatchNorm parameters get ``d = 0``. Deterministic
  given ``seed``; the weights are restored bit-exactly afterwards.

Everything runs in eval mode (BatchNorm running statistics, no dropout); the caller's mode is
restored.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..attacks.pgd import MultiStepPGD
from ..core.device import seeded_rng
from ..errors import NotApplicable, UsageError
from ._util import check_batch, check_device, eval_mode, generator

log = logging.getLogger(__name__)

_WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

#: default α grid of :func:`weight_loss_curve`: −1, −0.9, …, 1
DEFAULT_ALPHAS: tuple[float, ...] = tuple(i / 10 for i in range(-10, 11))


def conv_linear_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, weight)`` of every conv/linear layer (subclasses included), in module order."""
    out: list[tuple[str, nn.Parameter]] = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, _WEIGHT_MODULES) and isinstance(w, nn.Parameter):
            out.append((f"{name}.weight" if name else "weight", w))
    return out


def _rademacher(shapes: Sequence[torch.Size], seed: int, probe: int, device: torch.device,
                dtype: torch.dtype) -> list[torch.Tensor]:
    gen = generator(seed * 1_000_003 + probe)
    return [(torch.randint(0, 2, tuple(s), generator=gen, dtype=torch.int8) * 2 - 1)
            .to(device=device, dtype=dtype) for s in shapes]


def _add_chunk(
    samples: torch.Tensor,
    model: nn.Module,
    xb: torch.Tensor,
    yb: torch.Tensor,
    tensors: list[nn.Parameter],
    *,
    n: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    seed: int,
    dev: torch.device,
    bar: Any,
) -> None:
    """Add one chunk's share of ``zᵀ ∇²L z`` for every probe ``j`` (row ``j`` of ``samples``) and
    weight tensor (column), by double backward; probes are regenerated from ``(seed, j)``."""
    shapes = [p.shape for p in tensors]
    with torch.enable_grad():
        loss = loss_fn(model(xb), yb).sum() / n
        grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        for j in range(len(samples)):
            z = _rademacher(shapes, seed, j, dev, tensors[0].dtype)
            if live:
                hz = torch.autograd.grad([grads[i] for i in live], [tensors[i] for i in live],
                                         grad_outputs=[z[i] for i in live],
                                         retain_graph=True, allow_unused=True)
                for i, hzi in zip(live, hz, strict=True):
                    if hzi is not None:
                        samples[j, i] += float((z[i] * hzi).sum())
            bar.update(1)
    del grads, loss


def hutchinson_trace(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device | str,
    n_probes: int = 100,
    seed: int = 0,
    chunk_size: int = 256,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    params: Sequence[tuple[str, nn.Parameter]] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Hutchinson estimates of ``Tr ∇²_{W_k} L`` per weight tensor, ``L`` the mean loss on (x, y).

    Args:
        model: the network (eval mode during the measurement; caller's mode restored).
        x, y: the batch defining ``L = (1/N) Σ_i loss_fn(model(x_i), y_i)``.
        device: where to compute; the model must already be there.
        n_probes: Rademacher probes. The estimate's standard error is reported per tensor.
        seed: probe ``j`` is drawn from a CPU generator seeded with ``seed·1000003 + j``.
        chunk_size: samples per double-backward; probes are regenerated per chunk, so any chunk
            size gives the same estimator.
        loss_fn: per-sample loss ``(logits, y) -> (N,)``; cross-entropy by default.
        params: tensors to differentiate; default :func:`conv_linear_weights`.

    Returns:
        ``layers``: list of dicts ``name``, ``numel``, ``trace``, ``stderr`` (trace units: loss
        per weight unit²); ``total`` (sum of traces) and ``total_stderr``; ``n_probes``;
        ``seconds``.
    """
    check_batch(x, y)
    if n_probes < 1:
        raise UsageError(f"n_probes must be at least 1, got {n_probes}")
    dev = check_device(model, device)
    plist = list(params) if params is not None else conv_linear_weights(model)
    if not plist:
        raise NotApplicable("the model has no conv/linear weights to measure")
    names = [n for n, _ in plist]
    tensors = [p for _, p in plist]
    loss_fn = loss_fn or (lambda logits, t: F.cross_entropy(logits, t, reduction="none"))
    n = len(x)
    x, y = x.to(dev), y.to(dev)
    samples = torch.zeros(n_probes, len(tensors), dtype=torch.float64)
    t0 = time.perf_counter()
    with eval_mode(model):
        chunks = list(range(0, n, chunk_size))
        bar = tqdm(total=len(chunks) * n_probes, desc="hutchinson", disable=not progress, leave=False)
        try:
            for s in chunks:
                _add_chunk(samples, model, x[s:s + chunk_size], y[s:s + chunk_size], tensors, n=n,
                           loss_fn=loss_fn, seed=seed, dev=dev, bar=bar)
        finally:
            bar.close()
    mean = samples.mean(dim=0)
    stderr = (samples.std(dim=0, unbiased=True) / math.sqrt(n_probes)) if n_probes > 1 \
        else torch.full_like(mean, float("nan"))
    total = samples.sum(dim=1)
    layers = [{"name": nm, "numel": int(t.numel()), "trace": float(mean[i]), "stderr": float(stderr[i])}
              for i, (nm, t) in enumerate(zip(names, tensors, strict=True))]
    return {
        "layers": layers,
        "total": float(total.mean()),
        "total_stderr": float(total.std(unbiased=True) / math.sqrt(n_probes)) if n_probes > 1 else float("nan"),
        "n_probes": n_probes,
        "seconds": time.perf_counter() - t0,
    }


def pgd_points(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    device: torch.device | str,
    steps: int = 10,
    alpha: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """ℓ∞ PGD adversarial points with ``torchattacks.PGD`` (random start), [0, 1] pixel units.

    ``eps`` and ``alpha`` are in [0, 1] units (8/255 is CIFAR's usual radius); ``alpha``
    defaults to ``2.5·eps/steps``. torchattacks draws the random start from torch's global RNG:
    it is seeded with ``seed`` inside a forked RNG, so the caller's RNG state is untouched.
    """
    check_batch(x, y)
    dev = check_device(model, device)
    if eps < 0:
        raise UsageError(f"eps must be >= 0, got {eps}")
    if eps == 0:
        return x.detach().to(dev)
    atk = MultiStepPGD(model, eps=eps, alpha=alpha if alpha is not None else 2.5 * eps / steps, steps=[steps],
                       random_start=True)  # = torchattacks.PGD, bit for bit
    atk.set_device(dev)
    with eval_mode(model), seeded_rng(seed, dev):
        return atk(x.to(dev), y.to(dev))[steps].detach()


def weight_curvature_index(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    device: torch.device | str,
    steps: int = 10,
    alpha: float | None = None,
    n_probes: int = 100,
    seed: int = 0,
    chunk_size: int = 256,
    x_adv: torch.Tensor | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """WCI = Σ_k ||W_k||_F · sqrt(max(0, Tr ∇²_{W_k} L_adv)) (see the module docstring).

    Args:
        model: the network; eval mode during the measurement (caller's mode restored).
        x, y: clean batch; ``L_adv`` is the mean cross-entropy at its PGD points.
        eps: ℓ∞ PGD radius in [0, 1] units; ``steps``/``alpha`` as in :func:`pgd_points`.
        n_probes: Hutchinson probes; ``seed`` seeds PGD's start and the probes.
        x_adv: reuse precomputed adversarial points instead of running PGD.

    Returns:
        ``wci``; ``layers`` (``name``, ``fro_norm``, ``trace``, ``stderr``, ``clamped``,
        ``term``); ``adv_loss``; ``adv_accuracy``; ``n_probes``; ``eps``; ``seconds``.
    """
    dev = check_device(model, device)
    if not conv_linear_weights(model):  # before the PGD points: nothing to measure
        raise NotApplicable("the model has no conv/linear weights to measure")
    t0 = time.perf_counter()
    if x_adv is None:
        x_adv = pgd_points(model, x, y, eps=eps, device=dev, steps=steps, alpha=alpha, seed=seed)
    x_adv, y = x_adv.to(dev), y.to(dev)
    with eval_mode(model), torch.no_grad():
        logits = torch.cat([model(x_adv[s:s + chunk_size]) for s in range(0, len(x_adv), chunk_size)])
    adv_loss = float(F.cross_entropy(logits, y))
    adv_acc = float((logits.argmax(1) == y).double().mean())
    weights = conv_linear_weights(model)
    tr = hutchinson_trace(model, x_adv, y, device=dev, n_probes=n_probes, seed=seed,
                          chunk_size=chunk_size, params=weights, progress=progress)
    layers = []
    wci = 0.0
    for (name, w), est in zip(weights, tr["layers"], strict=True):
        fro = float(w.detach().double().norm())
        clamped = est["trace"] < 0
        term = fro * math.sqrt(max(0.0, est["trace"]))
        wci += term
        layers.append({"name": name, "fro_norm": fro, "trace": est["trace"], "stderr": est["stderr"],
                       "clamped": clamped, "term": term})
    n_clamped = sum(bool(layer["clamped"]) for layer in layers)
    if n_clamped:
        log.info("WCI: %d of %d layers had a negative trace estimate (clamped at 0)", n_clamped, len(layers))
    return {"wci": wci, "layers": layers, "adv_loss": adv_loss, "adv_accuracy": adv_acc,
            "n_probes": n_probes, "eps": eps, "trace_total": tr["total"],
            "seconds": time.perf_counter() - t0}


def filter_normalized_direction(model: nn.Module, *, seed: int) -> dict[str, torch.Tensor]:
    """A random direction in weight space, filter-normalised (Li et al. 2018).

    Keys are parameter names of conv/linear weights; each value has the weight's shape, with
    every filter ``d_i`` (slice along dim 0) rescaled to ``||W_i||``. Parameters not listed
    (biases, BatchNorm) are left out (``d = 0``). Drawn on the CPU from ``seed``.
    """
    gen = generator(seed)
    out: dict[str, torch.Tensor] = {}
    for name, w in conv_linear_weights(model):
        wd = w.detach()
        d = torch.randn(wd.shape, generator=gen, dtype=torch.float64)
        wf = wd.double().cpu().reshape(wd.shape[0], -1)
        df = d.reshape(d.shape[0], -1)
        df = df * (wf.norm(dim=1, keepdim=True) / df.norm(dim=1, keepdim=True).clamp_min(1e-12))
        out[name] = df.reshape(wd.shape).to(device=wd.device, dtype=wd.dtype)
    return out


def weight_loss_curve(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device | str,
    alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS,
    seed: int = 0,
    adversarial_eps: float | None = None,
    pgd_steps: int = 10,
    chunk_size: int = 512,
) -> dict[str, Any]:
    """Loss at ``w + α d`` for a filter-normalised random direction ``d`` (AWP-style curve).

    Args:
        model: the network; its parameters are modified in place during the sweep and restored
            bit-exactly afterwards (also on error). Eval mode; caller's mode restored.
        x, y: the batch the loss is averaged over (mean cross-entropy, nats).
        alphas: step sizes; ``α = 1`` moves every filter by its own norm.
        seed: seeds ``d`` (and PGD's random start).
        adversarial_eps: if given, the loss is the adversarial loss of AWP's landscape: at each
            α, PGD (ℓ∞, this radius in [0, 1] units, ``pgd_steps`` steps) is rerun against the
            perturbed weights.

    Returns:
        ``alphas``, ``loss`` (per α), ``accuracy`` (per α), ``base_loss`` (at the unperturbed
        weights: the clean loss unless ``adversarial_eps`` is set), ``adversarial_eps``,
        ``seed``.
    """
    check_batch(x, y)
    dev = check_device(model, device)
    x, y = x.to(dev), y.to(dev)
    alist = [float(a) for a in alphas]
    direction = filter_normalized_direction(model, seed=seed)
    if not direction:
        raise NotApplicable("the model has no conv/linear weights to perturb")
    params = dict(model.named_parameters())
    originals = {name: params[name].detach().clone() for name in direction}

    def evaluate() -> tuple[float, float]:
        xs = x
        if adversarial_eps is not None:
            xs = pgd_points(model, x, y, eps=adversarial_eps, device=dev, steps=pgd_steps, seed=seed)
        with torch.no_grad():
            logits = torch.cat([model(xs[s:s + chunk_size]) for s in range(0, len(xs), chunk_size)])
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())

    losses, accs = [], []
    with eval_mode(model):
        base_loss, _ = evaluate()
        try:
            for a in alist:
                with torch.no_grad():
                    for name, d in direction.items():
                        params[name].copy_(originals[name] if a == 0 else originals[name] + a * d)
                lo, ac = evaluate()
                losses.append(lo)
                accs.append(ac)
        finally:
            with torch.no_grad():
                for name, w0 in originals.items():
                    params[name].copy_(w0)
    return {"alphas": alist, "loss": losses, "accuracy": accs, "base_loss": base_loss,
            "adversarial_eps": adversarial_eps, "seed": seed}
