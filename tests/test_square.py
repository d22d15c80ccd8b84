"""``square``: pyautoattack's SquareAttack in AutoAttack's configuration, equal to the Square of
``pyautoattack.AutoAttack(version="standard")`` on the same batch and seed."""

from __future__ import annotations

import pytest
import torch
from pyautoattack import AutoAttack
from torch import nn

from cure_eval.attacks import run_suite
from cure_eval.attacks.square import AUTOATTACK_QUERIES, SquareConfig
from cure_eval.data import load_dataset, select_points

EPS = 16 / 255


@pytest.mark.slow  # AutoAttack's 5000-query Square
def test_square_equals_autoattacks_square(trained_digits_model: nn.Module) -> None:
    test = load_dataset("digits", "test")
    idx = select_points(len(test), 24, 11)
    x, y = test.tensors[0][idx], test.tensors[1][idx]
    model = trained_digits_model.eval()
    rng = torch.get_rng_state()
    res = run_suite(model, x, y, eps=EPS, device="cpu", attacks=["square"], seed=7, indices=idx, progress=False,
                    configs={"square": SquareConfig(queries=AUTOATTACK_QUERIES)})
    assert torch.equal(torch.get_rng_state(), rng)
    correct = res.clean_correct
    aa = AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=7, device=torch.device("cpu"))
    assert aa.square.n_queries == AUTOATTACK_QUERIES
    direct = aa.square.perturb(x[correct], y[correct])
    r = res.attacks["square"]
    assert torch.equal(r.x_adv[correct], direct)
    assert 0 < int(r.success.sum()) < int(correct.sum())

    # resc_schedule=False: a smaller budget is a prefix of the same run, so it breaks a subset
    short = run_suite(model, x, y, eps=EPS, device="cpu", attacks=["square"], seed=7, indices=idx, progress=False,
                      configs={"square": SquareConfig(queries=200)}).attacks["square"]
    assert bool((short.success <= r.success).all()) and int(short.success.sum()) <= int(r.success.sum())
