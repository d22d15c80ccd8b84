"""``save_adversarials``: the worst-case adversarial examples an audit writes lie in the ε-ball and
[0, 1] and reproduce the recorded adversarial prediction when fed back to the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from cure_eval.attacks.validity import EPS_TOL
from cure_eval.auditing import AuditOptions, audit_model
from cure_eval.data import get_dataset_spec, load_dataset, select_points

SPEC = get_dataset_spec("digits")


@pytest.mark.parametrize("resumable", [True, False])
def test_saved_adversarials_are_valid_and_reproduce_the_prediction(tmp_path: Path, trained_digits_model: nn.Module,
                                                                    resumable: bool) -> None:
    opts = AuditOptions(n=24, batch_size=8, attacks=["fgsm", "pgd20"], seed=1, save_adversarials=True)  # 3 chunks
    summary = audit_model(trained_digits_model, SPEC, {"source": "test"}, opts, tmp_path, device=torch.device("cpu"),
                          progress=False, resumable=resumable)
    t = load_file(str(tmp_path / "adversarials.safetensors"))
    with safe_open(str(tmp_path / "adversarials.safetensors"), "pt") as f:
        meta = f.metadata()
    eps = float(meta["eps"])
    assert eps == pytest.approx(32 / 255) and meta["units"] == "[0, 1]"
    names = json.loads(meta["attacks"])
    assert names == ["fgsm", "pgd20"]
    test = load_dataset("digits", "test")
    idx = select_points(len(test), opts.n, opts.seed)
    x, y = test.tensors[0][idx], test.tensors[1][idx]
    assert torch.equal(t["index"], idx.long()) and torch.equal(t["label"], y.long())
    x_adv = t["x_adv"]
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    assert float((x_adv - x).abs().max()) <= eps + EPS_TOL
    with torch.no_grad():
        pred = trained_digits_model(x_adv).argmax(1)
    assert torch.equal(pred, t["adv_pred"])
    # every point the worst case counts as broken by a returned point is saved broken, by that attack
    rows = {(r["attack"], int(r["index"])): r for r in _csv(tmp_path / "per_sample.csv")}
    broken = t["adv_pred"] != t["label"]
    assert int(broken.sum()) > 0
    for i in range(len(y)):
        fooled = [a for a in names if rows[(a, int(idx[i]))]["success"] == "True"]
        if fooled and int(t["attack"][i]) >= 0:
            assert names[int(t["attack"][i])] == fooled[0] and broken[i]
    assert summary["adversarials"]["broken"] == int((broken & (t["attack"] >= 0)).sum())
    assert (tmp_path / "adversarials.png").stat().st_size > 0


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))
