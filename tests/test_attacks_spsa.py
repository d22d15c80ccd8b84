"""SPSA (Uesato et al. 2018) as a foolbox attack: gradient estimate, constraints, strength."""

from __future__ import annotations

import foolbox
import pytest
import torch
import torchattacks
from torch import nn

from cure_eval.attacks.base import adversarial_margin
from cure_eval.attacks.spsa import LinfSPSAAttack, point_keys, spsa_attack, spsa_gradient
from cure_eval.errors import UsageError

EPS = 32 / 255



def linear_model(seed: int = 0) -> nn.Module:
    """Logits ``W x + b`` on flattened 8×8 images: the margin loss has an analytic gradient."""
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(64, 10)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(10, 64, generator=gen))
        lin.bias.copy_(torch.randn(10, generator=gen))
    return nn.Sequential(nn.Flatten(), lin).eval()


def true_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xr = x.clone().requires_grad_(True)
    (-adversarial_margin(model(xr), y)).sum().backward()
    assert xr.grad is not None
    return xr.grad


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(a.reshape(len(a), -1), b.reshape(len(b), -1))


@pytest.fixture(scope="module")
def linear_points() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(24, 1, 8, 8, generator=gen)
    model = linear_model()
    with torch.no_grad():
        y = model(x).argmax(1)  # correctly classified by construction
    return model, x, y


def test_gradient_estimate_points_along_the_true_gradient(linear_points):
    model, x, y = linear_points
    g_true = true_gradient(model, x, y)
    with torch.no_grad():
        est = spsa_gradient(model, x, y)  # the paper's 128 samples (64 mirrored pairs)
    cos = cosine(est, g_true)
    # in 64 dimensions with 64 directions the expected cosine is about sqrt(64/128) ≈ 0.71
    assert float(cos.mean()) > 0.6, cos
    assert float(cos.min()) > 0.4, cos
    with torch.no_grad():
        many = spsa_gradient(model, x, y, samples=2048, max_batch=4096)
    assert float(cosine(many, g_true).min()) > 0.9
    # a linear loss and mirrored pairs: the estimate is unbiased, so its scale matches too
    ratio = many.reshape(len(x), -1).norm(dim=1) / g_true.reshape(len(x), -1).norm(dim=1)
    assert float((ratio - 1).abs().max()) < 0.3


def test_directions_are_per_point_and_seeded(linear_points):
    model, x, y = linear_points
    xx = x[:1].repeat(4, 1, 1, 1)
    yy = y[:1].repeat(4)
    with torch.no_grad():
        same_ids = spsa_gradient(model, xx, yy, point_ids=[5, 5, 5, 5])
        diff_ids = spsa_gradient(model, xx, yy)
        other_seed = spsa_gradient(model, xx, yy, seed=1)
    assert torch.equal(same_ids[0], same_ids[3])
    assert not torch.equal(diff_ids[0], diff_ids[1])  # independent directions per image
    assert not torch.equal(diff_ids[0], other_seed[0])
    keys = point_keys(0, torch.arange(1000))
    assert len(torch.unique(keys)) == 1000


def test_result_of_a_point_does_not_depend_on_its_batch(trained_digits_model, digits_test):
    x, y = digits_test
    x, y = x[:12], y[:12]
    kw = dict(eps=EPS, iterations=8, seed=3)
    with torch.no_grad():
        whole = spsa_attack(trained_digits_model, x, y, **kw)
        part = spsa_attack(trained_digits_model, x[6:], y[6:], point_ids=torch.arange(6, 12), **kw)
    assert torch.allclose(whole.x_adv[6:], part.x_adv, atol=1e-5)
    assert torch.equal(whole.iterations[6:], part.iterations)


def test_foolbox_api_with_a_list_of_epsilons(trained_digits_model, digits_test):
    model = trained_digits_model
    x, y = digits_test
    x, y = x[:40], y[:40]
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device="cpu")
    epsilons = [8 / 255, EPS]
    attack = LinfSPSAAttack(iterations=10, seed=0)
    raw, clipped, success = attack(fmodel, x, y, epsilons=epsilons)
    assert len(raw) == len(clipped) == 2 and success.shape == (2, len(x))
    for eps, xr, xc, ok in zip(epsilons, raw, clipped, success, strict=True):
        d = (xr - x).reshape(len(x), -1).abs().amax(1)
        assert float(d.max()) <= eps + 1e-6, "SPSA left the ε-ball"
        assert float(xr.min()) >= 0.0 and float(xr.max()) <= 1.0
        assert torch.allclose(xr, xc, atol=1e-6)
        with torch.no_grad():
            logits = model(xc)
        assert torch.equal(ok, logits.argmax(1) != y)
        out = attack.outputs[eps]
        # the exposed per-image best margin is the margin at the returned point
        assert torch.allclose(out.best_margin, adversarial_margin(logits, y), atol=1e-4)
        assert torch.equal(out.success, ok)
        # finished images stop; the others run every iteration
        assert torch.all(out.iterations[~ok] == 10)
        assert torch.all(out.iterations <= 10)
    assert set(attack.outputs) == set(epsilons)
    assert int(success[1].sum()) >= int(success[0].sum()) - 2  # larger ε, not weaker
    # a single epsilon returns single tensors, like any foolbox attack
    r1, c1, s1 = LinfSPSAAttack(iterations=2)(fmodel, x[:5], y[:5], epsilons=EPS)
    assert r1.shape == x[:5].shape and s1.shape == (5,)


def test_reproducible(trained_digits_model, digits_test):
    x, y = digits_test
    x, y = x[:10], y[:10]
    with torch.no_grad():
        a = spsa_attack(trained_digits_model, x, y, eps=EPS, iterations=4, seed=11)
        b = spsa_attack(trained_digits_model, x, y, eps=EPS, iterations=4, seed=11)
        c = spsa_attack(trained_digits_model, x, y, eps=EPS, iterations=4, seed=12)
    assert torch.equal(a.x_adv, b.x_adv)
    assert not torch.equal(a.x_adv, c.x_adv)
    assert a.model_inputs == b.model_inputs > 0


def test_success_rate_close_to_pgd20(trained_digits_model, digits_test):
    model = trained_digits_model
    x, y = digits_test
    x, y = x[:100], y[:100]
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    x, y = x[correct], y[correct]
    torch.manual_seed(0)
    adv = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=20)(x, y)
    with torch.no_grad():
        pgd_success = float((model(adv).argmax(1) != y).float().mean())
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device="cpu")
    # 50 iterations instead of the default 100 keeps the test fast; it already suffices here
    _, _, success = LinfSPSAAttack(iterations=50, seed=0)(fmodel, x, y, epsilons=[EPS])
    spsa_success = float(success[0].float().mean())
    assert pgd_success > 0.3  # the model is attackable at this ε
    assert spsa_success >= 0.8 * pgd_success, (spsa_success, pgd_success)


def test_rejects_bad_settings(trained_digits_model, digits_test):
    x, y = digits_test
    fmodel = foolbox.PyTorchModel(trained_digits_model, bounds=(0, 1), device="cpu")
    with pytest.raises(UsageError):
        LinfSPSAAttack(samples=3)
    with pytest.raises(UsageError):
        LinfSPSAAttack(lr=0.0)
    with pytest.raises(UsageError):
        LinfSPSAAttack(iterations=1)(fmodel, x[:2], foolbox.criteria.TargetedMisclassification(y[:2]),
                                     epsilons=[EPS])
    with pytest.raises(UsageError):
        LinfSPSAAttack(iterations=1)(fmodel, x[:2], y[:2], epsilons=[EPS], point_ids=[1, 2, 3])


def test_plateau_stop_saves_passes_only_where_the_loss_stalls(trained_digits_model, digits_test):
    """plateau_window stops the points whose best margin stopped improving; off (0) is the
    reference semantics: every unbroken point runs all iterations."""
    x, y = digits_test[0][:12], digits_test[1][:12]
    model = trained_digits_model.eval()
    ref = spsa_attack(model, x, y, eps=4 / 255, iterations=30, samples=32, seed=1)
    cut = spsa_attack(model, x, y, eps=4 / 255, iterations=30, samples=32, seed=1, plateau_window=5, plateau_tol=0.5)
    robust = ~ref.success
    assert int(robust.sum()) > 0 and bool((ref.iterations[robust] == 30).all())
    assert cut.model_inputs < ref.model_inputs
    stopped = cut.iterations < ref.iterations
    assert bool(stopped.any()) and bool((cut.iterations[stopped] % 5 == 0).all())
    # identical up to the stop: the same random streams, so a point that ran to the end is the same
    same = cut.iterations == ref.iterations
    assert torch.equal(cut.x_adv[same], ref.x_adv[same])
    assert float((cut.x_adv - x).abs().max()) <= 4 / 255 + 1e-6
    # a constant model never improves: every point stops at the first window
    const = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    nn.init.zeros_(const[1].weight)
    with torch.no_grad():
        const[1].bias.copy_(torch.arange(10.0))
    out = spsa_attack(const, x, torch.full((12,), 9), eps=4 / 255, iterations=30, samples=8, plateau_window=5)
    assert bool((out.iterations == 5).all())
    with pytest.raises(UsageError, match="plateau"):
        spsa_attack(model, x, y, eps=4 / 255, plateau_window=-1)
