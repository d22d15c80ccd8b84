"""The attack suite against a really trained model: equal to the libraries called directly."""

from __future__ import annotations

import json
import math

import foolbox
import pytest
import torch
import torchattacks

import cure_eval.attacks.suite as suite_mod
from cure_eval.attacks import (
    ATTACKS,
    SuiteResult,
    check_adversarial,
    eps_sweep,
    run_attack,
    run_suite,
    suite_rows,
    suite_summary,
)
from cure_eval.attacks.base import AttackOutput
from cure_eval.attacks.fgsm import FGSM
from cure_eval.errors import CureEvalError, UsageError

EPS = 32 / 255
SEED = 5
SPSA_ITERS = 30  # fewer than the default 100: enough for these assertions, keeps the test fast



@pytest.fixture(scope="module")
def points(trained_digits_model, digits_test) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """60 correctly classified test points plus every misclassified one (at most 6)."""
    x, y = digits_test
    with torch.no_grad():
        wrong = (trained_digits_model(x).argmax(1) != y).nonzero().flatten()
    right = (trained_digits_model(x).argmax(1) == y).nonzero().flatten()
    idx = torch.sort(torch.cat([right[:60], wrong[:6]])).values
    assert len(wrong) >= 1
    return idx, x[idx], y[idx]


@pytest.fixture(scope="module")
def full(trained_digits_model, points) -> SuiteResult:
    idx, x, y = points
    return run_suite(trained_digits_model, x, y, eps=EPS, device="cpu", seed=SEED, batch_size=256,
                     spsa_iterations=SPSA_ITERS, indices=idx, progress=False)


def correct_mask(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def test_pgd20_equals_torchattacks_called_directly(trained_digits_model, points, full):
    _, x, y = points
    model = trained_digits_model
    ok = correct_mask(model, x, y)
    torch.manual_seed(SEED)
    adv = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=20)(x[ok], y[ok])
    with torch.no_grad():
        robust_direct = model(adv).argmax(1) == y[ok]
    res = full.attacks["pgd20"]
    assert int(res.robust.sum()) == int(robust_direct.sum())
    assert res.robust_accuracy == pytest.approx(float(robust_direct.sum()) / len(x))
    assert torch.equal(res.x_adv[ok], adv)
    assert torch.equal(res.robust[ok], robust_direct)
    # the whole family came from one trajectory, each equal to its own torchattacks run
    for name, k in (("pgd7", 7), ("pgd100", 100)):
        torch.manual_seed(SEED)
        ref = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=k)(x[ok], y[ok])
        assert torch.equal(full.attacks[name].x_adv[ok], ref)


@pytest.mark.parametrize("name", ["deepfool_linf", "deepfool_l2"])
def test_deepfool_equals_foolbox_called_directly(trained_digits_model, points, full, name):
    _, x, y = points
    model = trained_digits_model
    ok = correct_mask(model, x, y)
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device="cpu")
    cls = foolbox.attacks.L2DeepFoolAttack if name == "deepfool_l2" else foolbox.attacks.LinfDeepFoolAttack
    attack = cls()
    eps = full.eps_l2 if name == "deepfool_l2" else EPS
    raw, clipped, success = attack(fmodel, x[ok], y[ok], epsilons=[None, eps])
    dist = attack.distance(x[ok], raw[0])
    min_norm = torch.where(success[0], dist, torch.full_like(dist, math.inf))
    res = full.attacks[name]
    assert torch.allclose(res.extra["min_norm"][ok], min_norm, atol=1e-6)
    assert int(res.robust.sum()) == int((~success[1]).sum())
    assert res.robust_accuracy == pytest.approx(float((~success[1]).sum()) / len(x))
    # robust at ε ⟺ minimal perturbation larger than ε (here without exceptions)
    assert torch.equal(res.robust[ok], min_norm > eps)
    assert torch.equal(res.x_adv[ok], clipped[1])


def test_misclassified_points_are_not_attacked(full, points):
    _, x, y = points
    wrong = full.clean_pred != y
    assert int(wrong.sum()) >= 1
    for name, res in full.attacks.items():
        assert torch.equal(res.attacked, ~wrong), name
        assert not res.robust[wrong].any() and not res.success[wrong].any()
        assert torch.equal(res.x_adv[wrong], x[wrong])
        assert torch.all(res.linf[wrong] == 0)
        if "min_norm" in res.extra:
            assert torch.all(res.extra["min_norm"][wrong] == 0)


def test_every_attack_ran_and_stays_in_the_ball(full, points):
    _, x, _ = points
    assert list(full.attacks) == list(ATTACKS)
    for name, res in full.attacks.items():
        eps = full.eps_l2 if name == "deepfool_l2" else EPS
        norm = res.l2 if name == "deepfool_l2" else res.linf
        assert float(norm.max()) <= eps + 1e-5, name
        assert float(res.x_adv.min()) >= 0 and float(res.x_adv.max()) <= 1
        assert res.seconds > 0
        assert int(res.robust.sum()) <= int(full.clean_correct.sum())
    # the attack is not trivially weak on a normally trained model
    assert full.attacks["pgd100"].robust_accuracy < 0.8 * full.clean_accuracy
    assert full.attacks["pgd100"].robust_accuracy <= full.attacks["pgd20"].robust_accuracy + 0.05
    # the margin is measured at the returned point and agrees with the prediction there
    for res in full.attacks.values():
        att = res.attacked
        assert torch.equal(res.margin[att] < 0, res.success[att] & (res.margin[att] < 0))
        assert torch.all(res.margin[res.success] <= 0)
        assert torch.all(res.margin[res.robust] >= 0)
    spsa = full.attacks["spsa"]
    att = spsa.attacked
    assert torch.allclose(spsa.extra["spsa_margin"][att], spsa.margin[att], atol=1e-4)


def test_epsilon_ball_violation_raises(points):
    _, x, _ = points
    check_adversarial(x, x, eps=EPS)
    with pytest.raises(CureEvalError, match="outside the linf"):
        check_adversarial(x, (x + 2 * EPS).clamp(0, 1), eps=EPS, name="broken")
    bumped = x.clone()
    bumped[0, 0, 0, 0] = x[0, 0, 0, 0] + EPS + 1e-3
    with pytest.raises(CureEvalError):
        check_adversarial(x, bumped.clamp(0, 1), eps=EPS)
    with pytest.raises(CureEvalError, match="outside \\[0, 1\\]"):
        check_adversarial(x, x - 0.01, eps=0.1)
    with pytest.raises(CureEvalError, match="l2"):
        check_adversarial(x, (x + 0.05).clamp(0, 1), eps=0.06, norm="l2")
    with pytest.raises(CureEvalError, match="NaN"):
        check_adversarial(x, x * float("nan"), eps=EPS)
    # within tolerance: fine
    check_adversarial(x, (x + EPS + 5e-6).clamp(0, 1), eps=EPS)


def test_broken_attack_inside_the_suite_raises_and_restores_mode(
    trained_digits_model, points, monkeypatch
):
    _, x, y = points
    model = trained_digits_model

    def broken_fgsm(self, ctx, xs, ys, ids):
        return AttackOutput(x_adv=(xs + 3 * EPS).clamp(0, 1), seconds=0.0)  # ignores the ε-ball

    monkeypatch.setattr(FGSM, "run", broken_fgsm)
    model.train()
    try:
        with pytest.raises(CureEvalError, match="fgsm returned .* outside the linf ε-ball"):
            run_suite(model, x, y, eps=EPS, device="cpu", attacks=["fgsm"], progress=False)
        assert model.training, "the caller's train mode was not restored"
    finally:
        model.eval()


def test_restores_train_mode(trained_digits_model, points):
    _, x, y = points
    model = trained_digits_model
    model.train()
    try:
        res = run_attack("fgsm", model, x, y, eps=EPS, device="cpu", progress=False)
        assert model.training
    finally:
        model.eval()
    assert res.name == "fgsm" and len(res.robust) == len(x)


def test_worst_case_is_per_point(full):
    # The rule is checked on hand-built cases in test_suite_rules.py (a point broken by one attack
    # only, a PGD point fooled at an earlier iterate); here, on a real run: a worst-case robust
    # point is robust under every attack, and a PGD success was fooled at its best iterate too.
    for res in full.attacks.values():
        assert not (full.worst_case & ~res.worst_case_robust).any()
        if "best_fooled" in res.extra:
            assert bool((res.extra["best_fooled"][res.success] == 1).all())
    assert not (full.worst_case & ~full.clean_correct).any()
    assert full.worst_case_accuracy == pytest.approx(float(full.worst_case.double().mean()))
    summary = full.summary()
    for name, res in full.attacks.items():
        assert int(full.worst_case.sum()) <= int(res.robust.sum())
        assert full.worst_case_accuracy <= summary["attacks"][name]["robust_accuracy"]
    # per point, not the minimum of the means: strictly below it whenever attacks disagree
    assert summary["worst_case_accuracy"] <= min(a["robust_accuracy"] for a in summary["attacks"].values())


def test_cascade_matches_full_worst_case(trained_digits_model, points, full):
    idx, x, y = points
    casc = run_suite(trained_digits_model, x, y, eps=EPS, device="cpu", seed=SEED, cascade=True,
                     spsa_iterations=SPSA_ITERS, indices=idx, progress=False)
    assert casc.cascade and casc.summary()["cascade"] is True
    assert list(casc.attacks) == [a for a in suite_mod.CASCADE_ORDER]
    n = len(x)
    # same attacks, later ones only on survivors: equal up to PGD's random starts (different
    # subsets draw different starts); SPSA is seeded per point
    assert abs(casc.worst_case_accuracy - full.worst_case_accuracy) <= 2 / n + 1e-9
    # the cascade rule is checked on hand-built cases in test_suite_rules.py (an attack skipped,
    # a later attack on the survivors only); here, on a real run: no attack touched a point an
    # earlier one had broken, and the worst case is what survived the last attack
    for name, res in casc.attacks.items():
        assert not (res.attacked & ~casc.clean_correct).any(), name
        later = list(casc.attacks)[list(casc.attacks).index(name) + 1:]
        broken = res.attacked & ~res.worst_case_robust
        assert all(not (casc.attacks[b].attacked & broken).any() for b in later), name
    last = casc.attacks[list(casc.attacks)[-1]]
    assert not (casc.worst_case & ~last.worst_case_robust & last.attacked).any()
    attacked = [int(r.attacked.sum()) for r in casc.attacks.values()]
    assert attacked == sorted(attacked, reverse=True)
    assert sum(attacked) < sum(int(r.attacked.sum()) for r in full.attacks.values())
    summary = casc.summary()
    cum = [summary["attacks"][a]["cumulative_robust_accuracy"] for a in casc.attacks]
    assert cum == sorted(cum, reverse=True) and cum[-1] == casc.worst_case_accuracy
    assert all(summary["attacks"][a]["robust_accuracy"] is None for a in casc.attacks)


def test_rows_and_summary(full, points):
    idx, x, _ = points
    rows = suite_rows(full)
    n = len(x)
    assert len(rows) == n * (1 + len(full.attacks))
    keys = {"index", "label", "clean_pred", "attack", "adv_pred", "success", "adv_loss", "linf", "l2",
            "robust", "attacked", "min_norm", "broken_by", "best_fooled", "forward_share", "backward_share"}
    assert all(set(r) == keys for r in rows)
    assert [r["index"] for r in rows[:n]] == idx.tolist()
    by_attack: dict[str, list[dict]] = {}
    for r in rows:
        by_attack.setdefault(r["attack"], []).append(r)
    assert set(by_attack) == {"clean", *full.attacks}
    for name, res in full.attacks.items():
        rs = by_attack[name]
        assert [r["robust"] for r in rs] == res.robust.tolist()
        assert [r["adv_loss"] for r in rs] == pytest.approx(res.margin.tolist())
        assert all(r["success"] == (r["attacked"] and r["adv_pred"] != r["label"]) for r in rs)
    assert all(r["min_norm"] is None or r["min_norm"] >= 0 for r in by_attack["deepfool_linf"])
    for r in by_attack["pgd100"]:  # fooled at the returned point, or at an earlier iterate
        assert (r["best_fooled"] is None) == (not r["attacked"])
        if r["success"]:
            assert r["best_fooled"] is True
    json.dumps(rows)  # JSON-ready (no inf/nan objects)

    s = suite_summary(full)
    assert {"n", "eps", "seed", "clean_accuracy", "attacks", "worst_case_accuracy", "cascade",
            "versions"} <= set(s)
    assert s["n"] == n and s["eps"] == pytest.approx(EPS) and s["seed"] == SEED and s["cascade"] is False
    assert set(s["versions"]) == {"torch", "torchattacks", "foolbox", "timm", "pyautoattack"}
    assert set(s["attacks"]) == set(ATTACKS)
    for entry in s["attacks"].values():
        assert 0.0 <= entry["robust_accuracy"] <= 1.0 and entry["seconds"] > 0
    assert 0.0 <= s["worst_case_accuracy"] <= s["clean_accuracy"] <= 1.0
    json.dumps(s)


def test_eps_sweep_and_run_attack_agree_with_the_suite(trained_digits_model, points, full):
    idx, x, y = points
    sweep = eps_sweep(trained_digits_model, x, y, [8 / 255, 16 / 255, EPS], device="cpu",
                      steps=20, seed=SEED, progress=False)
    assert sweep.robust_accuracy[-1] == pytest.approx(full.attacks["pgd20"].robust_accuracy)
    assert torch.equal(sweep.robust[-1], full.attacks["pgd20"].robust)
    assert sweep.monotone and sweep.robust_accuracy == sorted(sweep.robust_accuracy, reverse=True)
    assert sweep.clean_accuracy == full.clean_accuracy
    one = run_attack("pgd20", trained_digits_model, x, y, eps=EPS, device="cpu", seed=SEED,
                     progress=False)
    assert torch.equal(one.robust, full.attacks["pgd20"].robust)
    spsa = run_attack("spsa", trained_digits_model, x, y, eps=EPS, device="cpu", seed=SEED,
                      spsa_iterations=SPSA_ITERS, indices=idx, progress=False)
    assert torch.equal(spsa.robust, full.attacks["spsa"].robust)


def test_bad_arguments(trained_digits_model, points):
    _, x, y = points
    m = trained_digits_model
    with pytest.raises(UsageError, match="unknown attack"):
        run_suite(m, x, y, eps=EPS, device="cpu", attacks=["pgd13"], progress=False)
    with pytest.raises(UsageError):
        run_suite(m, x, y, eps=8.0, device="cpu", progress=False)
    with pytest.raises(UsageError, match="threat model"):
        run_suite(m, x, y, eps=EPS, device="cpu", attacks=["deepfool_l2"], eps_l2=1.0, cascade=True,
                  progress=False)
    with pytest.raises(CureEvalError):
        run_suite(m, x * 255, y, eps=EPS, device="cpu", progress=False)


def test_large_l2_radius_is_left_out_of_the_worst_case(trained_digits_model, points):
    _, x, y = points
    res = run_suite(trained_digits_model, x, y, eps=EPS, device="cpu", attacks="fgsm,deepfool_l2",
                    eps_l2=2.0, progress=False)
    assert res.worst_case_attacks == ["fgsm"]
    assert torch.equal(res.worst_case, res.attacks["fgsm"].robust)
    assert float(res.attacks["deepfool_l2"].l2.max()) <= 2.0 + 1e-5


def test_works_under_no_grad_and_with_nothing_to_attack(trained_digits_model, points):
    _, x, y = points
    wrong = (y + 1) % 10  # every point misclassified
    with torch.no_grad():
        res = run_suite(trained_digits_model, x[:8], wrong[:8], eps=EPS, device="cpu",
                        spsa_iterations=2, progress=False)
        ok = run_suite(trained_digits_model, x[:4], y[:4], eps=EPS, device="cpu",
                       attacks=["pgd7", "deepfool_linf"], progress=False)
    assert res.clean_accuracy == 0.0 and res.worst_case_accuracy == 0.0
    assert all(not r.attacked.any() for r in res.attacks.values())
    assert len(suite_rows(res)) == 8 * (1 + len(ATTACKS))
    assert ok.attacks["pgd7"].attacked.any()
    assert float(ok.attacks["pgd7"].linf.max()) > 0  # PGD really ran (autograd was re-enabled)
