"""MultiStepPGD: one trajectory, every step count, bit-identical to torchattacks.PGD."""

from __future__ import annotations

import pytest
import torch
import torchattacks

from cure_eval.attacks.pgd import MultiStepPGD
from cure_eval.errors import UsageError

EPS = 32 / 255



@pytest.fixture(scope="module")
def points(digits_test: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_test
    return x[:64], y[:64]


@pytest.mark.parametrize("seed", [0, 7])
def test_records_equal_separate_torchattacks_runs(trained_digits_model, points, seed):
    model = trained_digits_model
    x, y = points
    torch.manual_seed(seed)
    rec = MultiStepPGD(model, eps=EPS, alpha=2 / 255, steps=(7, 20, 40, 100))(x, y)
    assert sorted(rec) == [7, 20, 40, 100]
    for k, adv in rec.items():
        torch.manual_seed(seed)  # torchattacks draws its random start from the global RNG
        ref = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=k)(x, y)
        assert torch.equal(adv, ref), f"PGD({k}) differs from torchattacks (max {float((adv - ref).abs().max())})"
        with torch.no_grad():
            assert torch.equal(model(adv).argmax(1), model(ref).argmax(1))
        assert float((adv - x).abs().max()) <= EPS + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_no_random_start_and_unsorted_steps(trained_digits_model, points):
    model = trained_digits_model
    x, y = points
    rec = MultiStepPGD(model, eps=EPS, steps=[5, 2, 5], random_start=False)(x, y)
    assert sorted(rec) == [2, 5]
    ref = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=5, random_start=False)(x, y)
    assert torch.equal(rec[5], ref)


def test_stop_on_success_is_a_cascade_of_the_same_trajectory(trained_digits_model, points):
    model = trained_digits_model
    x, y = points
    steps = (3, 7, 20)
    torch.manual_seed(1)
    full = MultiStepPGD(model, eps=EPS, steps=steps)(x, y)
    torch.manual_seed(1)
    attack = MultiStepPGD(model, eps=EPS, steps=steps, stop_on_success=True)
    casc = attack(x, y)
    stopped = attack.stopped_at
    assert stopped is not None and stopped.shape == (len(x),)
    with torch.no_grad():
        fooled = {k: model(full[k]).argmax(1) != y for k in steps}
    # expected stop: the first recorded step count at which the uninterrupted run is fooled
    expected = torch.zeros(len(x), dtype=torch.long)
    for k in reversed(steps):
        expected[fooled[k]] = k
    assert (stopped != expected).sum() <= 1  # identical up to float round-off of smaller batches
    for i in range(len(x)):
        k0 = int(stopped[i])
        if k0:
            with torch.no_grad():
                assert model(casc[k0][i:i + 1]).argmax(1).item() != y[i].item()
            for k in steps:
                if k >= k0:
                    assert torch.equal(casc[k][i], casc[k0][i])
    never = stopped == 0
    assert torch.allclose(casc[20][never], full[20][never], atol=1e-6)
    assert set(attack.checkpoint_seconds) == set(steps)


def test_restores_train_mode(trained_digits_model, points):
    model = trained_digits_model
    x, y = points
    model.train()
    try:
        MultiStepPGD(model, eps=EPS, steps=(2,))(x[:4], y[:4])
        assert model.training
    finally:
        model.eval()


def test_bad_arguments():
    net = torch.nn.Linear(4, 2)
    with pytest.raises(UsageError):
        MultiStepPGD(net, steps=())
    with pytest.raises(UsageError):
        MultiStepPGD(net, steps=(0, 5))
    with pytest.raises(UsageError):
        MultiStepPGD(net, eps=2.0)
    with pytest.raises(UsageError):
        MultiStepPGD(net).set_normalization_used((0.5,), (0.5,))
