"""Attacks are plugins: the built-ins come from the ``cure_eval.attacks`` entry points, and a
third-party attack, installed at test time as a tiny distribution with its own entry point, runs
end to end through ``audit`` (suite, resumable units, per-sample rows, summary, table)."""

from __future__ import annotations

import csv
import json
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from cure_eval.attacks import (
    ATTACKS,
    Attack,
    AttackConfig,
    AttackContext,
    AttackOutput,
    get_attack,
    list_attacks,
    register_attack,
    run_suite,
    unregister_attack,
)
from cure_eval.audit import main as audit_main
from cure_eval.errors import UsageError

PLUGIN = '''
from dataclasses import dataclass

import torch

from cure_eval.attacks import Attack, AttackConfig, AttackOutput


@dataclass
class CornerConfig(AttackConfig):
    scale: float = 1.0


class Corner(Attack[CornerConfig]):
    """A random corner of the eps-ball: x + eps * random signs (gradient-free)."""

    name = "corner"
    label = "Corner"
    needs = frozenset()
    extras = ("corner_linf",)
    Config = CornerConfig

    def run(self, ctx, x, y, ids):
        gen = torch.Generator().manual_seed(ctx.seed)
        signs = torch.randint(0, 2, x.shape, generator=gen).to(x.dtype) * 2 - 1
        adv = (x + self.config.scale * ctx.eps * signs).clamp(0, 1)
        return AttackOutput(x_adv=adv, seconds=0.0, extra={"corner_linf": (adv - x).flatten(1).abs().amax(1)})
'''


@pytest.fixture
def corner_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A third-party distribution ``corner-attack`` with an entry point ``cure_eval.attacks``."""
    site = tmp_path / "site"
    dist = site / "corner_attack-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "corner_attack.py").write_text(PLUGIN)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: corner-attack\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cure_eval.attacks]\ncorner = corner_attack:Corner\n")
    monkeypatch.syspath_prepend(str(site))
    return "corner"


def test_builtins_are_entry_points() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="cure_eval.attacks")}
    assert set(ATTACKS) <= set(eps)
    for name in ATTACKS:
        cls = get_attack(name)
        assert cls.name == name and cls.__module__ == eps[name].split(":")[0]
        assert cls.norm in ("linf", "l2") and cls.label
    assert list_attacks()[: len(ATTACKS)] == list(ATTACKS)  # report order
    assert get_attack("spsa").needs == frozenset() and "gradients" in get_attack("pgd20").needs


def test_unknown_attack_lists_the_valid_ones() -> None:
    with pytest.raises(UsageError, match="choose from clean, fgsm, pgd7"):
        get_attack("autoatack")


def test_third_party_attack_end_to_end(tmp_path: Path, factory_argv: list[str], corner_installed: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert "corner" in list_attacks()
    out = tmp_path / "audit"
    assert audit_main([*factory_argv, "--attacks", "fgsm,corner", "--n", "40", "--batch-size", "16",
                       "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["attacks"]) == ["fgsm", "corner"]
    assert 0.0 <= res["attacks"]["corner"]["robust_accuracy"] <= res["clean_accuracy"]
    assert res["worst_case_accuracy"] <= res["attacks"]["corner"]["robust_accuracy"]
    rows = [r for r in csv.DictReader((out / "per_sample.csv").open()) if r["attack"] == "corner"]
    assert len(rows) == 40
    attacked = [r for r in rows if r["attacked"] == "True"]
    assert attacked and all(float(r["linf"]) <= 32 / 255 + 1e-5 for r in attacked)
    assert "Corner" in capsys.readouterr().out  # the results table, on stdout
    # unknown names list the plugin too
    assert audit_main([*factory_argv, "--attacks", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "corner" in capsys.readouterr().err


class _Broken(Attack[AttackConfig]):
    """Returns points outside the ε-ball: the suite must refuse them, whoever wrote the attack."""

    name = "broken_plugin"
    needs = frozenset()

    def run(self, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> AttackOutput:
        return AttackOutput(x_adv=(x + 3 * ctx.eps).clamp(0, 1), seconds=0.0)


def test_registered_attack_obeys_the_suite_rules(trained_digits_model: torch.nn.Module,
                                                 digits_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits_test
    register_attack(_Broken)
    try:
        assert "broken_plugin" in list_attacks()
        with pytest.raises(Exception, match="outside the linf ε-ball"):
            run_suite(trained_digits_model, x[:20], y[:20], eps=8 / 255, device="cpu", attacks=["broken_plugin"],
                      progress=False)
    finally:
        unregister_attack("broken_plugin")
    assert "broken_plugin" not in list_attacks()
