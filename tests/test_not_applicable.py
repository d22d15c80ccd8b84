"""A measurement that does not apply to a model is reported as not applicable, with the reason,
and the rest of the audit is kept: one test per optional section (ε sweep, masking, geometry)
and one for the WCI step inside the geometry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cure_eval.auditing.options import AuditOptions
from cure_eval.auditing.pipeline import audit_model
from cure_eval.data import get_dataset_spec
from cure_eval.errors import NotApplicable
from cure_eval.geometry import weight_curvature_index
from cure_eval.models import NormalizedModel
from cure_eval.testing import NoGradient, RawParameterNet

SPEC = get_dataset_spec("digits")
CPU = torch.device("cpu")


def _audit(model: nn.Module, out: Path, **opts: object) -> dict:
    options = AuditOptions(n=20, batch_size=20, spsa_iterations=2, **opts)  # type: ignore[arg-type]
    summary = audit_model(model, SPEC, {"source": "test"}, options, out, device=CPU, progress=False)
    assert json.loads((out / "results.json").read_text())["attacks"].keys() == summary["attacks"].keys()
    return summary


@pytest.mark.parametrize("section,options", [
    ("eps_sweep", {"eps_sweep": [0.0, 8 / 255, 32 / 255]}),
    ("masking", {"masking_check": True}),
    ("geometry", {"geometry": True, "geometry_n": 2}),
    ("features", {"features": True, "features_n": 5, "features_layers": ["logits"]}),
])
def test_section_without_input_gradients_is_not_applicable(
    tmp_path: Path, trained_digits_model: nn.Module, section: str, options: dict[str, object],
) -> None:
    model = NoGradient(trained_digits_model)  # SPSA (gradient-free) applies, nothing gradient-based does
    summary = _audit(model, tmp_path, attacks=["spsa"], **options)
    assert summary[section]["status"] == "not_applicable"
    assert "gradient" in summary[section]["reason"]
    assert summary["attacks"]["spsa"]["robust_accuracy"] is not None  # the suite is kept
    assert 0.0 < summary["clean_accuracy"] <= 1.0
    assert (tmp_path / "per_sample.csv").is_file()
    # a rerun reuses the recorded "not applicable" (no files needed) and rewrites the outputs
    again = _audit(model, tmp_path, attacks=["spsa"], **options)
    assert again[section] == summary[section]


def test_wci_without_conv_linear_weights_keeps_the_curvature(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = NormalizedModel(RawParameterNet(), SPEC.mean, SPEC.std).eval()
    summary = _audit(model, tmp_path, attacks=["fgsm"], geometry=True, geometry_n=2)
    geo = summary["geometry"]
    assert len(geo["top_eigenvalues"]) > 0 and geo["hz_norm"] > 0  # measured before the WCI step: kept
    assert geo["wci"] is None
    assert "no conv/linear weights" in geo["not_applicable"]["wci"]
    assert "weight_curves" in geo["not_applicable"]
    written = json.loads((tmp_path / "geometry.json").read_text())
    assert written["not_applicable"] == geo["not_applicable"] and written["top_eigenvalues"]
    assert "fgsm" in summary["attacks"]


def test_wci_alone_says_not_applicable(digits_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits_test
    with pytest.raises(NotApplicable, match="no conv/linear weights"):
        weight_curvature_index(RawParameterNet(), x[:4], y[:4], eps=8 / 255, device=CPU)
