"""Weight space: Hutchinson traces vs the exact Hessian, WCI, and the AWP-style loss curve."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cure_eval.geometry import (
    conv_linear_weights,
    filter_normalized_direction,
    hutchinson_trace,
    weight_curvature_index,
    weight_loss_curve,
)


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()


def tiny_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 10))


def data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def exact_block_traces(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Trace of each diagonal block ∇²_{W_k} L of the full weight Hessian (autograd)."""
    weights = conv_linear_weights(model)
    params = dict(model.named_parameters())
    traces = []
    for name, w in weights:
        def loss_of(wk: torch.Tensor, name: str = name) -> torch.Tensor:
            p = {**params, name: wk}
            out = torch.func.functional_call(model, p, (x,))
            return F.cross_entropy(out, y)
        hk = torch.autograd.functional.hessian(loss_of, w.detach())
        n = w.numel()
        traces.append(float(hk.reshape(n, n).trace()))
    return traces


def test_hutchinson_matches_exact_trace() -> None:
    model = tiny_mlp()
    x, y = data()
    exact = exact_block_traces(model, x, y)
    est = hutchinson_trace(model, x, y, device="cpu", n_probes=400, seed=0, chunk_size=10)
    got = [layer["trace"] for layer in est["layers"]]
    # stated tolerance: 15 % per layer and on the total with 400 Rademacher probes, and within
    # 4 reported standard errors
    for e, g_, layer in zip(exact, got, est["layers"], strict=True):
        assert abs(g_ - e) <= 0.15 * abs(e), (g_, e)
        assert abs(g_ - e) <= 4 * layer["stderr"] + 1e-12
    assert abs(est["total"] - sum(exact)) <= 0.15 * abs(sum(exact))
    # chunking does not change the estimator (probes are regenerated per chunk)
    whole = hutchinson_trace(model, x, y, device="cpu", n_probes=400, seed=0, chunk_size=100)
    assert np.allclose([layer["trace"] for layer in whole["layers"]], got, rtol=1e-10)


def test_weight_loss_curve_restores_weights_exactly() -> None:
    model = tiny_cnn()
    model.train()
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curve = weight_loss_curve(model, x, y, device="cpu", alphas=[-0.5, 0.0, 0.25, 0.5], seed=3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact
    assert model.training
    model.eval()
    with torch.no_grad():
        clean = float(F.cross_entropy(model(x), y))
    assert curve["loss"][1] == clean == curve["base_loss"]
    assert curve["loss"][0] != clean and all(math.isfinite(v) for v in curve["loss"])
    again = weight_loss_curve(model, x, y, device="cpu", alphas=[-0.5, 0.0, 0.25, 0.5], seed=3)
    assert again["loss"] == curve["loss"]  # deterministic given the seed
    other = weight_loss_curve(model, x, y, device="cpu", alphas=[0.5], seed=4)
    assert other["loss"][0] != curve["loss"][3]


def test_filter_normalised_direction() -> None:
    model = tiny_cnn()
    d = filter_normalized_direction(model, seed=0)
    assert set(d) == {"0.weight", "4.weight"}  # conv/linear weights only: no biases, no BatchNorm
    for name, w in conv_linear_weights(model):
        dn = d[name].reshape(len(w), -1).norm(dim=1)
        wn = w.detach().reshape(len(w), -1).norm(dim=1)
        assert torch.allclose(dn, wn, rtol=1e-5)


def test_wci_formula_and_finiteness() -> None:
    model = tiny_cnn().eval()
    x = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (12,), generator=torch.Generator().manual_seed(1))
    rng_state = torch.get_rng_state()
    res = weight_curvature_index(model, x, y, eps=8 / 255, device="cpu", steps=3, n_probes=8, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_state)  # PGD's random start ran on a forked RNG
    assert math.isfinite(res["wci"]) and res["wci"] >= 0
    expected = sum(layer["fro_norm"] * math.sqrt(max(0.0, layer["trace"])) for layer in res["layers"])
    assert res["wci"] == expected
    assert [layer["name"] for layer in res["layers"]] == ["0.weight", "4.weight"]
    assert all(layer["clamped"] == (layer["trace"] < 0) for layer in res["layers"])
    again = weight_curvature_index(model, x, y, eps=8 / 255, device="cpu", steps=3, n_probes=8, seed=0)
    assert again["wci"] == res["wci"]
