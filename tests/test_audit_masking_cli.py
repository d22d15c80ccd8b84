"""``audit --masking-check`` end to end: a masked model gets `suspect` (and exit 3 with
--fail-on-masking), the normal model `pass`, and the verdict lands in results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cure_eval.audit import main

FACTORY = """
from pathlib import Path
from safetensors.torch import load_file
from torch import nn
from cure_eval.data import get_dataset_spec
from cure_eval.testing import QuantizedInput, small_cnn
from cure_eval.models import NormalizedModel

def _normal():
    spec = get_dataset_spec("digits")
    model = NormalizedModel(small_cnn(), spec.mean, spec.std)
    model.load_state_dict(load_file(str(Path(__file__).with_name("weights.safetensors"))))
    return model

def normal():
    return _normal()

def shattered():
    return QuantizedInput(_normal(), levels=8)
"""


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory, trained_digits_model: torch.nn.Module) -> Path:
    d = tmp_path_factory.mktemp("masking_factory")
    save_file({k: v.contiguous() for k, v in trained_digits_model.state_dict().items()}, str(d / "weights.safetensors"))
    (d / "models.py").write_text(FACTORY)
    return d / "models.py"


@pytest.mark.parametrize("name,verdict,code", [("normal", "pass", 0), ("shattered", "suspect", 3)])
def test_masking_verdict_and_exit_code(tmp_path: Path, factory: Path, name: str, verdict: str, code: int) -> None:
    out = tmp_path / name
    rc = main(["--model", f"{factory}:{name}", "--n", "60", "--attacks", "fgsm,pgd40,pgd100,spsa",
               "--spsa-iterations", "30", "--masking-check", "--fail-on-masking", "--out", str(out), "--no-progress"])
    assert rc == code
    res = json.loads((out / "results.json").read_text())
    m = res["masking"]
    assert m["verdict"] == verdict
    for f in m["findings"]:
        assert set(f) >= {"name", "status", "value", "threshold"} and f["status"] in ("PASS", "WARN", "FAIL")
    failed = {f["name"] for f in m["findings"] if f["status"] == "FAIL"}
    if verdict == "suspect":
        assert {"gradients", "unbounded"} <= failed
    else:
        assert not failed
    assert (out / "masking_scatter.png").read_bytes()[:4] == b"\x89PNG"
