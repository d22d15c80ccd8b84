"""The pass counter (:mod:`cure_eval.attacks.passes`) against a model that counts its own calls.

:class:`SelfCounting` increments its own counters in ``forward`` (calls, rows) and in the backward
of a custom autograd ``Function`` at its output (calls, rows): what the library counter reports
must equal that, for every attack in the registry, under ``torch.no_grad``, in a double backward,
and when torchattacks, foolbox and pyautoattack call the model. Hand counts pin the units.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchattacks
from torch import nn

from cure_eval.attacks import AttackContext, get_attack, list_attacks
from cure_eval.attacks.passes import PassCounter, count_passes
from cure_eval.attacks.spsa import spsa_attack
from cure_eval.data import load_dataset, select_points

EPS = 32 / 255


class _CountBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, owner: SelfCounting) -> torch.Tensor:  # type: ignore[override]
        ctx.owner = owner
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        ctx.owner.b_calls += 1
        ctx.owner.b_rows += grad.shape[0]
        return grad.clone(), None


class SelfCounting(nn.Module):
    """Wraps ``inner`` and counts its own forward calls/rows and backward calls/rows."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.f_calls = self.f_rows = self.b_calls = self.b_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.f_calls += 1
        self.f_rows += x.shape[0]
        out: torch.Tensor = _CountBackward.apply(self.inner(x), self)
        return out

    def reset(self) -> None:
        self.f_calls = self.f_rows = self.b_calls = self.b_rows = 0

    def own(self) -> tuple[int, int, int, int]:
        return self.f_rows, self.b_rows, self.f_calls, self.b_calls


def _agree(counter: PassCounter, model: SelfCounting) -> None:
    p = counter.passes
    assert (p.forward, p.backward, p.forward_calls, p.backward_calls) == model.own()


@pytest.fixture(scope="module")
def counted(trained_digits_model: nn.Module) -> SelfCounting:
    return SelfCounting(trained_digits_model).eval()


@pytest.fixture(scope="module")
def points() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    test = load_dataset("digits", "test")
    idx = select_points(len(test), 12, 3)
    return test.tensors[0][idx], test.tensors[1][idx], idx


def test_hooks_removed_and_counts_plain_calls(counted: SelfCounting) -> None:
    x = torch.rand(5, 1, 8, 8)
    n_pre, n_fwd = len(counted._forward_pre_hooks), len(counted._forward_hooks)
    counted.reset()
    with PassCounter(counted) as c:
        with torch.no_grad():
            counted(x)  # no graph: a forward, no backward hook
        xg = x.clone().requires_grad_(True)
        counted(xg[:3]).sum().backward()
        # double backward: the gradient's graph goes back through the model's output
        xg2 = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(counted(xg2).logsumexp(1).sum(), xg2, create_graph=True)
        g.pow(2).sum().backward()
    _agree(c, counted)
    assert c.passes.forward == 5 + 3 + 5 and c.passes.forward_calls == 3
    assert c.passes.backward >= 3 + 5 + 5  # the second-order pass goes through the output again
    assert (len(counted._forward_pre_hooks), len(counted._forward_hooks)) == (n_pre, n_fwd)
    before = c.passes.forward
    counted(x)  # closed: not counted
    assert c.passes.forward == before


def test_hooks_removed_on_error(counted: SelfCounting) -> None:
    n_pre = len(counted._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="boom"), count_passes(counted):
        raise RuntimeError("boom")
    assert len(counted._forward_pre_hooks) == n_pre


def test_hand_counts(counted: SelfCounting, points: tuple[torch.Tensor, ...]) -> None:
    """torchattacks' PGD(k): k forwards and k backwards per point (its source: no final forward,
    a random start without a model call); FGSM: 1 and 1; SPSA: what it reports as model inputs."""
    x, y, _ = points
    n, k = len(x), 7
    counted.reset()
    with PassCounter(counted) as c:
        torchattacks.PGD(counted, eps=EPS, alpha=2.5 * EPS / k, steps=k)(x, y)
    assert (c.passes.forward, c.passes.backward) == (k * n, k * n)
    _agree(c, counted)
    counted.reset()
    with PassCounter(counted) as c:
        torchattacks.FGSM(counted, eps=EPS)(x, y)
    assert (c.passes.forward, c.passes.backward) == (n, n)
    with PassCounter(counted) as c, torch.no_grad():
        out = spsa_attack(counted, x, y, eps=EPS, iterations=5, samples=16)
    assert c.passes.forward == out.model_inputs > 0 and c.passes.backward == 0


# AutoAttack's own runs take most of this test's time: the slow tier counts them.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("autoattack") else n
                                  for n in list_attacks()])
def test_every_registered_attack_counts_exactly(counted: SelfCounting, points: tuple[torch.Tensor, ...],
                                                name: str) -> None:
    x, y, idx = points
    cls = get_attack(name)
    ctx = AttackContext(model=counted, device=torch.device("cpu"), batch_size=8, progress=False, eps=EPS,
                        eps_l2=EPS, seed=0)
    counted.reset()
    with PassCounter(counted) as c, torch.enable_grad():
        cls().run(ctx, x, y, idx)
    _agree(c, counted)
    assert c.passes.forward > 0, name
    if "gradients" in cls.needs:
        assert c.passes.backward > 0, name
    else:
        assert c.passes.backward == 0, name


@pytest.mark.parametrize("ranking", ["logit", "malt"])
def test_hand_count_apgd_t_and_square_on_points_nobody_breaks(counted: SelfCounting,
                                                              points: tuple[torch.Tensor, ...], ranking: str) -> None:
    """At a radius too small to break anything every point runs every round, so the counts are
    closed-form (from pyautoattack's source: a clean forward, then per target round ``steps + 1``
    forward+backward passes of the whole batch, no early stop inside a run; Square: two clean
    forwards, one per query, one of the result)."""
    from cure_eval.attacks.apgd_t import APGDT, APGDTConfig
    from cure_eval.attacks.square import Square, SquareConfig

    x, y, idx = points
    with torch.no_grad():
        ok = counted(x).argmax(1) == y
    x, y, idx = x[ok], y[ok], idx[ok]
    n, k, steps, c = len(x), 3, 4, 10
    ctx = AttackContext(model=counted, device=torch.device("cpu"), batch_size=64, progress=False, eps=1e-6,
                        eps_l2=1e-6, seed=0)
    with PassCounter(counted) as p:
        APGDT(APGDTConfig(targets=k, ranking=ranking, steps=steps)).run(ctx, x, y, idx)  # type: ignore[arg-type]
    probe = 1  # the plugin's one-row class count probe
    if ranking == "logit":  # the target ranking is recomputed per round, as AutoAttack does
        assert (p.passes.forward, p.passes.backward) == (probe + n + k * n * (steps + 2), k * n * (steps + 1))
    else:  # the Jacobian once: one forward, C backward passes per point
        assert (p.passes.forward, p.passes.backward) == (probe + 2 * n + k * n * (steps + 1),
                                                         n * c + k * n * (steps + 1))
    q = 7
    with PassCounter(counted) as p:
        Square(SquareConfig(queries=q)).run(ctx, x, y, idx)
    assert (p.passes.forward, p.passes.backward) == (n * (q + 3), 0)


def test_run_counted_returns_the_attacks_own_passes(counted: SelfCounting, points: tuple[torch.Tensor, ...]) -> None:
    from cure_eval.attacks.passes import run_counted

    x, y, idx = points
    ctx = AttackContext(model=counted, device=torch.device("cpu"), batch_size=64, progress=False, eps=EPS,
                        eps_l2=EPS, seed=0)
    counted.reset()
    out, passes = run_counted(get_attack("fgsm")(), ctx, x, y, idx)
    assert out.x_adv.shape == x.shape and (passes.forward, passes.backward) == (len(x), len(x))
    assert passes.as_dict()["forward"] == counted.f_rows and passes.per_point(len(x)) == {"forward": 1.0,
                                                                                          "backward": 1.0}
