"""The gradient-masking check on real models and real attacks.

Three models mask gradients on purpose, each wrapping the normally trained digits CNN: shattered
(input rounded to 8 levels, zero gradient), vanishing (logits ×10⁴, cross-entropy gradient
underflows to 0) and stochastic (input noise at inference). Each must be ``suspect`` with the
right findings FAILing; the normal model and a CURE fine-tuned copy must ``pass``.

Small settings keep the file fast (80 points, SPSA 40 iterations; the audit default is 100).
Set ``CURE_EVAL_DOCS_IMG=docs/img`` to regenerate the scatter plots of ``docs/masking.md`` from
full-size runs (200 points, SPSA 100 iterations).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import cure_eval.masking.run as masking_run
from cure_eval.attacks import run_suite
from cure_eval.data import get_dataset_spec, select_points
from cure_eval.errors import UsageError
from cure_eval.masking import (
    Finding,
    MaskingReport,
    check_eps_monotone,
    check_gradients,
    check_probability_outputs,
    check_randomised_forward,
    gradient_free_points,
    pgd_trajectory,
    run_masking_check,
    still_improving,
)
from cure_eval.testing import NoGradient, NoisyInput, QuantizedInput, SaturatedLogits
from cure_eval.training.cure import cure_terms

EPS = 32 / 255
ALPHA = get_dataset_spec("digits").pgd_alpha / 255
N = 80
STD = get_dataset_spec("digits").std[0]  # the digits normalisation inside the model
SPSA_ITERS = 40
STATUSES = {"PASS", "WARN", "FAIL"}
ALL_CHECKS = ["spsa_vs_pgd", "square_vs_pgd", "fgsm_vs_pgd", "eps_monotone", "unbounded", "random_noise",
              "gradients", "randomised_forward", "probability_outputs", "pgd_convergence"]


def _check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw: object) -> MaskingReport:
    args: dict[str, object] = {"eps": EPS, "device": "cpu", "pgd_alpha": ALPHA,
                               "spsa_iterations": SPSA_ITERS, "progress": False}
    args.update(kw)
    return run_masking_check(model, x, y, **args)  # type: ignore[arg-type]


def _failed(report: MaskingReport) -> set[str]:
    return {f.name for f in report.failed}


# --------------------------------------------------------------------------------------------
# Models and reports (computed once per module).
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def points(digits_test: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_test
    return x[:N], y[:N]


@pytest.fixture(scope="module")
def cure_model(trained_digits_model: nn.Module, digits_train: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    """The normal CNN fine-tuned with CURE: Adam 1e-3, 5 epochs (~2 s), h = 0.5 and γ = 1 in [0, 1]
    pixel units, i.e. h = 0.5/std and γ = 1/std² in the normalised units CURE takes."""
    model = copy.deepcopy(trained_digits_model)
    x, y = digits_train
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(5):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            terms = cure_terms(model, x[idx], y[idx], h=0.5 / STD)
            opt.zero_grad()
            (terms.loss + 1.0 / STD**2 * terms.reg).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def normal_report(trained_digits_model: nn.Module, points: tuple[torch.Tensor, torch.Tensor]) -> MaskingReport:
    trained_digits_model.train()  # the check must hand the model back in train mode
    try:
        report = _check(trained_digits_model, *points)
        assert trained_digits_model.training
        assert all(m.training for m in trained_digits_model.modules())
    finally:
        trained_digits_model.eval()
    return report


@pytest.fixture(scope="module")
def cure_report(cure_model: nn.Module, points: tuple[torch.Tensor, torch.Tensor]) -> MaskingReport:
    return _check(cure_model, *points)


# --------------------------------------------------------------------------------------------
# Honest models pass.
# --------------------------------------------------------------------------------------------
def test_cure_model_is_more_robust(trained_digits_model: nn.Module, cure_model: nn.Module,
                                   digits_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits_test
    acc = {name: run_suite(m, x[:200], y[:200], eps=EPS, device="cpu", attacks=["pgd20"],
                           pgd_alpha=ALPHA, progress=False).attacks["pgd20"].robust_accuracy
           for name, m in (("normal", trained_digits_model), ("cure", cure_model))}
    # measured: normal 31.5 %, CURE 62 %
    assert acc["cure"] >= acc["normal"] + 0.15, acc


@pytest.mark.parametrize("which", ["normal", "cure"])
def test_honest_models_pass(which: str, request: pytest.FixtureRequest) -> None:
    report: MaskingReport = request.getfixturevalue(f"{which}_report")
    assert report.verdict == "pass", report.format_table()
    assert not report.failed
    assert [f.name for f in report.findings] == ALL_CHECKS
    for f in report.findings:
        assert f.status in STATUSES and isinstance(f.value, float) and "\n" not in f.message
    # deterministic, logits, usable gradients, converged, unbounded attack succeeds: exactly
    for name in ("gradients", "randomised_forward", "probability_outputs", "unbounded"):
        assert report.finding(name).status == "PASS" and report.finding(name).value == 0.0
    assert report.finding("spsa_vs_pgd").value <= 0.05  # measured 0-2.9 % on honest models


# --------------------------------------------------------------------------------------------
# Models that mask gradients on purpose are caught, by the right checks.
# --------------------------------------------------------------------------------------------
def test_shattered_gradients_suspect(trained_digits_model: nn.Module,
                                     points: tuple[torch.Tensor, torch.Tensor]) -> None:
    report = _check(QuantizedInput(trained_digits_model, levels=8), *points)
    assert report.verdict == "suspect"
    assert {"gradients", "unbounded", "spsa_vs_pgd"} <= _failed(report), report.format_table()
    assert report.finding("gradients").details["zero"] == report.finding("gradients").details["points"]
    assert report.finding("unbounded").value == 1.0  # PGD cannot leave the clean input
    assert report.finding("spsa_vs_pgd").value > 0.5  # measured 88-96 %: Fig. 7 points far below y = x
    assert report.finding("random_noise").status in ("WARN", "FAIL")  # measured 3.9-10.4 %
    for name in ("randomised_forward", "probability_outputs"):
        assert report.finding(name).status == "PASS"


def test_vanishing_gradients_suspect(trained_digits_model: nn.Module,
                                     points: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = SaturatedLogits(trained_digits_model, scale=1e4)
    x, y = points
    # the cross-entropy gradient really is exactly 0 in float32 at the clean points
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(xr), y, reduction="sum"), xr)
    correct = model(x).argmax(1) == y
    assert bool((g[correct].flatten(1) == 0).all())
    report = _check(model, x, y)
    assert report.verdict == "suspect"
    assert {"gradients", "unbounded", "spsa_vs_pgd"} <= _failed(report), report.format_table()
    assert report.finding("spsa_vs_pgd").details["spsa_beats_pgd_fraction"] > 0.3  # measured 44-65 %
    assert report.finding("randomised_forward").status == "PASS"  # 1e4-scaled logits, still deterministic


def test_stochastic_model_suspect(trained_digits_model: nn.Module,
                                  points: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(0)
    report = _check(NoisyInput(trained_digits_model, sigma=0.1), *points)
    assert report.verdict == "suspect"
    assert "randomised_forward" in _failed(report), report.format_table()
    assert report.finding("randomised_forward").value > 0.01  # measured 0.24-0.34
    # its gradients exist and an unbounded attack works: those checks must not cry wolf
    assert report.finding("gradients").status == "PASS"
    assert report.finding("unbounded").status == "PASS"


# --------------------------------------------------------------------------------------------
# Single checks on cheap models.
# --------------------------------------------------------------------------------------------
def test_probability_outputs(trained_digits_model: nn.Module, points: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = points
    probs = nn.Sequential(trained_digits_model, nn.Softmax(dim=1))
    assert check_probability_outputs(probs, x, device="cpu").status == "FAIL"
    assert check_probability_outputs(probs, x, device="cpu").value == 1.0
    assert check_probability_outputs(trained_digits_model, x, device="cpu").status == "PASS"


class _NaNGrad(nn.Module):
    """sqrt at 0 on the input: infinite derivative, NaN after the chain rule with a 0."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(torch.sqrt(x) ** 2)
        return out


def test_gradients_broken_graph_and_nan(trained_digits_model: nn.Module,
                                        points: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = points
    broken = check_gradients(NoGradient(trained_digits_model), x, y, device="cpu")
    assert broken.status == "FAIL" and broken.value == 1.0 and broken.details["graph_broken"]
    nan = check_gradients(_NaNGrad(trained_digits_model), x, y, device="cpu")  # digits have exact 0 pixels
    assert nan.status == "FAIL" and nan.details["nonfinite"] > 0
    ok = check_gradients(trained_digits_model, x, y, device="cpu", eps=EPS)
    assert ok.status == "PASS" and ok.value == 0.0


def test_randomised_forward_scale_free(trained_digits_model: nn.Module,
                                       points: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = points
    assert check_randomised_forward(SaturatedLogits(trained_digits_model), x, device="cpu").value == 0.0
    f = check_randomised_forward(NoisyInput(trained_digits_model, sigma=0.01), x, device="cpu")
    assert f.status == "FAIL"  # even small noise is a randomised model


def test_eps_monotone_statuses() -> None:
    eps = [8 / 255, 16 / 255, 32 / 255]
    assert check_eps_monotone(eps=eps, robust_accuracy=[0.9, 0.5, 0.1]).status == "PASS"
    assert check_eps_monotone(eps=eps, robust_accuracy=[0.9, 0.91, 0.1]).status == "WARN"
    rising = check_eps_monotone(eps=eps, robust_accuracy=[0.5, 0.6, 0.9])
    assert rising.status == "FAIL" and rising.value == pytest.approx(0.3)
    # 4 %: two points out of 50 FAIL, a single point out of 25 does not
    assert check_eps_monotone(eps=eps, robust_accuracy=[0.5, 0.54, 0.1], n=50).status == "FAIL"
    assert check_eps_monotone(eps=eps, robust_accuracy=[0.5, 0.54, 0.1], n=25).status == "WARN"
    # order of the inputs does not matter
    assert check_eps_monotone(eps=eps[::-1], robust_accuracy=[0.1, 0.5, 0.9]).status == "PASS"


def test_still_improving() -> None:
    t = torch.arange(101, dtype=torch.float32)
    flat_end = torch.minimum(t, torch.tensor(50.0))  # converged at step 50
    rising = t.clone()  # still rising at the end
    oscillating = torch.minimum(t, torch.tensor(50.0)) + 3 * (t % 2) * (t > 50)  # sign-PGD bounce
    constant = torch.ones(101)  # zero gradient: nothing moves (caught by the gradient check)
    got = still_improving(torch.stack([flat_end, rising, oscillating, constant]))
    assert got.tolist() == [False, True, False, False]


def test_pgd_trajectory_is_torchattacks_pgd(trained_digits_model: nn.Module,
                                            points: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The convergence check's own PGD loop follows the suite's PGD(100) iterate for iterate."""
    x, y = points
    x, y = x[:40], y[:40]
    suite = run_suite(trained_digits_model, x, y, eps=EPS, device="cpu", attacks=["pgd100"],
                      pgd_alpha=ALPHA, seed=3, progress=False)
    idx = suite.clean_correct.nonzero().flatten()
    tr = pgd_trajectory(trained_digits_model, x[idx], y[idx], eps=EPS, alpha=ALPHA, steps=100,
                        device="cpu", seed=3)
    assert torch.allclose(tr.x_adv, suite.attacks["pgd100"].x_adv[idx], atol=1e-6)
    assert tr.loss.shape == (len(idx), 101)
    assert torch.equal(tr.fooled[:, -1], suite.attacks["pgd100"].success[idx])


# --------------------------------------------------------------------------------------------
# Plumbing: reuse of a suite, the report's outputs.
# --------------------------------------------------------------------------------------------
def test_reuses_suite_and_matches_own_run(trained_digits_model: nn.Module, points: tuple[torch.Tensor, torch.Tensor],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = points
    x, y = x[:50], y[:50]
    own = _check(trained_digits_model, x, y, spsa_iterations=20)
    assert own.settings["ran"] == ["fgsm", "pgd40", "pgd100", "spsa", "square"]
    suite = run_suite(trained_digits_model, x, y, eps=EPS, device="cpu",
                      attacks=["fgsm", "pgd7", "pgd40", "pgd100", "spsa"], pgd_alpha=ALPHA,
                      spsa_iterations=20, progress=False)
    real_run_suite = masking_run.run_suite

    def only_square(*a: object, attacks: list[str], **k: object) -> object:
        if attacks != ["square"]:  # Square is never reused (its random squares are drawn per batch)
            raise AssertionError(f"the masking check attacked again with {attacks} instead of reusing the suite")
        return real_run_suite(*a, attacks=attacks, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(masking_run, "run_suite", only_square)
    reused = _check(trained_digits_model, x, y, spsa_iterations=20, suite=suite)
    assert reused.settings["reused_from_suite"] == ["fgsm", "pgd40", "pgd100", "spsa"]
    assert reused.settings["ran"] == ["square"]
    assert [f.to_dict() for f in reused.findings] == [f.to_dict() for f in own.findings]
    # a cascade suite is not reused (its per-attack results cover only some points)
    cascade = run_suite(trained_digits_model, x, y, eps=EPS, device="cpu", attacks=["fgsm"],
                        cascade=True, pgd_alpha=ALPHA, progress=False)
    assert masking_run._reusable(cascade, x, y, EPS) == []


def test_gradient_free_subset_is_seeded_and_point_for_point_the_full_run(
        trained_digits_model: nn.Module, points: tuple[torch.Tensor, torch.Tensor]) -> None:
    """SPSA and Square run on a seeded subset of the checked points; SPSA's per-point streams make
    each subset point's result the one a run on all points gives it."""
    assert [gradient_free_points(n) for n in (1, 10, 40, 80, 161, 360)] == [1, 10, 10, 10, 11, 23]
    assert gradient_free_points(50, "all") == 50 and gradient_free_points(50, 7) == 7 and gradient_free_points(5, 7) == 5
    for bad in (0, -3, "some", True):
        with pytest.raises(UsageError, match="spsa_n"):
            gradient_free_points(50, bad)  # type: ignore[arg-type]
    x, y = points[0][:24], points[1][:24]
    report = _check(trained_digits_model, x, y, spsa_iterations=4, spsa_n=6)
    sub = torch.tensor(report.settings["gradient_free_indices"])
    assert len(sub) == 6 and torch.equal(sub, select_points(24, 6, 0))
    full = run_suite(trained_digits_model, x, y, eps=EPS, device="cpu", attacks=["spsa"], pgd_alpha=ALPHA,
                     spsa_iterations=4, progress=False).attacks["spsa"]
    on_sub = torch.isfinite(report.spsa_margin)
    assert set(on_sub.nonzero().flatten().tolist()) <= set(sub.tolist())
    # the same SPSA run per point (the margins agree to float32 noise: the batches differ)
    assert torch.allclose(report.spsa_margin[on_sub], full.margin[on_sub].float(), rtol=1e-5, atol=1e-5)
    assert report.square_margin is not None and bool(torch.isfinite(report.square_margin[sub][full.attacked[sub]]).all())
    sq = report.finding("square_vs_pgd")
    assert sq.details["attacked"] == int((report.clean_correct[sub]).sum()) and sq.status in ("PASS", "WARN")


def test_report_outputs(normal_report: MaskingReport, cure_report: MaskingReport, tmp_path: Path) -> None:
    d = normal_report.to_dict()
    json.dumps(d, allow_nan=False)  # strict JSON
    assert d["verdict"] == "pass" and len(d["findings"]) == len(ALL_CHECKS)
    for f in d["findings"]:
        assert set(f) == {"name", "status", "value", "threshold", "message"}
    table = cure_report.format_table()
    assert "PASS" in table.splitlines()[0] and all(name in table for name in ALL_CHECKS)
    out = cure_report.plot_scatter(tmp_path / "sub" / "scatter.png")
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    correct = cure_report.clean_correct
    assert bool(torch.isfinite(cure_report.pgd_margin[correct]).all())
    assert bool(torch.isnan(cure_report.spsa_margin[~correct]).all())


def test_finding_to_dict() -> None:
    f = Finding("x", "WARN", float("nan"), 0.1, "m", {"a": torch.tensor([1.0, float("inf")])})
    assert f.to_dict()["value"] is None
    assert f.to_dict(details=True)["details"] == {"a": [1.0, None]}


def test_usage_errors(trained_digits_model: nn.Module, points: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = points
    with pytest.raises(masking_run.UsageError):
        run_masking_check(trained_digits_model, x, y, eps=0.0, device="cpu")
    with pytest.raises(masking_run.UsageError):
        run_masking_check(trained_digits_model, x, y, eps=EPS, device="cpu", spsa_iterations=0)


# --------------------------------------------------------------------------------------------
# The figures of docs/masking.md (only when asked: CURE_EVAL_DOCS_IMG=docs/img).
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.environ.get("CURE_EVAL_DOCS_IMG"), reason="set CURE_EVAL_DOCS_IMG to regenerate docs/img")
def test_write_doc_scatter_plots(cure_model: nn.Module, trained_digits_model: nn.Module,
                                 digits_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    out = Path(os.environ["CURE_EVAL_DOCS_IMG"])
    x, y = digits_test
    x, y = x[:200], y[:200]
    for name, model in (("cure", cure_model), ("shattered", QuantizedInput(trained_digits_model))):
        report = _check(model, x, y, spsa_iterations=100)
        report.plot_scatter(out / f"masking_scatter_{name}.png")
        print(f"\n{name}: {report.seconds:.1f}s\n{report.format_table()}")


def test_the_test_models_old_names_still_resolve_with_a_warning() -> None:
    import cure_eval.masking as masking
    import cure_eval.testing as testing

    with pytest.warns(DeprecationWarning, match="moved to cure_eval.testing.NoisyInput"):
        assert masking.NoisyInput is testing.NoisyInput



def test_square_vs_pgd_counts_by_hand_and_never_fails() -> None:
    """Square's per-point comparison with PGD(100): hand-checkable shares; WARN at most (the
    verdict stays the SPSA check's)."""
    from cure_eval.masking import check_square_vs_pgd

    clean = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0])
    pgd = torch.tensor([0.5, 0.5, -0.1, 0.5, 0.5])
    attacked = torch.tensor([True, True, True, True, False])
    agree = check_square_vs_pgd(pgd_margin=pgd, square_margin=pgd + 0.01, clean_margin=clean, attacked=attacked)
    assert agree.status == "PASS" and agree.value == 0.0
    # points 0, 1: 0.6 below PGD (> 0.2 × 1), point 1 fooled by Square only; point 4 not attacked
    sq = torch.tensor([-0.1, -0.1, -0.2, 0.45, -5.0])
    f = check_square_vs_pgd(pgd_margin=pgd, square_margin=sq, clean_margin=clean, attacked=attacked)
    assert f.value == pytest.approx(2 / 4) and f.details["square_beats_pgd"] == 2
    assert f.details["square_robust_accuracy"] == pytest.approx(1 / 4)
    assert f.status == "WARN" and f.value > f.threshold
