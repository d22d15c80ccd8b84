"""Theorem 1 bounds on an exactly quadratic loss, against a numerical solution of the problem."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from cure_eval.geometry import LOG2, theorem1_bounds, theorem1_points, threshold_distance


def quadratic_case(d: int, seed: int, *, nu_sign: int = 1) -> tuple[np.ndarray, np.ndarray, float]:
    """A random (g, H, c): ℓ(x + r) − ℓ(x) = gᵀr + ½ rᵀHr, threshold at c = t − ℓ(x) > 0."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    if nu_sign > 0:
        lam = rng.uniform(-1.0, 3.0, d)
        lam[0] = 3.5  # ν > 0, H indefinite
    else:
        lam = -rng.uniform(0.2, 1.0, d)  # ν < 0: concave
    h = q @ np.diag(lam) @ q.T
    g = rng.standard_normal(d) * rng.uniform(0.2, 2.0)
    c = float(rng.uniform(0.1, 1.0))
    return g, 0.5 * (h + h.T), c


def minimal_perturbation(g: np.ndarray, h: np.ndarray, c: float, *, starts: int = 40, seed: int = 0) -> float:
    """min ||r|| s.t. gᵀr + ½ rᵀHr ≥ c, by SLSQP from many starts (independent of the theorem)."""
    rng = np.random.default_rng(seed)
    best = math.inf
    cons = {"type": "ineq", "fun": lambda r: g @ r + 0.5 * r @ h @ r - c,
            "jac": lambda r: g + h @ r}
    for _ in range(starts):
        r0 = rng.standard_normal(len(g)) * rng.uniform(0.1, 3.0)
        res = minimize(lambda r: r @ r, r0, jac=lambda r: 2 * r, constraints=[cons], method="SLSQP",
                       options={"ftol": 1e-14, "maxiter": 500})
        if res.success and cons["fun"](res.x) >= -1e-9:
            best = min(best, float(np.linalg.norm(res.x)))
    return best


def dense_search_2d(g: np.ndarray, h: np.ndarray, c: float, n_dir: int = 6000) -> float:
    """2-D check: first crossing along each of n_dir rays, by bisection on a monotone bracket."""
    th = np.linspace(0, 2 * np.pi, n_dir, endpoint=False)
    w = np.stack([np.cos(th), np.sin(th)], axis=1)
    a = w @ g
    b = np.einsum("ij,jk,ik->i", w, h, w)
    # f(α) = aα + ½bα² − c; scan α on a fine grid, then bisect the first sign change
    alphas = np.linspace(0, 10, 2001)
    f = a[:, None] * alphas[None] + 0.5 * b[:, None] * alphas[None] ** 2 - c
    hit = f >= 0
    has = hit.any(axis=1)
    first = np.argmax(hit, axis=1)
    lo = alphas[np.maximum(first - 1, 0)][has]
    hi = alphas[first][has]
    aa, bb = a[has], b[has]
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        ok = aa * mid + 0.5 * bb * mid**2 - c >= 0
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return float(hi.min()) if len(hi) else math.inf


@pytest.mark.parametrize("seed", range(8))
def test_bounds_bracket_exact_minimal_perturbation(seed: int) -> None:
    d = 2 if seed % 2 == 0 else 6
    g, h, c = quadratic_case(d, seed)
    lam, vec = np.linalg.eigh(h)
    nu, u = lam[-1], vec[:, -1]
    b = theorem1_bounds(grad_norm=np.linalg.norm(g), grad_dot_u=g @ u, nu=nu, c=c)
    r_star = minimal_perturbation(g, h, c, seed=seed)
    if d == 2:
        assert abs(dense_search_2d(g, h, c) - r_star) <= 1e-5 * r_star
    assert b["case"] == "convex"
    assert b["lower"] <= r_star * (1 + 1e-6)
    assert r_star <= b["upper"] * (1 + 1e-6)
    # the paper's literal expressions (Eq. 2, 3) agree with our cancellation-free form
    gn, gu = np.linalg.norm(g), abs(g @ u)
    assert b["lower"] == pytest.approx(gn / nu * (math.sqrt(1 + 2 * nu * c / gn**2) - 1), rel=1e-9)
    assert b["upper"] == pytest.approx(gu / nu * (math.sqrt(1 + 2 * nu * c / gu**2) - 1), rel=1e-9)
    # and the simplified bounds below Eq. (3)
    assert c / gn - 2 * nu * c**2 / gn**3 <= b["lower"] + 1e-12
    assert b["upper"] <= c / gu + 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_bounds_coincide_when_gradient_is_the_top_eigenvector(seed: int) -> None:
    g, h, c = quadratic_case(5, 100 + seed)
    lam, vec = np.linalg.eigh(h)
    nu, u = lam[-1], vec[:, -1]
    g = 1.3 * u * (-1 if seed % 2 else 1)
    b = theorem1_bounds(grad_norm=np.linalg.norm(g), grad_dot_u=g @ u, nu=nu, c=c)
    r_star = minimal_perturbation(g, h, c, seed=seed)
    assert b["lower"] == pytest.approx(b["upper"], rel=1e-12)
    assert r_star == pytest.approx(float(b["lower"]), rel=1e-6)


def test_concave_case_still_brackets_and_flat_is_linear_limit() -> None:
    g, h, c = quadratic_case(2, 7, nu_sign=-1)
    g = g / np.linalg.norm(g) * 3.0  # strong enough slope for the threshold to be reachable
    lam, vec = np.linalg.eigh(h)
    nu, u = lam[-1], vec[:, -1]
    b = theorem1_bounds(grad_norm=np.linalg.norm(g), grad_dot_u=g @ u, nu=nu, c=c)
    assert b["case"] == "concave"
    r_star = dense_search_2d(g, h, c)
    assert b["lower"] <= r_star * (1 + 1e-6)
    assert b["lower"] >= b["linear"]  # tighter than the linear limit c/||g||
    if np.isfinite(b["upper"]):
        assert r_star <= b["upper"] * (1 + 1e-6)
    # ν = 0: the linear limit
    f = theorem1_bounds(grad_norm=2.0, grad_dot_u=0.5, nu=0.0, c=0.4)
    assert f["case"] == "flat" and f["lower"] == pytest.approx(0.2) and f["upper"] == pytest.approx(0.8)
    # unreachable: no slope and no positive curvature
    assert np.isinf(threshold_distance(0.0, 0.0, 0.3)) and np.isinf(threshold_distance(0.1, -1.0, 1.0))


def test_already_beyond_threshold_gives_zero() -> None:
    b = theorem1_bounds(grad_norm=np.array([1.0, 0.0]), grad_dot_u=np.array([0.5, 0.0]),
                        nu=np.array([2.0, -1.0]), c=np.array([-0.3, 0.0]))
    assert list(b["case"]) == ["beyond", "beyond"]
    assert np.all(b["lower"] == 0) and np.all(b["upper"] == 0)


def test_theorem1_points_on_a_network() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Softplus(),
                              torch.nn.Linear(8, 3)).double().eval()
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    u = np.zeros((4, 16))
    u[:, 0] = 2.0  # normalised inside
    res = theorem1_points(net, x, y, nu=np.full(4, 0.5), u=u, device="cpu")
    loss = torch.nn.functional.cross_entropy(net(x), y, reduction="none").detach().numpy()
    assert np.allclose(res["c"], LOG2 - loss)
    assert res["lower"].shape == (4,) and np.all(res["lower"] <= res["upper"] + 1e-12)
    assert np.all((res["alignment"] >= 0) & (res["alignment"] <= 1))
