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


def test_default_suite_masking_passes_are_counted_into_the_audit_total(tmp_path: Path, factory: Path,
                                                                        digits_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    """With the default cascade the check runs its own attacks (SPSA and Square on the seeded
    subset): every pass it spends is in ``masking.passes``, equal to a separate count of the same
    check, and ``total_passes`` is the suite's plus the stage's."""
    from cure_eval.attacks.passes import count_passes
    from cure_eval.data import get_dataset_spec, select_points
    from cure_eval.masking import run_masking_check
    from cure_eval.models import load_factory

    out = tmp_path / "default"
    rc = main(["--model", f"{factory}:normal", "--n", "40", "--spsa-iterations", "5", "--masking-check",
               "--masking-spsa-n", "6", "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    m = res["masking"]
    names = [f["name"] for f in m["findings"]]
    assert names[:2] == ["spsa_vs_pgd", "square_vs_pgd"]
    assert m["settings"]["gradient_free_points"] == 6 and len(m["settings"]["gradient_free_indices"]) == 6
    assert m["details"]["spsa_vs_pgd"]["attacked"] <= 6
    total = res["total_passes"]
    assert total["stages"] == {"masking": m["passes"]} and m["passes"]["forward"] > 0 and m["passes"]["backward"] > 0
    for k in ("forward", "backward"):
        assert total[k] == res["passes"][k] + m["passes"][k]
    assert "audit with masking" in (out / "results.md").read_text()

    # the same check on the same points, counted on its own
    spec = get_dataset_spec("digits")
    x, y = digits_test
    idx = select_points(len(x), 40, 0)
    model = load_factory(f"{factory}:normal")
    with count_passes(model) as passes:
        report = run_masking_check(model, x[idx], y[idx], eps=spec.default_eps / 255, device="cpu", spsa_n=6,
                                   pgd_alpha=spec.pgd_alpha / 255, spsa_iterations=5, progress=False)
    assert {"forward": passes.forward, "backward": passes.backward} == m["passes"]
    assert [f.to_dict() for f in report.findings] == m["findings"]
