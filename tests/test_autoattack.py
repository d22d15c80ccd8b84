"""``--attacks autoattack``: the original AutoAttack (pyautoattack) through the attack registry,
checked against ``pyautoattack.AutoAttack`` called directly on the same points with the same seed;
its comparison with the suite's own worst case, the masking finding, and resumed audits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from cure_eval.attacks import get_attack, run_autoattack, run_suite
from cure_eval.audit import main
from cure_eval.data import load_dataset, select_points
from cure_eval.masking import check_suite_vs_autoattack
from cure_eval.testing import NoisyInput

pyautoattack = pytest.importorskip("pyautoattack")  # a core dependency: CI has it

EPS = 16 / 255  # on digits: some points survive APGD-CE, so every sub-attack runs
N = 16


@pytest.fixture(scope="module")
def points() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    test = load_dataset("digits", "test")
    idx = select_points(len(test), N, 3)
    return test.tensors[0][idx], test.tensors[1][idx], idx


@pytest.fixture(scope="module")
def direct(trained_digits_model: torch.nn.Module,
           points: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAttack called directly: the package's standard version, seed 3, the points in one batch."""
    x, y, _ = points
    model = trained_digits_model.eval()
    aa = pyautoattack.AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=3, device="cpu")
    x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=250)
    return x_adv, y_adv


def test_plugin_equals_pyautoattack(trained_digits_model: torch.nn.Module,
                                    points: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                                    direct: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y, idx = points
    model = trained_digits_model.eval()
    rng = torch.get_rng_state()
    res = run_suite(model, x, y, eps=EPS, device="cpu", attacks=["autoattack"], seed=3, indices=idx,
                    progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # the package reseeds the global RNG: not ours
    x_adv, y_adv = direct
    aa = res.attacks["autoattack"]
    correct = res.clean_correct
    assert torch.equal(aa.adv_pred[correct], y_adv[correct])  # per point, the same verdicts
    assert torch.equal(aa.x_adv[correct], x_adv[correct])  # bit for bit, the same points
    assert aa.robust_accuracy == pytest.approx(float((y_adv == y).double().mean()))
    codes = aa.extra["broken_by"]
    assert set(codes[aa.success].tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert bool((codes[aa.robust] == -1).all()) and bool(codes[~correct].isnan().all())
    assert 0 < int(aa.success.sum()) and int(aa.robust.sum()) > 0  # both kinds of points on show
    # worst case over all attacks includes AutoAttack's points
    assert res.worst_case_accuracy == pytest.approx(aa.robust_accuracy)


@pytest.mark.slow
def test_attribution_follows_the_packages_order(trained_digits_model: torch.nn.Module,
                                                points: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                                                direct: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The sub-attack named for a point is the first of the package's own sub-attacks (run alone,
    on all points, from the same seed) that breaks it when run on the points still robust."""
    x, y, _ = points
    model = trained_digits_model.eval()
    run = run_autoattack(model, x, y, eps=EPS, device="cpu", seed=3)
    assert run.sub_attacks == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert torch.equal(run.y_adv, direct[1]) and torch.equal(run.x_adv, direct[0])
    # APGD-CE is first: what it alone breaks on the clean-correct points is what is attributed to it
    correct = model(x).argmax(1) == y
    aa = pyautoattack.AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=3, device="cpu")
    aa.attacks_to_run = ["apgd-ce"]
    _, y_ce = aa.run_standard_evaluation(x, y, batch_size=250)
    assert torch.equal((run.broken_by == 0), correct & (y_ce != y))


@pytest.mark.slow
def test_rand_version_on_a_randomised_model(trained_digits_model: torch.nn.Module,
                                            points: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """``autoattack-rand`` on a genuinely randomised model (fresh input noise at every forward):
    the package's own points and verdicts, bit for bit, as one direct call from the same RNG
    state; every point credited to a sub-attack is one that sub-attack returned."""
    x, y, _ = points
    x, y = x[:6], y[:6]
    model = NoisyInput(trained_digits_model, sigma=0.1).eval()
    run = run_autoattack(model, x, y, eps=EPS, device="cpu", seed=1, version="rand")
    torch.manual_seed(1)  # run_autoattack runs the package inside seeded_rng(seed)
    aa = pyautoattack.AutoAttack(model, norm="Linf", eps=EPS, version="rand", seed=1, device="cpu")
    x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=250)
    assert run.sub_attacks == ("apgd-ce", "apgd-dlr") == get_attack("autoattack-rand").sub_attacks()
    assert torch.equal(run.y_adv, y_adv) and torch.equal(run.x_adv, x_adv)
    broken = run.y_adv != y
    assert bool(broken.any()) and bool((~broken).any())
    credited = run.broken_by >= 0
    assert bool((credited <= broken).all())  # only broken points are credited
    assert bool((run.x_adv[credited] != x[credited]).flatten(1).any(1).all())  # with a perturbed point


@pytest.mark.slow
def test_audit_cli_autoattack_beside_the_suite(tmp_path: Path, factory_argv: list[str],
                                               direct: tuple[torch.Tensor, torch.Tensor],
                                               points: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    out = tmp_path / "audit"
    argv = [*factory_argv, "--n", str(N), "--seed", "3", "--eps", "16", "--attacks", "fgsm,pgd20,autoattack",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    # the audit's points (seed 3) and AutoAttack seeded with --seed: the direct call's numbers
    _, y, idx = points
    _, y_adv = direct
    aa_entry = res["attacks"]["autoattack"]
    assert aa_entry["robust_accuracy"] == pytest.approx(float((y_adv == y).double().mean()))
    assert set(aa_entry["broken_by"]) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert sum(aa_entry["broken_by"].values()) == aa_entry["attacked"] - round(aa_entry["robust_accuracy"] * N)
    comp = res["autoattack_comparison"]["autoattack"]
    assert comp["suite_attacks"] == ["fgsm", "pgd20"]
    assert comp["robust_accuracy"] == pytest.approx(aa_entry["robust_accuracy"])
    assert comp["gap"] == pytest.approx(comp["suite_worst_case_accuracy"] - comp["robust_accuracy"])
    assert comp["gap"] == pytest.approx((len(comp["only_reference"]) - len(comp["only_suite"])) / N)
    assert res["worst_case_accuracy"] <= min(comp["robust_accuracy"], comp["suite_worst_case_accuracy"])
    assert res["versions"]["pyautoattack"].startswith("0.2")
    rows = list(csv.DictReader((out / "per_sample.csv").open()))
    aa_rows = [r for r in rows if r["attack"] == "autoattack"]
    assert len(aa_rows) == N
    for r in aa_rows:
        assert (r["broken_by"] != "") == (r["success"] == "True")
        assert float(r["linf"]) <= 16 / 255 + 1e-5
    by_index = {int(i): int(p) for i, p in zip(idx.tolist(), y_adv.tolist(), strict=True)}
    for r in aa_rows:
        if r["attacked"] == "True":
            assert int(r["adv_pred"]) == by_index[int(r["index"])]
    fooled_only_aa = {int(r["index"]) for r in aa_rows if r["success"] == "True"}
    assert set(comp["only_reference"]) <= fooled_only_aa
    md = (out / "results.md").read_text()
    assert "AutoAttack" in md and "suite's own worst case" in md

    # a rerun resumes from the state and gives the same per-point rows
    before = (out / "per_sample.csv").read_text()
    assert main(argv) == 0
    assert (out / "per_sample.csv").read_text() == before


def test_suite_vs_autoattack_finding() -> None:
    att = torch.tensor([True] * 10 + [False] * 2)
    suite = torch.tensor([True] * 6 + [False] * 4 + [False] * 2)
    aa = torch.tensor([True] * 3 + [False] * 3 + [True] + [False] * 3 + [False] * 2)
    f = check_suite_vs_autoattack(suite_robust=suite, autoattack_robust=aa, attacked=att)
    # 3 of the 10 attacked points broken by AutoAttack only, 1 by the suite only
    assert f.value == pytest.approx(0.3) and f.status == "FAIL"
    assert f.details["only_autoattack"] == 3 and f.details["only_suite"] == 1
    one = check_suite_vs_autoattack(suite_robust=suite, autoattack_robust=suite.clone(), attacked=att)
    assert one.status == "PASS" and one.value == 0.0


@pytest.mark.slow
def test_autoattack_units_from_two_ranks_merge(tmp_path: Path, factory_argv: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A sharded audit's AutoAttack units: chunk by chunk, seeded with --seed, so the units two
    ranks left (one state file each, rank 1's AutoAttack unfinished) resume in one process to the
    same audit, recomputing only the missing unit."""
    import shutil

    from .test_audit_resume import assert_same_audit, computed_units

    # ε = 64/255: APGD-CE breaks every point, so the later sub-attacks have nothing to do (cheap)
    args = ["--n", "8", "--batch-size", "4", "--seed", "3", "--eps", "64", "--attacks", "fgsm,autoattack",
            "--no-progress"]
    single = tmp_path / "single"
    assert main([*factory_argv, *args, "--out", str(single)]) == 0
    state = json.loads((single / "audit_state.json").read_text())
    assert sorted(state["units"]) == ["autoattack/0", "autoattack/1", "clean/0", "clean/1", "fgsm/0", "fgsm/1"]
    out = tmp_path / "ranks"
    out.mkdir()
    rank0 = {k: v for k, v in state["units"].items() if k.endswith("/0")}
    rank1 = {k: v for k, v in state["units"].items() if k.endswith("/1") and k != "autoattack/1"}
    for name, part in (("audit_state.json", rank0), ("audit_state.rank1.json", rank1)):
        (out / name).write_text(json.dumps({**state, "units": part, "stages": {}, "complete": False}))
    shutil.copy(single / "config.json", out / "config.json")
    capsys.readouterr()
    assert main([*factory_argv, *args, "--out", str(out)]) == 0
    assert computed_units(capsys.readouterr().err) == {"autoattack/1"}
    assert_same_audit(out, single)
