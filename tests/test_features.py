"""Feature sensitivity and confidence (``audit --features``, Jia, Li & Wen 2020) on exact cases:
a linear layer's sensitivity is ‖Wδ‖/‖δ‖, the power iteration gives the exact SVD's top singular
values, the confidence summaries of hand-made logits; the layers found on timm networks; and one
end-to-end CLI run (JSON keys, figures, not-applicable and bad-name paths)."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from cure_eval.audit import main as audit_main
from cure_eval.auditing.report import write_features_comparison
from cure_eval.data import get_dataset_spec
from cure_eval.errors import NotApplicable, UsageError
from cure_eval.features import (
    LOGITS,
    compute_features,
    confidence_summary,
    default_layers,
    jacobian_singular_values,
    layer_sensitivity,
    random_sign_delta,
    resolve_layers,
)
from cure_eval.models import NormalizedModel, create_model, model_config_for

CPU = torch.device("cpu")
SPEC = get_dataset_spec("digits")


def _linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).double().eval()


def test_linear_layer_sensitivity_is_the_operator_norm_along_delta() -> None:
    model = _linear_model()
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    rnd = random_sign_delta(x, eps=0.1, seed=3)
    adv = torch.randn(6, 1, 4, 4, dtype=torch.float64) * 0.05
    ratios = layer_sensitivity(model, x, {"random": rnd, "adversarial": adv}, layers=["1", LOGITS], device=CPU,
                               batch_size=4)
    w = model[1].weight.detach()
    for kind, d in (("random", rnd), ("adversarial", adv)):
        flat = d.flatten(1)
        expected = (flat @ w.T).norm(dim=1) / flat.norm(dim=1)  # ‖Wδ‖/‖δ‖: the bias cancels
        torch.testing.assert_close(ratios[kind]["1"], expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(ratios[kind][LOGITS], expected, rtol=1e-12, atol=0)
        assert (ratios[kind]["1"] <= torch.linalg.matrix_norm(w, ord=2) + 1e-12).all()
    # the random δ: ±ε per pixel, except where clipping to [0, 1] shortens it
    moved = x + rnd
    assert torch.all(((rnd.abs() - 0.1).abs() < 1e-12) | (moved <= 1e-12) | (moved >= 1 - 1e-12))
    assert torch.all((moved >= 0) & (moved <= 1 + 1e-12))
    assert torch.equal(rnd, random_sign_delta(x, eps=0.1, seed=3))  # seeded


def test_zero_delta_gives_nan_not_a_ratio() -> None:
    model = _linear_model()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    r = layer_sensitivity(model, x, {"adversarial": torch.zeros_like(x)}, layers=[LOGITS], device=CPU)
    assert torch.isnan(r["adversarial"][LOGITS]).all()


def test_power_iteration_matches_the_exact_svd() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 6)).double().eval()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    sig = jacobian_singular_values(net, x, layers=["1", LOGITS], device=CPU, k=3, iterations=60, seed=0)
    for i in range(len(x)):
        xi = x[i:i + 1]
        for layer, fn in (("1", lambda z: net[1](net[0](z))), (LOGITS, net)):
            jac = torch.autograd.functional.jacobian(lambda z, fn=fn: fn(z).flatten(), xi).reshape(-1, xi.numel())
            exact = torch.linalg.svdvals(jac)[:3]
            torch.testing.assert_close(sig[layer][i], exact, rtol=1e-6, atol=1e-9)
    assert not net.training  # mode kept
    # a linear layer: the singular values of W, at any point
    lin = _linear_model()
    s = jacobian_singular_values(lin, x, layers=["1"], device=CPU, k=2, iterations=60)
    torch.testing.assert_close(s["1"], torch.linalg.svdvals(lin[1].weight.detach())[:2].expand(2, 2),
                               rtol=1e-8, atol=1e-10)


def test_confidence_summary_of_hand_made_logits() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 5.0], [3.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 1])
    c = confidence_summary(logits, labels=labels, margin_threshold=1.0, bins=4)
    e = math.e
    top = sorted([e**2 / (e**2 + 2), e / (2 * e + 1), e**5 / (e**5 + 2), e**3 / (e**3 + e + 1)])
    assert c["top_probability"]["median"] == pytest.approx((top[1] + top[2]) / 2, rel=1e-12)
    assert c["top_probability"]["mean"] == pytest.approx(sum(top) / 4, rel=1e-12)
    assert c["logit_margin"]["median"] == pytest.approx(2.0)  # margins 2, 0, 5, 2
    assert c["logit_margin"]["mean"] == pytest.approx(9 / 4)
    assert c["share_below_margin"] == pytest.approx(0.25)  # only the tie
    assert c["accuracy"] == pytest.approx(0.5)  # argmax picks class 0 in the tie; row 4 is wrong
    assert c["logit_margin"]["hist_edges"] == pytest.approx([0, 1.25, 2.5, 3.75, 5])
    assert c["logit_margin"]["hist_counts"] == [1, 2, 0, 1]
    assert sum(c["top_probability"]["hist_counts"]) == 4
    assert c["top_probability_correct"]["n"] == 2
    assert confidence_summary(logits, margin_threshold=2.5)["share_below_margin"] == pytest.approx(0.75)
    with pytest.raises(UsageError):
        confidence_summary(torch.zeros(3))


def test_default_layers_of_timm_networks() -> None:
    wrn = create_model(model_config_for("wide_resnet", SPEC))  # our WRN-16-4: conv1 and three stages
    assert default_layers(wrn) == ["model.conv1", "model.layers.0", "model.layers.1", "model.layers.2", LOGITS]
    resnet = NormalizedModel(timm.create_model("resnet18", num_classes=10, in_chans=1), SPEC.mean, SPEC.std)
    assert default_layers(resnet) == ["model.act1", "model.layer1", "model.layer2", "model.layer3", "model.layer4",
                                      LOGITS]  # timm's feature_info
    assert resolve_layers(resnet, ["layer2", "model.fc", LOGITS]) == ["model.layer2", "model.fc", LOGITS]
    with pytest.raises(UsageError, match="no module 'nope'.*valid names: logits, model"):
        resolve_layers(resnet, ["nope"])
    with pytest.raises(NotApplicable, match="`layers`"):
        default_layers(_linear_model())


def test_audit_features_cli(tmp_path: Path, factory_argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    common = [*factory_argv, "--n", "40", "--batch-size", "40", "--attacks", "pgd20,deepfool_l2", "--features",
              "--features-n", "12", "--threads", "1", "--no-progress", "--quiet"]
    out = tmp_path / "named"
    assert audit_main([*common, "--features-layers", "0,4,logits", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    f = res["features"]
    assert f["layers"] == ["model.0", "model.4", LOGITS]
    assert 0 < f["n_points"] <= 12
    for lay in f["layers"]:
        e = f["sensitivity"][lay]
        assert e["random"]["median"] > 0 and e["adversarial"]["median"] > 0
        assert e["anisotropy"]["n"] == f["n_points"] and len(e["jacobian_sigma"]) == 3
    # the suite's PGD(20) points, replayed: their ℓ2 equals the suite's per-point record
    match = re.search(r"equal to the suite's record on ([0-9.]+) %", f["adversarial_delta"])
    assert match is not None and float(match.group(1)) >= 90.0
    assert f["seconds"]["pgd_replay"] > 0
    assert f["confidence"]["n"] == 40 and 0 <= f["confidence"]["share_below_margin"] <= 1
    assert f["min_perturbation"]["n"] > 0 and f["min_perturbation"]["median"] > 0
    full = json.loads((out / "features.json").read_text())
    assert len(full["per_point"]["random"][LOGITS]) == f["n_points"]
    for name in ("features_sensitivity.png", "features_confidence.png"):
        assert (out / name).stat().st_size > 1000
    assert "Feature sensitivity" in (out / "results.md").read_text() and "model.4" in capsys.readouterr().out
    # the small CNN (an nn.Sequential) has no nameable stage: not applicable, the rest kept
    bare = tmp_path / "bare"
    assert audit_main([*common, "--out", str(bare)]) == 0
    res = json.loads((bare / "results.json").read_text())
    assert res["features"]["status"] == "not_applicable" and "`layers`" in res["features"]["reason"]
    assert res["attacks"]["pgd20"]["robust_accuracy"] is not None
    capsys.readouterr()
    # an unknown module: a one-line error before any attack runs, exit 2
    assert audit_main([*common, "--features-layers", "0,nope", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no module 'nope'" in err and "valid names" in err
    assert not (tmp_path / "bad" / "audit_state.json").exists()


def test_a_tempered_model_is_less_sensitive_and_less_confident_side_by_side(
    tmp_path: Path, trained_digits_model: nn.Module, digits_test: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Halving the last layer halves the logits: the random-δ logit sensitivity and every logit
    margin halve exactly, the first layer is unchanged, the confidence drops; the comparison
    across models draws one line per model and appends both tables to comparison.md."""
    x, y = digits_test[0][:30], digits_test[1][:30]
    cool = copy.deepcopy(trained_digits_model)
    with torch.no_grad():
        cool.model[-1].weight.mul_(0.5)
        cool.model[-1].bias.mul_(0.5)
    kw = {"device": CPU, "eps": 32 / 255, "pgd_alpha": 4 / 255, "layers": ["0", LOGITS], "n_points": 10,
          "jacobian_points": 2, "progress": False}
    ra = compute_features(trained_digits_model, x, y, label="normal", **kw)  # type: ignore[arg-type]
    rb = compute_features(cool, x, y, label="tempered", **kw)  # type: ignore[arg-type]
    assert ra["indices"] == rb["indices"] and ra["layers"] == ["model.0", LOGITS]
    pa, pb = ra["per_point"]["random"], rb["per_point"]["random"]
    assert pb[LOGITS] == pytest.approx([0.5 * v for v in pa[LOGITS]], rel=1e-5)
    assert pb["model.0"] == pytest.approx(pa["model.0"], rel=1e-6)
    sa, sb = ra["sensitivity"][LOGITS], rb["sensitivity"][LOGITS]
    assert sb["jacobian_sigma"] == pytest.approx([0.5 * v for v in sa["jacobian_sigma"]], rel=1e-4)
    ca, cb = ra["confidence"], rb["confidence"]
    assert cb["logit_margin"]["median"] == pytest.approx(0.5 * ca["logit_margin"]["median"], rel=1e-5)
    assert cb["top_probability"]["median"] < ca["top_probability"]["median"]
    assert cb["share_below_margin"] >= ca["share_below_margin"]
    (tmp_path / "comparison.md").write_text("| model | clean |\n")
    write_features_comparison(tmp_path, {"normal": {"features": ra}, "tempered": {"features": rb},
                                         "other": {"features": {"status": "not_applicable", "reason": "x"}}})
    text = (tmp_path / "comparison.md").read_text()
    assert text.startswith("| model | clean |") and "| tempered | logits" in text and "| normal   | model.0" in text
    for name in ("features_sensitivity.png", "features_confidence.png"):
        assert (tmp_path / name).stat().st_size > 1000
