"""Per-layer feature sensitivity (Jia, Li & Wen, ICML 2020, https://arxiv.org/abs/2011.07478).

For a layer ``f_l`` and an input change ``δ`` the sensitivity is ``‖f_l(x+δ) − f_l(x)‖₂ / ‖δ‖₂``
(ℓ2 norm of the flattened feature difference over the ℓ2 norm of ``δ`` in [0, 1] pixel units).
The paper's finding: adversarial robustness makes this smaller *uniformly in all directions*; we
compare a random direction with the adversarial one (their ratio: the *anisotropy*) and give the
local Jacobian's top singular values (the largest linear gain of ``f_l`` at ``x``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.modes import check_device, eval_mode
from ..errors import UsageError
from .layers import layer_outputs


def random_sign_delta(x: torch.Tensor, *, eps: float, seed: int) -> torch.Tensor:
    """A seeded random corner of the ℓ∞ ball: ``δ = ±ε`` per pixel (uniform signs, a CPU
    generator so every device draws the same), then clipped so ``x + δ`` stays in [0, 1].
    Returns the actual ``δ`` (``clip(x + δ, 0, 1) − x``)."""
    if eps <= 0:
        raise UsageError(f"eps must be positive, got {eps}")
    gen = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, x.shape, generator=gen).to(x.dtype).mul_(2).sub_(1)
    xc = x.detach().cpu()
    return ((xc + eps * signs).clamp(0.0, 1.0) - xc).to(x.device)


def layer_sensitivity(
    model: nn.Module,
    x: torch.Tensor,
    deltas: dict[str, torch.Tensor],
    *,
    layers: Sequence[str],
    device: torch.device | str,
    batch_size: int = 128,
    progress: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """``‖f_l(x+δ) − f_l(x)‖₂ / ‖δ‖₂`` per point, layer and kind of ``δ``.

    Args:
        model: maps [0, 1] images to logits; measured in eval mode (the caller's mode restored),
            already on ``device``.
        x: the points ``(N, ...)`` in [0, 1].
        deltas: ``{kind: δ}`` with each ``δ`` of ``x``'s shape (e.g. ``random``, ``adversarial``);
            ``x + δ`` is evaluated as given.
        layers: module names (:func:`~cure_eval.features.resolve_layers`; ``logits`` = output).
        device: where to compute.
        batch_size: points per forward pass.
        progress: a tqdm bar over the batches.

    Returns:
        ``{kind: {layer: ratios}}`` (CPU float64 tensors of length N; NaN where ``‖δ‖ = 0``).
    """
    dev = check_device(model, device)
    for kind, d in deltas.items():
        if d.shape != x.shape:
            raise UsageError(f"δ {kind!r} has shape {tuple(d.shape)}, the points {tuple(x.shape)}")
    out: dict[str, dict[str, list[torch.Tensor]]] = {k: {lay: [] for lay in layers} for k in deltas}
    starts = range(0, len(x), batch_size)
    with eval_mode(model), torch.no_grad():
        for s in tqdm(starts, desc="feature sensitivity", disable=not progress, leave=False):
            xb = x[s:s + batch_size].to(dev)
            base = layer_outputs(model, layers, xb)
            for kind, d in deltas.items():
                db = d[s:s + batch_size].to(dev)
                moved = layer_outputs(model, layers, xb + db)
                dn = db.flatten(1).double().norm(dim=1)
                for lay in layers:
                    num = (moved[lay].double() - base[lay].double()).norm(dim=1)
                    ratio = torch.where(dn > 0, num / dn.clamp_min(1e-300), torch.full_like(num, float("nan")))
                    out[kind][lay].append(ratio.cpu())
    return {k: {lay: torch.cat(v) for lay, v in per.items()} for k, per in out.items()}


def _jtj_products(model: nn.Module, layers: Sequence[str], x: torch.Tensor,
                  v: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For points ``x (P, ...)`` and per layer directions ``v[layer] (P, K, ...)``: ``(J v, Jᵀ J v)``
    of each layer map at each point, shapes ``(P, K, m)`` and ``(P, K, ...)``. One forward pass
    for all layers; per layer ``J v`` by the double-backward trick (``Jᵀu`` is linear in ``u``)
    and ``JᵀJv`` by one more backward pass."""
    first = next(iter(v.values()))
    p, k = first.shape[:2]
    xr = x.repeat_interleave(k, dim=0).detach().requires_grad_(True)
    feats = layer_outputs(model, layers, xr)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in layers:
        u = torch.zeros_like(feats[layer], requires_grad=True)
        (jt_u,) = torch.autograd.grad(feats[layer], xr, grad_outputs=u, create_graph=True)
        (jv,) = torch.autograd.grad(jt_u, u, grad_outputs=v[layer].reshape(xr.shape), retain_graph=True)
        (jtjv,) = torch.autograd.grad(feats[layer], xr, grad_outputs=jv.detach(), retain_graph=True)
        out[layer] = (jv.detach().reshape(p, k, -1), jtjv.detach().reshape(v[layer].shape))
    return out


def jacobian_singular_values(
    model: nn.Module,
    x: torch.Tensor,
    *,
    layers: Sequence[str],
    device: torch.device | str,
    k: int = 3,
    iterations: int = 10,
    oversample: int = 2,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Top ``k`` singular values of each layer's Jacobian ``∂f_l/∂x`` at every point of ``x``.

    Subspace (block power) iteration on ``JᵀJ`` with ``k + oversample`` seeded random directions
    per point, ``iterations`` rounds, each followed by a QR orthonormalisation; the singular
    values are then the square roots of the eigenvalues of the projected ``VᵀJᵀJV`` (a
    Rayleigh-Ritz step). Units: feature ℓ2 per input ℓ2 in [0, 1] pixel units, like
    :func:`layer_sensitivity`. Needs input gradients; eval mode (the caller's mode restored).

    Returns:
        ``{layer: σ}`` with ``σ`` a CPU float64 tensor ``(N, k)``, descending per point.
    """
    if k < 1 or iterations < 1 or oversample < 0:
        raise UsageError(f"k and iterations must be >= 1 and oversample >= 0, got {k}, {iterations}, {oversample}")
    dev = check_device(model, device)
    xs = x.to(dev)
    dim = int(xs[0].numel())
    block = min(k + oversample, dim)
    gen = torch.Generator().manual_seed(int(seed))
    shape = (len(xs), block, *xs.shape[1:])

    def orthonormal(w: torch.Tensor) -> torch.Tensor:  # (P, B, d) rows → orthonormal rows, float64 CPU
        return torch.linalg.qr(w.reshape(len(xs), block, dim).double().cpu().transpose(1, 2)).Q.transpose(1, 2)

    vs = {lay: orthonormal(torch.randn((len(xs), block, dim), generator=gen, dtype=torch.float64)) for lay in layers}
    with eval_mode(model), torch.enable_grad():
        for _ in tqdm(range(iterations), desc="Jacobian σ", disable=not progress, leave=False):
            prods = _jtj_products(model, layers, xs, {lay: v.to(dev, xs.dtype).reshape(shape) for lay, v in vs.items()})
            vs = {lay: orthonormal(w) for lay, (_, w) in prods.items()}
        prods = _jtj_products(model, layers, xs, {lay: v.to(dev, xs.dtype).reshape(shape) for lay, v in vs.items()})
    result: dict[str, torch.Tensor] = {}
    for lay, (jv, _) in prods.items():
        jv = jv.double().cpu()
        gram = jv @ jv.transpose(1, 2)  # (P, B, B) = Vᵀ JᵀJ V
        eig = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0.0)
        result[lay] = eig[:, : min(k, block)].sqrt()
    return result



