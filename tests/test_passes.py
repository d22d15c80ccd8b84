"""The pass counter (:mod:`cure_eval.attacks.passes`) against a model that counts its own calls.

:class:`SelfCounting` increments its own counters in ``forward`` (calls, rows) and in the backward
of a custom autograd ``Function`` at its output (calls, rows): what the library counter reports
must equal that, for every attack in the registry, under ``torch.no_grad``, in a double backward,
and when torchattacks, foolbox and pyautoattack call the model. Hand counts pin the units.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
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


AUDITED = ("fgsm", "pgd7", "pgd20", "apgd-ce", "apgd-t", "square", "deepfool_linf", "spsa", "autoattack")


def test_audit_records_each_attacks_passes_exactly(tmp_path: Path, counted: SelfCounting) -> None:
    """Through :func:`audit_model`: each attack's recorded ``passes`` equals what the model counted
    itself when the same attack (the audit plan's instance) runs again on the same points and seed;
    the audit's total is the clean pass plus every unit, the CSV's per-point shares add up to it."""
    from cure_eval.auditing import AuditOptions, audit_model
    from cure_eval.auditing.options import resolve_radii
    from cure_eval.auditing.runner import audit_plan
    from cure_eval.data import get_dataset_spec

    spec = get_dataset_spec("digits")
    opts = AuditOptions(n=16, batch_size=16, attacks=list(AUDITED), spsa_iterations=3, seed=2)  # one chunk
    summary = audit_model(counted, spec, {"source": "test"}, opts, tmp_path, device=torch.device("cpu"),
                          progress=False, resumable=True)
    eps, alpha = resolve_radii(opts, spec)
    plan = audit_plan(opts.attacks, eps=eps, batch_size=opts.batch_size, seed=opts.seed, cascade=False,
                      pgd_alpha=alpha, spsa_iterations=opts.spsa_iterations)
    test = load_dataset("digits", "test")
    idx = select_points(len(test), opts.n, opts.seed)
    x, y = test.tensors[0][idx], test.tensors[1][idx]
    with torch.no_grad():
        ok = counted(x).argmax(1) == y
    ctx = plan.context(counted, torch.device("cpu"), False, 0, None)
    units_total = {"forward": 0, "backward": 0}
    for unit in plan.units:
        counted.reset()
        with torch.enable_grad():
            lead = unit.attacks[0]
            if lead.family is not None:
                type(lead).run_family(plan.context(counted, torch.device("cpu"), False, 0, unit), list(unit.attacks),
                                      x[ok], y[ok], idx[ok], cascade=False)
            else:
                lead.run(ctx, x[ok], y[ok], idx[ok])
        own = {"forward": counted.f_rows, "backward": counted.b_rows}
        assert own["forward"] > 0, unit.name
        for name in unit.names:
            assert summary["attacks"][name]["passes"] == own, name
        units_total = {k: units_total[k] + own[k] for k in own}
    clean = summary["passes"]["clean"]
    assert clean == {"forward": len(x), "backward": 0}
    assert summary["passes"]["forward"] == clean["forward"] + units_total["forward"]
    assert summary["passes"]["backward"] == clean["backward"] + units_total["backward"]
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert saved["passes"] == summary["passes"]
    with open(tmp_path / "per_sample.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for name in ("fgsm", "square", "autoattack"):
        shares = [float(r["forward_share"]) for r in rows if r["attack"] == name]
        assert sum(shares) == pytest.approx(summary["attacks"][name]["passes"]["forward"])
    assert "passes f+b per point" in (tmp_path / "results.md").read_text(encoding="utf-8")
