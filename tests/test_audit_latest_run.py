"""``python -m cure_eval.audit`` with no model: the latest finished ``defend`` run under ``runs/``,
its normal and defended model side by side; with no run there, a one-line error."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from cure_eval.audit import main
from cure_eval.data import get_dataset_spec
from cure_eval.models import create_model, model_config_for
from cure_eval.models.checkpoint import CheckpointInfo, save_checkpoint


def _fake_run(root: Path, name: str, method: str) -> Path:
    """A defend run folder as defend writes it (untrained weights: the audit's plumbing is tested)."""
    spec = get_dataset_spec("digits")
    cfg = model_config_for("wide_resnet", spec, depth=10, widen=1)
    run = root / name
    for m in ("standard", method):
        torch.manual_seed(0)
        save_checkpoint(run / m / "model.safetensors", create_model(cfg),
                        CheckpointInfo(model=cfg, dataset="digits", method=m, epoch=1))
    (run / "results.json").write_text(json.dumps({"dataset": "digits", "method": method}))
    return run


def test_no_model_audits_the_latest_defend_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    old = _fake_run(tmp_path / "runs", "digits_wide_resnet_trades_s0", "trades")
    new = _fake_run(tmp_path / "runs", "digits_wide_resnet_cure_s0", "cure")
    (tmp_path / "runs" / "unfinished").mkdir()  # no results.json: not a finished run
    t = time.time()
    os.utime(old / "results.json", (t - 100, t - 100))
    os.utime(new / "results.json", (t, t))
    assert main(["--attacks", "fgsm", "--n", "8", "--no-progress"]) == 0
    captured = capsys.readouterr()
    out = tmp_path / "runs" / "audit_digits_wide_resnet_cure_s0"
    assert "digits_wide_resnet_cure_s0" in captured.err  # says which run it took
    assert {p.name for p in out.iterdir()} >= {"standard", "cure", "comparison.md"}
    for m in ("standard", "cure"):
        res = json.loads((out / m / "results.json").read_text())
        assert res["model"]["method"] == m and res["n"] == 8
    assert "standard:" in captured.out and "cure:" in captured.out


def test_no_model_and_no_run_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--masking-check", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "python -m cure_eval.defend" in err and "--checkpoint" in err and "--model" in err
