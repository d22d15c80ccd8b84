"""One audit path: an audit whose units stay in memory and one whose units go through the file
store (resumable, ``audit_state.json``) run the same units and write the same ``per_sample.csv``
and ``results.json`` (byte for byte, timings set to 0)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cure_eval.auditing import AuditOptions, audit_model
from cure_eval.data import get_dataset_spec

SPEC = get_dataset_spec("digits")


def zero_timings(obj: Any) -> Any:
    """``obj`` with every timing (a key naming seconds) set to 0: they differ from run to run."""
    if isinstance(obj, dict):
        return {k: (0 if "seconds" in k and not isinstance(v, dict) else zero_timings(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [zero_timings(v) for v in obj]
    return obj


def results_bytes(out: Path) -> bytes:
    data = zero_timings(json.loads((out / "results.json").read_text(encoding="utf-8")))
    return json.dumps(data, indent=2).encode()


@pytest.mark.parametrize("cascade", [False, True])
def test_in_memory_and_resumable_audits_are_identical(tmp_path: Path, trained_digits_model: nn.Module,
                                                      cascade: bool) -> None:
    opts = AuditOptions(n=24, batch_size=8, spsa_iterations=5, seed=3, cascade=cascade)  # 3 chunks
    outs = {}
    for resumable in (True, False):
        out = outs[resumable] = tmp_path / f"resumable_{resumable}"
        audit_model(trained_digits_model, SPEC, {"source": "test"}, opts, out, device=torch.device("cpu"),
                    progress=False, resumable=resumable)
    file_store, memory = outs[True], outs[False]
    assert (file_store / "audit_state.json").is_file() and not (memory / "audit_state.json").exists()
    assert (memory / "per_sample.csv").read_bytes() == (file_store / "per_sample.csv").read_bytes()
    assert results_bytes(memory) == results_bytes(file_store)
    summary = json.loads((memory / "results.json").read_text(encoding="utf-8"))
    assert summary["settings"]["chunks"] == 3 and summary["cascade"] is cascade
    assert 0.0 <= summary["worst_case_accuracy"] < summary["clean_accuracy"]


def test_the_default_suite_runs_as_a_cascade_and_other_lists_do_not() -> None:
    """The default list is ordered cheap → strong for a cascade (docs/attacks.md); any other list
    keeps each attack's own column unless asked."""
    from cure_eval.attacks import DEFAULT_ATTACKS

    assert AuditOptions().cascade is True and AuditOptions(attacks=["default"]).cascade is True
    assert tuple(AuditOptions().attacks) == DEFAULT_ATTACKS
    assert AuditOptions(attacks=["fgsm", "pgd20"]).cascade is False
    assert AuditOptions(attacks=["thorough"]).cascade is False
    assert AuditOptions(cascade=False).cascade is False and AuditOptions(attacks=["fgsm"], cascade=True).cascade is True
