"""``apgd-t``: pyautoattack's own targeted APGD on the top-k targets, checked against the package
(logit ranking, all 9 targets: AutoAttack's APGD-T bit for bit) and MALT's ranking against its
closed form on a linear model."""

from __future__ import annotations

import pytest
import torch
from pyautoattack.autopgd_base import APGDAttack_targeted
from torch import nn

from cure_eval.attacks import run_suite
from cure_eval.attacks.apgd_t import APGDTConfig, malt_distances, rank_targets
from cure_eval.data import load_dataset, select_points
from cure_eval.errors import NotApplicable

EPS = 16 / 255
STEPS = 20  # AutoAttack's is 100; the equality does not depend on it


def _points(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    test = load_dataset("digits", "test")
    idx = select_points(len(test), n, seed)
    return test.tensors[0][idx], test.tensors[1][idx], idx


def test_logit_ranking_all_targets_equals_autoattack_apgd_t(trained_digits_model: nn.Module) -> None:
    x, y, idx = _points(24, 5)
    model = trained_digits_model.eval()
    res = run_suite(model, x, y, eps=EPS, device="cpu", attacks=["apgd-t"], seed=7, indices=idx, progress=False,
                    configs={"apgd-t": APGDTConfig(targets=9, ranking="logit", steps=STEPS)})
    correct = res.clean_correct
    ref = APGDAttack_targeted(model, n_restarts=1, n_iter=STEPS, verbose=False, eps=EPS, norm="Linf", eot_iter=1,
                              rho=.75, seed=7, device=torch.device("cpu"), n_target_classes=9)
    direct = ref.perturb(x[correct], y[correct])
    r = res.attacks["apgd-t"]
    assert torch.equal(r.x_adv[correct], direct)
    assert 0 < int(r.success.sum()) < int(correct.sum())  # some broken, some not: a real test


def test_malt_distance_closed_form_on_a_linear_model() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(10, 64, generator=gen)
    b = torch.randn(10, generator=gen)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.copy_(w)
        model[1].bias.copy_(b)
    x = torch.rand(6, 1, 8, 8, generator=gen)
    y = torch.tensor([0, 3, 5, 7, 9, 2])
    z = x.flatten(1) @ w.T + b
    hand = torch.empty(6, 10)
    for i in range(6):
        for t in range(10):
            hand[i, t] = float("inf") if t == y[i] else (z[i, y[i]] - z[i, t]) / (w[y[i]] - w[t]).abs().sum()
    got = malt_distances(model, x, y)
    assert torch.allclose(got, hand, rtol=1e-5, atol=1e-6)
    assert torch.equal(rank_targets(model, x, y, k=3, ranking="malt"), hand.argsort(dim=1)[:, :3])
    by_logit = rank_targets(model, x, y, k=9, ranking="logit")
    assert torch.equal(by_logit, z.argsort(dim=1, descending=True)[:, 1:])


@pytest.mark.parametrize("ranking", ["logit", "malt"])
def test_top_k_runs_inside_the_ball(trained_digits_model: nn.Module, ranking: str) -> None:
    x, y, idx = _points(16, 2)
    res = run_suite(trained_digits_model.eval(), x, y, eps=EPS, device="cpu", attacks=["apgd-t"], seed=0,
                    indices=idx, progress=False, configs={"apgd-t": APGDTConfig(targets=2, ranking=ranking,  # type: ignore[arg-type]
                                                                                       steps=10)})
    r = res.attacks["apgd-t"]
    assert float(r.linf.max()) <= EPS + 1e-6 and int(r.success.sum()) > 0


def test_needs_four_classes() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    x = torch.rand(4, 1, 8, 8)
    y = model(x).argmax(1)
    with pytest.raises(NotApplicable, match="at least 4 classes"):
        run_suite(model, x, y, eps=EPS, device="cpu", attacks=["apgd-t"], progress=False)
