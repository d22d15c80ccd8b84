"""The method registry: entry points, run-time registration, unknown names, config resolution."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cure_eval.data import get_dataset_spec
from cure_eval.defend import main as defend_main
from cure_eval.errors import UsageError
from cure_eval.training.methods import (
    Method,
    MethodConfig,
    get_method,
    list_methods,
    parse_method_args,
    register_method,
    unregister_method,
)


def test_builtins_come_from_entry_points() -> None:
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="cure_eval.methods")}
    assert {"standard", "cure"} <= names
    assert {"standard", "cure"} <= set(list_methods())
    assert get_method("cure").__module__ == "cure_eval_plugins.methods.cure"


def test_unknown_method_lists_valid_ones() -> None:
    with pytest.raises(UsageError, match="choose one of .*cure.*standard"):
        get_method("madry")


class _Toy(Method):
    name = "toy_method"
    description = "test-local method"

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return {"loss": 0.0}


def test_registration_function(capsys: pytest.CaptureFixture[str]) -> None:
    register_method(_Toy)
    try:
        assert "toy_method" in list_methods()
        assert defend_main(["--list-methods"]) == 0
        assert "toy_method" in capsys.readouterr().out  # the list is a result: stdout
    finally:
        unregister_method("toy_method")
    assert "toy_method" not in list_methods()


def test_test_local_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "thirdparty_method.py"
    pkg.write_text(
        "from cure_eval.methods import Method  # the old path (re-exported until 0.3)\n"
        "class ThirdParty(Method):\n"
        "    name = 'third_party'\n"
        "    description = 'installed by another package'\n"
        "    def step(self, model, optimizer, x, y):\n"
        "        return {'loss': 0.0}\n"
    )
    dist = tmp_path / "thirdparty_method-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-method\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[cure_eval.methods]\nthird_party = thirdparty_method:ThirdParty\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "third_party" in list_methods()
    assert get_method("third_party").description == "installed by another package"
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    assert "third_party" not in list_methods()


def test_config_resolution_order() -> None:
    spec = get_dataset_spec("cifar10")
    cure = get_method("cure")
    paper = cure.make_config(spec, "wide_resnet28_10", preset="paper")
    assert (paper.epochs, paper.lr, paper.lr_final, paper.h_ramp_epochs, paper.optimizer) == (20, 1e-4, 1e-6, 5, "adam")
    assert paper.gamma == 8.0 and cure.make_config(spec, "cifar_resnet18", preset="paper").gamma == 4.0
    assert paper.h == pytest.approx(3.0)  # the reference code's h = 3, in its normalised-input units
    over = cure.make_config(spec, "cifar_resnet18", preset="paper", overrides=parse_method_args(cure, ["gamma=2", "squared=false"]))
    assert over.gamma == 2.0 and over.squared is False and over.epochs == 20
    with pytest.raises(UsageError, match="no option"):
        parse_method_args(cure, ["gamma2=1"])
    with pytest.raises(UsageError, match="expected a float"):
        parse_method_args(cure, ["gamma=abc"])
    with pytest.raises(UsageError, match="no preset"):
        cure.make_config(spec, "x", preset="nope")
    assert isinstance(over, MethodConfig)


def test_cure_h_ramp() -> None:
    from cure_eval.training.methods import TrainContext

    spec = get_dataset_spec("digits")
    cure = get_method("cure")
    cfg = cure.make_config(spec, "wide_resnet16_4", overrides={"h": 1.0, "h_ramp_epochs": 4})
    m = cure(cfg, TrainContext(spec=spec, eps=0.1, model_name="m", device=torch.device("cpu"), epochs=6, steps_per_epoch=1))
    hs = []
    for e in range(6):
        m.start_epoch(e)
        hs.append(m.current_h)  # type: ignore[attr-defined]
    assert hs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cure_gamma_schedule_svhn_paper() -> None:
    """SVHN: γ = 4, 8, 12 for 10, 5, 5 epochs (paper §4); a scheduled step equals a constant-γ step."""
    from cure_eval.training.methods import TrainContext

    spec = get_dataset_spec("svhn")
    cure = get_method("cure")
    ctx = TrainContext(spec=spec, eps=12 / 255, model_name="m", device=torch.device("cpu"), epochs=20, steps_per_epoch=1)
    cfg = cure.make_config(spec, "cifar_resnet18", preset="paper")
    m = cure(cfg, ctx)
    gammas = []
    for e in range(cfg.epochs):
        m.start_epoch(e)
        gammas.append(m.current_gamma)  # type: ignore[attr-defined]
    assert gammas == [4.0] * 10 + [8.0] * 5 + [12.0] * 5

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.Softplus(), nn.Linear(16, 10))
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    nets = [net, copy.deepcopy(net)]
    const = cure(cure.make_config(spec, "cifar_resnet18", preset="paper",
                                  overrides={"gamma": 12.0, "gamma_milestones": (), "gamma_values": ()}), ctx)
    for meth, model in zip((m, const), nets, strict=True):
        meth.start_epoch(16)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        stats = meth.step(model, opt, x, y)
        assert stats["gamma"] == 12.0
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(UsageError, match="same length"):
        parse_and_make = parse_method_args(cure, ["gamma_milestones=3", "gamma_values=1,2"])
        cure.make_config(spec, "cifar_resnet18", overrides=parse_and_make)
