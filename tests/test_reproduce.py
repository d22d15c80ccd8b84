"""``python -m cure_eval.reproduce`` on a tiny setting: every stage runs and the report is complete.

(The claims themselves need the default setting; with one epoch of a tiny model they are not
expected to hold, and the report says so.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cure_eval.reproduce import main

pytestmark = pytest.mark.slow  # trains and audits four models


def test_tiny_reproduction_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "repro"
    rc = main(["--depth", "10", "--widen", "1", "--train-n", "256", "--pretrain-epochs", "1", "--epochs", "1",
               "--n", "30", "--masking-n", "30", "--geometry-n", "2", "--spsa-iterations", "5",
               "--methods", "cure,pgd_at", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["methods"] == ["standard", "cure", "pgd_at"]
    for name in res["methods"]:
        a = res["audits"][name]
        assert set(a["attacks"]) >= {"fgsm", "pgd7", "pgd20", "pgd40", "pgd100", "apgd-ce", "apgd-dlr", "deepfool_linf", "spsa"}
        assert a["masking"]["verdict"] in ("pass", "suspect")
        assert len(a["geometry"]["top_eigenvalues"]) > 0
        assert (out / "audit" / name / "per_sample.csv").is_file()
    assert res["training_cost"]["standard"]["relative_to_standard"] == 1.0
    assert {c["claim"] for c in res["claims"]} >= {"no gradient masking is flagged for CURE"}
    report = (out / "report.md").read_text()
    for needle in ("Table 1/2 layout", "PGD(100)", "SPSA", "worst case", "profiles.png", "eps_curves.png",
                   "audit/cure/masking_scatter.png", "Training cost"):
        assert needle in report, needle
    for png in ("profiles.png", "eps_curves.png", "audit/cure/masking_scatter.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
