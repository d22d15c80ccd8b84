"""timm registration of the CIFAR model families, aliases and the normalising wrapper."""

from __future__ import annotations

import pytest
import timm
import torch

import cure_eval  # noqa: F401
from cure_eval.data import get_dataset_spec
from cure_eval.errors import UsageError
from cure_eval.models import (
    ModelConfig,
    NormalizedModel,
    count_parameters,
    create_model,
    load_factory,
    model_config_for,
    resolve_model_name,
)


@pytest.mark.parametrize(
    "name,params",
    [("cifar_resnet18", 11_173_962), ("wide_resnet16_4", 2_748_890), ("wide_resnet28_10", 36_479_194)],
)
def test_models_build_through_timm_create_model(name: str, params: int) -> None:
    model = timm.create_model(name, num_classes=10, in_chans=3)
    assert count_parameters(model) == params  # the published sizes: 11.2 M, 2.7 M, 36.5 M
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)  # CIFAR defaults, not ImageNet's 224


def test_class_and_channel_arguments() -> None:
    model = timm.create_model("wide_resnet16_2", num_classes=7, in_chans=1).eval()
    assert model.conv1.in_channels == 1
    with torch.no_grad():
        assert model(torch.rand(3, 1, 8, 8)).shape == (3, 7)


def test_timm_resnet18_is_not_shadowed() -> None:
    assert type(timm.create_model("resnet18")).__module__.startswith("timm.")
    assert timm.create_model("cifar_resnet18").conv1.kernel_size == (3, 3)


def test_aliases() -> None:
    digits, cifar = get_dataset_spec("digits"), get_dataset_spec("cifar10")
    assert resolve_model_name("resnet18", cifar) == ("cifar_resnet18", {})
    assert resolve_model_name("wide_resnet", cifar) == ("wide_resnet28_10", {})
    assert resolve_model_name("wide_resnet", digits) == ("wide_resnet16_4", {})
    assert resolve_model_name("wide_resnet", cifar, depth=22, widen=3) == (
        "cifar_wide_resnet", {"depth": 22, "widen_factor": 3})
    model = create_model(model_config_for("wide_resnet", digits, depth=10, widen=1))
    assert model.model.depth == 10
    assert resolve_model_name("resnet50", cifar) == ("resnet50", {})  # any timm model


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(UsageError, match="wide_resnet28_10"):
        resolve_model_name("wide_resnet_99", get_dataset_spec("cifar10"))


def test_normalisation_lives_inside_the_model() -> None:
    spec = get_dataset_spec("cifar10")
    model = create_model(model_config_for("resnet18", spec))
    assert isinstance(model, NormalizedModel)
    x = torch.rand(2, 3, 32, 32)
    expected = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(x), expected)
    cfg = ModelConfig.from_dict(model_config_for("resnet18", spec).to_dict())
    assert cfg.mean == spec.mean and cfg.name == "cifar_resnet18"


def test_load_factory(tmp_path) -> None:
    f = tmp_path / "mymodel.py"
    f.write_text("import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n"
                 "def broken():\n    raise RuntimeError('no weights here')\n")
    model = load_factory(f"{f}:build")
    assert model(torch.rand(1, 1, 8, 8)).shape == (1, 10)
    with pytest.raises(Exception, match="no weights here"):
        load_factory(f"{f}:broken")
    with pytest.raises(UsageError, match="module:factory"):
        load_factory("nocolon")
