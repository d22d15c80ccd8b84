"""Input-Hessian products and curvature profiles against independent exact computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cure_eval.errors import CureEvalError, UsageError
from cure_eval.geometry import (
    InputHessianOperator,
    curvature_profile,
    hvp_jvp,
    input_hessian_matrix,
    input_hvp,
)

SHAPE = (1, 8, 8)  # 64-dimensional inputs, like the digits
D = 64


def softplus_mlp(seed: int = 0) -> nn.Module:
    """A smooth network (its input Hessian is a genuine, full-rank-ish matrix)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(D, 32), nn.Softplus(), nn.Linear(32, 32),
                        nn.Softplus(), nn.Linear(32, 10)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # larger weights: curvature well above round-off
    return net.eval()


def relu_net(seed: int = 0) -> nn.Module:
    """Piecewise-linear network with BatchNorm (measured in eval mode)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(D, 48), nn.BatchNorm1d(48), nn.ReLU(),
                        nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)).double()
    with torch.no_grad():  # non-trivial running statistics
        net[2].running_mean.normal_(0, 0.3)
        net[2].running_var.uniform_(0.5, 2.0)
    return net


def exact_hessian(net: nn.Module, x1: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
    """Autograd's Hessian of the cross-entropy w.r.t. one flattened input, (d, d)."""
    def f(flat: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net(flat.view(1, *SHAPE)), y1.view(1))
    return torch.autograd.functional.hessian(f, x1.reshape(-1))


def points(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def test_central_fd_full_spectrum_matches_autograd_hessian() -> None:
    net = softplus_mlp()
    x, y = points(3)
    prof = curvature_profile(net, x, y, h=1e-4, k=5, device="cpu", lanczos=False,
                             full_spectrum=True, progress=False)
    for i in range(3):
        he = exact_hessian(net, x[i], y[i])
        exact = torch.linalg.eigvalsh(he).flip(0).numpy()
        full = prof.points[i].full
        assert full is not None and full.shape == (D,)
        scale = np.abs(exact).max()
        assert scale > 1e-3  # a real curvature, not round-off
        assert np.max(np.abs(full - exact)) / scale <= 1e-3
        # the matrix itself, entrywise (central FD is O(h²))
        mat = input_hessian_matrix(net, x[i:i + 1], y[i:i + 1], h=1e-4, device="cpu")[0]
        assert torch.allclose(mat, he, atol=1e-6 * float(he.abs().max()))


def test_central_is_more_accurate_than_forward() -> None:
    net = softplus_mlp()
    x, y = points(1)
    he = exact_hessian(net, x[0], y[0])
    err = {}
    for scheme in ("central", "forward"):
        m = input_hessian_matrix(net, x, y, h=1e-3, scheme=scheme, device="cpu")[0]  # type: ignore[arg-type]
        err[scheme] = float((m - he).abs().max())
    assert err["central"] < 0.05 * err["forward"]


def test_lanczos_top_k_matches_full_spectrum_and_batching_is_invisible() -> None:
    net = softplus_mlp()
    x, y = points(4)
    prof = curvature_profile(net, x, y, h=1e-4, k=5, device="cpu", tol=1e-10, full_spectrum=True,
                             progress=False)
    for p in prof.points:
        assert p.full is not None
        assert np.allclose(p.top, p.full[:5], rtol=0, atol=1e-8 * abs(p.full).max())
        assert np.allclose(p.bottom, p.full[::-1][:5], rtol=0, atol=1e-8 * abs(p.full).max())
        assert np.all(np.diff(p.top) <= 0) and np.all(np.diff(p.bottom) >= 0)
        assert abs(np.linalg.norm(p.top_vector) - 1) < 1e-10
        assert p.hvps > D and p.seconds > 0 and p.residual < 1e-8
        assert abs(p.rayleigh - p.top[0]) < 1e-8 * abs(p.top[0])
    assert prof.to_dict()["max_lanczos_vs_full"] < 1e-8
    assert prof.sorted_profile is not None and prof.sorted_profile.shape == (D,)
    # concurrent eigsh solves with shared batched products == one solve at a time
    seq = curvature_profile(net, x, y, h=1e-4, k=5, device="cpu", tol=1e-10, full_spectrum=False,
                            points_per_batch=1, progress=False)
    assert np.allclose(seq.top_eigenvalues, prof.top_eigenvalues, atol=1e-10)
    # the top eigenvector really is one: H u = ν u
    he = exact_hessian(net, x[0], y[0]).numpy()
    u = prof.points[0].top_vector
    assert np.allclose(he @ u, prof.points[0].top[0] * u, atol=1e-6 * abs(he).max())


def test_batched_hvps_match_single_and_exact() -> None:
    net = softplus_mlp()
    x, y = points(2)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, 3, *SHAPE, generator=g, dtype=torch.float64) * 0.7  # non-unit directions
    batched = input_hvp(net, x, y, v, h=1e-4, device="cpu", chunk_size=4)
    exact = input_hvp(net, x, y, v, h=1e-4, scheme="exact", device="cpu")
    for i in range(2):
        he = exact_hessian(net, x[i], y[i])
        for j in range(3):
            single = input_hvp(net, x[i:i + 1], y[i:i + 1], v[i:i + 1, j:j + 1], h=1e-4, device="cpu")
            assert torch.allclose(batched[i, j], single[0, 0], atol=1e-12)
            ref = (he @ v[i, j].reshape(-1)).reshape(SHAPE)
            assert torch.allclose(exact[i, j], ref, atol=1e-10)
            assert torch.allclose(batched[i, j], ref, atol=1e-6 * float(ref.abs().max()))
            assert torch.allclose(hvp_jvp(net, x[i], y[i], v[i, j], device="cpu"), ref, atol=1e-10)
    # homogeneous: the FD step is h·v/||v|| whatever ||v|| is, the result scales with ||v||
    scaled = input_hvp(net, x, y, 5.0 * v, h=1e-4, device="cpu")
    assert torch.allclose(scaled, 5.0 * batched, atol=1e-10)
    zero = input_hvp(net, x, y, torch.zeros_like(v), h=1e-4, device="cpu")
    assert torch.equal(zero, torch.zeros_like(v))


def test_operator_matvec_matmat() -> None:
    net = softplus_mlp()
    x, y = points(1)
    op = InputHessianOperator(net, x, y, h=1e-4, device="cpu")
    assert op.shape == (D, D)
    block = np.random.default_rng(0).standard_normal((D, 4))
    mm = op.matmat(block)
    mv = np.stack([op.matvec(block[:, j]) for j in range(4)], axis=1)
    assert np.allclose(mm, mv, atol=1e-12)
    assert op.n_hvps == 8
    he = exact_hessian(net, x[0], y[0]).numpy()
    assert np.allclose(mm, he @ block, atol=1e-6 * abs(he).max())


def test_relu_profile_is_gauss_newton_with_low_rank() -> None:
    net = relu_net()
    net.train()  # the caller's mode; measurements must use eval mode and restore this
    x, y = points(3, seed=5)
    stats = net[2].running_mean.clone()
    prof = curvature_profile(net, x, y, h=1e-5, k=4, device="cpu", tol=1e-10, full_spectrum=True,
                             progress=False)
    assert net.training and net[2].training
    assert torch.equal(net[2].running_mean, stats)
    net.eval()
    for i, p in enumerate(prof.points):
        jac = torch.autograd.functional.jacobian(lambda f: net(f.view(1, *SHAPE))[0], x[i].reshape(-1))
        prob = torch.softmax(net(x[i:i + 1])[0], 0).detach()
        gn = jac.T @ (torch.diag(prob) - torch.outer(prob, prob)) @ jac
        exact = torch.linalg.eigvalsh(gn).flip(0).numpy()
        assert p.full is not None
        scale = abs(exact).max()
        assert np.max(np.abs(p.full - exact)) / scale <= 1e-3
        assert np.sum(np.abs(p.full) > 1e-6 * scale) <= 10 - 1  # rank <= classes - 1
        assert np.allclose(p.top, exact[:4], atol=1e-3 * scale)
        assert np.all(p.bottom > -1e-3 * scale)  # PSD up to FD error


def test_bad_arguments() -> None:
    net = softplus_mlp()
    x, y = points(1)
    with pytest.raises(UsageError):
        input_hvp(net, x, y, torch.zeros(1, 1, *SHAPE, dtype=torch.float64), h=0.0, device="cpu")
    with pytest.raises(UsageError):
        input_hvp(net, x, y, torch.zeros(1, *SHAPE, dtype=torch.float64), h=0.1, device="cpu")
    with pytest.raises(UsageError):
        curvature_profile(net, x, y, h=0.1, k=3, scheme="backward", device="cpu")  # type: ignore[arg-type]
    with pytest.raises(CureEvalError):
        curvature_profile(net, x, y, h=0.1, k=3, device="meta", progress=False)
