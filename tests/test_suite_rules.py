"""The suite's rules checked against hand-built cases, not against a copy of the rule: the worst
case (a point broken by one attack only, a PGD point fooled at an earlier iterate, an ℓ2 attack at a
larger radius left out) and the cascade (an attack skipped when nothing is left to attack, a later
attack run only on the survivors), through the one implementation in :mod:`cure_eval.attacks.units`."""

from __future__ import annotations

import math

import torch

from cure_eval.attacks import MemoryStore, assemble, make_plan, run_units
from cure_eval.attacks.units import run_clean_unit

EPS = 32 / 255
NAN = math.nan
Y = torch.tensor([0, 1, 2, 3])
CLEAN_PRED = torch.tensor([0, 1, 2, 9])  # point 3 misclassified clean: never attacked, never robust
ATTACKED = torch.tensor([True, True, True, False])


def _attack(adv_pred: list[int], attacked: torch.Tensor = ATTACKED, **extra: list[float]) -> dict:
    n = len(adv_pred)
    return {"attacked": attacked, "adv_pred": torch.tensor(adv_pred), "margin": torch.zeros(n),
            "linf": torch.zeros(n), "l2": torch.zeros(n), "seconds": 0.0,
            "extra": {k: torch.tensor(v) for k, v in extra.items()}}


def _store(units: dict[str, dict[str, dict]]) -> MemoryStore:
    store = MemoryStore()
    store.put("clean/0", {"points": [0, 1, 2, 3], "clean_pred": CLEAN_PRED, "clean_margin": torch.zeros(4),
                          "seconds": 0.0})
    for unit, attacks in units.items():
        store.put(f"{unit}/0", {"points": [0, 1, 2, 3], "seconds": 0.0, "pgd_family_seconds": 0.0,
                                "attacks": attacks})
    return store


def test_a_point_broken_by_one_attack_only_is_not_robust() -> None:
    plan = make_plan(["fgsm", "deepfool_linf"], eps=EPS)
    store = _store({"fgsm": {"fgsm": _attack([0, 1, 2, 9])},  # FGSM breaks nothing
                    "deepfool_linf": {"deepfool_linf": _attack([0, 7, 2, 9], min_norm=[0.5, 0.1, 0.5, 0.0])}})
    res = assemble(plan, store, Y, torch.arange(4))
    assert res.attacks["fgsm"].robust.tolist() == [True, True, True, False]
    assert res.worst_case.tolist() == [True, False, True, False]  # point 1: broken by DeepFool only
    assert res.worst_case_accuracy == 0.5
    assert res.attacks["fgsm"].robust_accuracy == 0.75  # per point, not the minimum of the means
    assert res.worst_case_attacks == ["fgsm", "deepfool_linf"]


def test_a_pgd_point_fooled_at_an_earlier_iterate_counts_as_broken() -> None:
    plan = make_plan(["pgd7", "pgd20"], eps=EPS)
    store = _store({"pgd": {"pgd7": _attack([0, 1, 2, 9], best_fooled=[0.0, 0.0, 0.0, NAN]),
                            "pgd20": _attack([0, 1, 2, 9], best_fooled=[0.0, 1.0, 0.0, NAN])}})
    res = assemble(plan, store, Y, torch.arange(4))
    assert res.attacks["pgd20"].robust.tolist() == [True, True, True, False]  # its own accuracy: last iterate
    assert res.worst_case.tolist() == [True, False, True, False]


def test_an_l2_attack_at_a_larger_radius_is_left_out_of_the_worst_case() -> None:
    units = {"fgsm": {"fgsm": _attack([0, 1, 2, 9])},
             "deepfool_l2": {"deepfool_l2": _attack([5, 1, 2, 9], min_norm=[0.1, 0.5, 0.5, 0.0])}}
    wider = assemble(make_plan(["fgsm", "deepfool_l2"], eps=EPS, eps_l2=2 * EPS), _store(units), Y, torch.arange(4))
    assert wider.worst_case_attacks == ["fgsm"] and wider.worst_case.tolist() == [True, True, True, False]
    assert wider.attacks["deepfool_l2"].eps == 2 * EPS
    inside = assemble(make_plan(["fgsm", "deepfool_l2"], eps=EPS, eps_l2=EPS), _store(units), Y, torch.arange(4))
    assert inside.worst_case_attacks == ["fgsm", "deepfool_l2"] and inside.worst_case.tolist() == [False, True, True, False]


def _cascade(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fgsm_pred: torch.Tensor):
    """A cascade FGSM → SPSA on a real model, with FGSM's record built by hand."""
    plan = make_plan(["fgsm", "spsa"], eps=EPS, cascade=True, spsa_iterations=2, spsa_samples=8)
    store = MemoryStore()
    ids = torch.arange(len(x))
    ctx = plan.context(model, torch.device("cpu"), False, 0, None)
    store.put("clean/0", clean := run_clean_unit(ctx, x, y, ids))
    correct = clean["clean_pred"] == y
    store.put("fgsm/0", {"points": ids.tolist(), "seconds": 0.0, "pgd_family_seconds": 0.0,
                         "attacks": {"fgsm": {**_attack(fgsm_pred.tolist(), attacked=correct),
                                              "margin": clean["clean_margin"], "x_adv": x.clone()}}})
    run_units(model, x, y, ids, plan, store, device=torch.device("cpu"), progress=False)
    return store, assemble(plan, store, y, ids), correct


def test_an_attack_the_cascade_leaves_nothing_to_is_skipped(trained_digits_model, digits_test) -> None:
    x, y = digits_test[0][:12], digits_test[1][:12]
    fooled_all = (y + 1) % 10  # FGSM fooled every clean-correct point
    store, res, correct = _cascade(trained_digits_model, x, y, fooled_all)
    spsa = store.get("spsa/0")["attacks"]["spsa"]
    assert not spsa["attacked"].any() and spsa["seconds"] == 0.0  # SPSA never ran
    assert torch.equal(spsa["x_adv"], x) and (spsa["extra"]["iterations"] == 0).all()
    assert not res.worst_case.any()
    assert res.summary()["attacks"]["spsa"]["cumulative_robust_accuracy"] == 0.0


def test_a_later_cascade_attack_runs_on_the_survivors_only(trained_digits_model, digits_test) -> None:
    x, y = digits_test[0][:12], digits_test[1][:12]
    store, _, correct = _cascade(trained_digits_model, x, y, torch.where(torch.arange(12) < 4, (y + 1) % 10, y))
    spsa = store.get("spsa/0")["attacks"]["spsa"]
    assert correct[4:].any()
    assert spsa["attacked"].tolist() == (correct & (torch.arange(12) >= 4)).tolist()


def test_the_default_audit_suite_never_warns_of_a_short_pgd(trained_digits_model, tmp_path, caplog) -> None:
    """Every step-limited attack of the default suite reaches the ε-ball with the dataset's step
    (digits: 20 × 4/255 ≥ 32/255), so a default audit logs no "cannot travel" warning; the
    presets expand to their lists and the thorough one keeps the old built-ins."""
    import logging

    from cure_eval.attacks import (
        ATTACKS,
        DEFAULT_ATTACKS,
        THOROUGH_ATTACKS,
        expand_presets,
        get_attack,
    )
    from cure_eval.auditing import AuditOptions, audit_model
    from cure_eval.data import get_dataset_spec

    opts = AuditOptions(n=8, batch_size=8)
    assert opts.attacks == list(DEFAULT_ATTACKS) == expand_presets(["default"])
    assert AuditOptions(attacks=["thorough"]).attacks == list(THOROUGH_ATTACKS)
    assert set(ATTACKS) < set(THOROUGH_ATTACKS) and "autoattack" not in THOROUGH_ATTACKS
    assert [get_attack(a).cost for a in DEFAULT_ATTACKS] == sorted(get_attack(a).cost for a in DEFAULT_ATTACKS)
    with caplog.at_level(logging.WARNING):
        summary = audit_model(trained_digits_model, get_dataset_spec("digits"), {"source": "test"}, opts, tmp_path,
                              device=torch.device("cpu"), progress=False, resumable=False)
    assert list(summary["attacks"]) == list(DEFAULT_ATTACKS)
    assert not [r for r in caplog.records if "cannot travel" in r.getMessage()], caplog.text
    # the same check does fire for a step that cannot cross (the thorough list's PGD(7) at 4/255)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        make_plan(["pgd7"], eps=32 / 255, pgd_alpha=4 / 255)
    assert any("cannot travel" in r.getMessage() for r in caplog.records)
