"""||Hz|| and the Frobenius estimate against direct computations with the exact Hessian."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cure_eval.geometry import cure_direction, curvature_summaries, gradient_alignment

SHAPE = (1, 8, 8)


def softplus_mlp() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Softplus(), nn.Linear(32, 10)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    return net


def exact(net: nn.Module, x1: torch.Tensor, y1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x1.reshape(-1).clone().requires_grad_(True)
    loss = F.cross_entropy(net(flat.view(1, *SHAPE)), y1.view(1))
    (g,) = torch.autograd.grad(loss, flat)
    h = torch.autograd.functional.hessian(
        lambda f: F.cross_entropy(net(f.view(1, *SHAPE)), y1.view(1)), x1.reshape(-1))
    return g, h


def test_hz_and_frobenius_against_exact_hessian() -> None:
    net = softplus_mlp()
    net.train()
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, *SHAPE, generator=gen, dtype=torch.float64)
    y = torch.tensor([3, 1, 7])
    out = curvature_summaries(net, x, y, h=1e-4, n_gaussian=400, device="cpu")
    assert net.training  # caller's mode restored
    net.eval()
    hz_direct, fro_direct = [], []
    for i in range(3):
        g, h = exact(net, x[i], y[i])
        z = torch.sign(g) / torch.sign(g).norm()
        hz_direct.append(float((h @ z).norm()))
        fro_direct.append(float(h.norm()))  # Frobenius norm
    # ||Hz|| along the CURE direction: central FD with small h in float64 is exact to ~1e-8
    assert np.allclose(out["hz_norm_per_point"], hz_direct, rtol=1e-6)
    assert abs(out["hz_norm"] - np.mean(hz_direct)) <= 1e-6 * np.mean(hz_direct)
    # Frobenius from 400 Gaussian draws: each point within 10 % (std of the estimate of the
    # norm is at most sqrt(1/(2·400)) ≈ 3.5 % here)
    rel = np.abs(np.array(out["frobenius_per_point"]) - fro_direct) / np.array(fro_direct)
    assert np.all(rel < 0.10), rel
    assert out["hvps"] == 3 * 401
    # same probe every call (seeded CPU generator)
    again = curvature_summaries(net, x, y, h=1e-4, n_gaussian=400, device="cpu")
    assert again["frobenius"] == out["frobenius"]


def test_forward_scheme_and_exact_scheme_agree_on_smooth_net() -> None:
    net = softplus_mlp().eval()
    x = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.tensor([0, 5])
    ex = curvature_summaries(net, x, y, h=1.0, n_gaussian=20, device="cpu", scheme="exact")
    fw = curvature_summaries(net, x, y, h=1e-6, n_gaussian=20, device="cpu", scheme="forward")
    assert abs(ex["hz_norm"] - fw["hz_norm"]) < 1e-4 * ex["hz_norm"]
    assert abs(ex["frobenius"] - fw["frobenius"]) < 1e-4 * ex["frobenius"]


def test_direction_and_alignment_helpers() -> None:
    g = torch.tensor([[3.0, -0.5, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    z = cure_direction(g)
    assert torch.allclose(z[0], torch.tensor([1.0, -1.0, 0.0, 1.0]) / 3**0.5)
    assert torch.equal(z[1], torch.zeros(4))
    u = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    a = gradient_alignment(g, u)
    assert abs(a[0] - 3.0 / float(g[0].double().norm())) < 1e-12 and np.isnan(a[1])
