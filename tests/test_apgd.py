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
                    configs={name: (cfg := APGDConfig(steps=STEPS))})
    assert torch.equal(torch.get_rng_state(), rng)  # torchattacks reseeds the global RNG: not ours
    correct = res.clean_correct
    # the suite attacks only the clean-correct points, in one batch: call torchattacks on those
    direct = torchattacks.APGD(model, norm="Linf", eps=EPS, steps=STEPS, n_restarts=cfg.restarts, seed=7,
                               loss=loss)(x[correct], y[correct])
    r = res.attacks[name]
    assert torch.equal(r.x_adv[correct], direct)
    with torch.no_grad():
        assert torch.equal(r.adv_pred[correct], model(direct).argmax(1))
    assert float(r.linf[correct].max()) <= EPS + 1e-6
    assert 0 < int(r.success.sum()) < int(correct.sum())  # some points broken, some not: a real test


def test_the_second_start_only_adds_to_the_first(trained_digits_model: torch.nn.Module) -> None:
    """With two random starts (the default) the first is the one-start run, same seed: every point
    one start breaks, two break with the same adversarial point; the second start runs on the
    points the first left, all the steps (no point of this small CNN falls to it: on the 360-point
    WRN-16-4 it broke 3 of 117, docs/attacks.md)."""
    from cure_eval.attacks.passes import PassCounter

    test = load_dataset("digits", "test")
    idx = select_points(len(test), 48, 3)
    x, y = test.tensors[0][idx], test.tensors[1][idx]
    model = trained_digits_model.eval()
    runs, passes = {}, {}
    for r in (1, 2):
        with PassCounter(model) as counter:
            runs[r] = run_suite(model, x, y, eps=EPS, device="cpu", attacks=["apgd-ce"], seed=7, indices=idx,
                                progress=False, configs={"apgd-ce": APGDConfig(steps=5, restarts=r)}).attacks["apgd-ce"]
        passes[r] = counter.passes
    one, two = runs[1].success, runs[2].success
    assert 0 < int(one.sum()) < int(runs[1].attacked.sum())
    assert bool((two | ~one).all())  # one ⊆ two
    assert torch.equal(runs[2].x_adv[one], runs[1].x_adv[one])
    left = int((runs[1].attacked & ~one).sum())
    # a start on m points: a forward of the clean batch, then steps + 1 forward and backward passes
    # (torchattacks' APGD: the random start's loss, one per step; its source)
    assert passes[2].backward - passes[1].backward == left * (5 + 1), (passes, left)


def test_dlr_needs_three_classes() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)).eval()
    x = torch.rand(4, 1, 8, 8)
    y = model(x).argmax(1)  # all clean-correct: the attack is reached
    with pytest.raises(NotApplicable, match="at least 3 classes.*drop it"):
        run_suite(model, x, y, eps=EPS, device="cpu", attacks=["apgd-dlr"], progress=False,
                  configs={"apgd-dlr": APGDConfig(steps=2)})
