"""The CURE regulariser against direct, independent computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cure_eval.training.cure import cure_direction, cure_terms


def _smooth_net(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(1, 4, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.Softplus(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)]
    return nn.Sequential(*layers).double()


def _batch(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def _grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample input gradient, computed one sample at a time (fully independent path)."""
    out = []
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), xi)
        out.append(g)
    return torch.cat(out)


def test_regulariser_equals_direct_two_gradient_computation() -> None:
    model = _smooth_net()
    x, y = _batch()
    h = 0.3
    terms = cure_terms(model, x, y, h=h)
    g = _grad(model, x, y)
    s = torch.sign(g)
    z = s / s.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    g_h = _grad(model, x + h * z, y)
    direct = (g_h - g).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(terms.reg_per_sample.detach(), direct, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(terms.loss.detach(), F.cross_entropy(model(x), y), rtol=1e-12, atol=1e-12)
    # z has unit ℓ2 norm, so h is the ℓ2 length of the step
    torch.testing.assert_close(z.flatten(1).norm(dim=1), torch.ones(len(x), dtype=torch.float64))


def test_regulariser_is_a_finite_difference_of_the_exact_hessian() -> None:
    """For small h on a smooth net, ||∇ℓ(x+hz) − ∇ℓ(x)||² / h² → ||Hz||² with the exact Hessian."""
    model = _smooth_net()
    x, y = _batch(n=3)
    h = 1e-4
    terms = cure_terms(model, x, y, h=h, create_graph=False)
    for i in range(len(x)):
        xi, yi = x[i:i + 1], y[i:i + 1]
        hess = torch.autograd.functional.hessian(
            lambda v, xi=xi, yi=yi: F.cross_entropy(model(v.view_as(xi)), yi), xi.flatten())
        z = cure_direction(_grad(model, xi, yi)).flatten()
        exact = (hess @ z).pow(2).sum()
        assert float(terms.reg_per_sample[i]) / h**2 == pytest.approx(float(exact), rel=1e-3)


def _weights_receive_gradient(model: nn.Module, reg: torch.Tensor) -> bool:
    model.zero_grad(set_to_none=True)
    if not reg.requires_grad:
        return False
    reg.backward()
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_regulariser_gives_the_weights_a_gradient_only_with_double_backprop() -> None:
    model = _smooth_net()
    x, y = _batch()
    assert _weights_receive_gradient(model, cure_terms(model, x, y, h=0.3).reg)
    # the bug of a public fork: input gradients without create_graph
    assert not _weights_receive_gradient(model, cure_terms(model, x, y, h=0.3, create_graph=False).reg)


def test_weight_gradient_matches_finite_difference_in_weight_space() -> None:
    model = _smooth_net()
    x, y = _batch(n=4)
    terms = cure_terms(model, x, y, h=0.3)
    w = model[0].weight
    (gw,) = torch.autograd.grad(terms.reg, w)
    d = torch.randn_like(w)
    d /= d.norm()
    eps = 1e-6
    with torch.no_grad():
        w.add_(eps * d)
    up = float(cure_terms(model, x, y, h=0.3, create_graph=False).reg)
    with torch.no_grad():
        w.sub_(2 * eps * d)
    down = float(cure_terms(model, x, y, h=0.3, create_graph=False).reg)
    with torch.no_grad():
        w.add_(eps * d)
    assert (up - down) / (2 * eps) == pytest.approx(float((gw * d).sum()), rel=1e-4, abs=1e-9)


def test_squared_and_unsquared() -> None:
    model = _smooth_net()
    x, y = _batch()
    sq = cure_terms(model, x, y, h=0.3, squared=True).reg_per_sample.detach()
    un = cure_terms(model, x, y, h=0.3, squared=False).reg_per_sample.detach()
    torch.testing.assert_close(un**2, sq, rtol=1e-6, atol=1e-10)


def test_bn_modes() -> None:
    model = _smooth_net(bn=True).train()
    bn = model[1]
    x, y = _batch(n=8)
    h = 0.3
    # train mode: batch statistics, running statistics updated only by the loss forward at x
    ref = _smooth_net(bn=True).train()
    ref.load_state_dict(model.state_dict())
    ref(x)
    terms = cure_terms(model, x, y, h=h, bn_mode="train")
    torch.testing.assert_close(bn.running_mean, ref[1].running_mean)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(ref.train()(xg), y, reduction="sum"), xg)
    ref[1].momentum = 0.0
    xh = (x + h * cure_direction(g)).requires_grad_(True)
    (gh,) = torch.autograd.grad(F.cross_entropy(ref(xh), y, reduction="sum"), xh)
    torch.testing.assert_close(terms.reg_per_sample.detach(), (gh - g).flatten(1).pow(2).sum(1))
    assert model.training and bn.training

    # eval mode: running statistics in the regulariser passes, equal to per-sample eval gradients
    model2 = _smooth_net(bn=True).train()
    model2.load_state_dict(model.state_dict())
    terms_eval = cure_terms(model2, x, y, h=h, bn_mode="eval")
    frozen = _smooth_net(bn=True)
    frozen.load_state_dict(model2.state_dict())  # running statistics after the loss forward
    frozen.eval()
    g_e = _grad(frozen, x, y)
    gh_e = _grad(frozen, x + h * cure_direction(g_e), y)
    torch.testing.assert_close(terms_eval.reg_per_sample.detach(), (gh_e - g_e).flatten(1).pow(2).sum(1))
    assert model2.training and model2[1].training  # the caller's mode is restored
    assert not torch.allclose(terms.reg_per_sample, terms_eval.reg_per_sample)
