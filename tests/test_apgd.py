"""``apgd-ce`` / ``apgd-dlr``: torchattacks' Auto-PGD through the attack registry, equal to
``torchattacks.APGD`` called directly on the same points with the same seed."""

from __future__ import annotations

import pytest
import torch
import torchattacks

from cure_eval.attacks import run_suite
from cure_eval.attacks.apgd import APGDConfig
from cure_eval.data import load_dataset, select_points
from cure_eval.errors import NotApplicable

EPS = 16 / 255
STEPS = 20  # the default is 100; the equality does not depend on it


@pytest.mark.parametrize("name,loss", [("apgd-ce", "ce"), ("apgd-dlr", "dlr")])
def test_plugin_equals_torchattacks_apgd(trained_digits_model: torch.nn.Module, name: str, loss: str) -> None:
    test = load_dataset("digits", "test")
    idx = select_points(len(test), 24, 5)
    x, y = test.tensors[0][idx], test.tensors[1][idx]
    model = trained_digits_model.eval()
    rng = torch.get_rng_state()
    res = run_suite(model, x, y, eps=EPS, device="cpu", attacks=[name], seed=7, indices=idx, progress=False,
                    configs={name: APGDConfig(steps=STEPS)})
    assert torch.equal(torch.get_rng_state(), rng)  # torchattacks reseeds the global RNG: not ours
    correct = res.clean_correct
    # the suite attacks only the clean-correct points, in one batch: call torchattacks on those
    direct = torchattacks.APGD(model, norm="Linf", eps=EPS, steps=STEPS, n_restarts=1, seed=7, loss=loss)(
        x[correct], y[correct])
    r = res.attacks[name]
    assert torch.equal(r.x_adv[correct], direct)
    with torch.no_grad():
        assert torch.equal(r.adv_pred[correct], model(direct).argmax(1))
    assert float(r.linf[correct].max()) <= EPS + 1e-6
    assert 0 < int(r.success.sum()) < int(correct.sum())  # some points broken, some not: a real test


def test_dlr_needs_three_classes() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)).eval()
    x = torch.rand(4, 1, 8, 8)
    y = model(x).argmax(1)  # all clean-correct: the attack is reached
    with pytest.raises(NotApplicable, match="at least 3 classes.*drop it"):
        run_suite(model, x, y, eps=EPS, device="cpu", attacks=["apgd-dlr"], progress=False,
                  configs={"apgd-dlr": APGDConfig(steps=2)})
