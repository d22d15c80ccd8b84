"""Shared fixtures: real digits data and a small, really trained digits model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# Before torch is imported: idle OpenMP threads must not spin on a shared 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import cure_eval  # noqa: E402,F401  (registers the timm models)
from cure_eval.data import get_dataset_spec, load_dataset  # noqa: E402
from cure_eval.models import NormalizedModel  # noqa: E402
from cure_eval.testing import small_cnn, train_plain  # noqa: E402,F401  (tests import them from here)

# Small models on a 2-core machine: one thread avoids OpenMP oversubscription (10x slower).
torch.set_num_threads(1)


#: The longest tests (``--durations``: the default defend run alone is about a third of the suite),
#: run first: with two workers (``-n 2``, pyproject.toml) the other worker takes the rest meanwhile
#: instead of one worker finishing them alone at the end.
LONGEST_FIRST = (
    "test_default_command_shows_the_cure_effect",
    "test_gpu_check_smoke_runs_every_stage",
    "test_every_cli_runs_from_the_wheel",
    "test_documented_gpu_command_runs_one_real_step_on_cpu",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = getattr(item, "originalname", item.name)
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the others keep their order


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One torch thread in every test module, restored afterwards (a test may change it)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def digits_train() -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_dataset("digits", "train")
    return ds.tensors[0], ds.tensors[1]


@pytest.fixture(scope="session")
def digits_test() -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_dataset("digits", "test")
    return ds.tensors[0], ds.tensors[1]


@pytest.fixture(scope="session")
def trained_digits_model(digits_train: tuple[torch.Tensor, torch.Tensor]) -> NormalizedModel:
    """A normally trained digits CNN (about 97-98 % clean test accuracy), [0, 1] inputs."""
    torch.manual_seed(0)
    spec = get_dataset_spec("digits")
    model = NormalizedModel(small_cnn(), spec.mean, spec.std)
    x, y = digits_train
    return train_plain(model, x, y)


# A model factory file for `audit --model file.py:build` (and two broken ones for error paths).
FACTORY = """
import torch
from torch import nn
from cure_eval.models import NormalizedModel
from cure_eval.data import get_dataset_spec
from cure_eval.testing import small_cnn

def build():
    spec = get_dataset_spec("digits")
    return NormalizedModel(small_cnn(), spec.mean, spec.std)

def nan_model():
    class NaN(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 10), float("nan"))
    return NaN()

def raises():
    raise RuntimeError("cannot build: weights server down")
"""


@pytest.fixture(scope="session")
def factory_and_weights(tmp_path_factory: pytest.TempPathFactory, trained_digits_model: torch.nn.Module) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("factory")
    (d / "mymodel.py").write_text(FACTORY)
    weights = d / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in trained_digits_model.state_dict().items()}, str(weights))
    return d / "mymodel.py", weights


@pytest.fixture(scope="session")
def factory_argv(factory_and_weights: tuple[Path, Path]) -> list[str]:
    """Audit arguments selecting FACTORY's ``build`` with the trained weights."""
    path, weights = factory_and_weights
    return ["--model", f"{path}:build", "--weights", str(weights)]
