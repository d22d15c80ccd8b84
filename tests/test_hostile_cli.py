"""Hostile and mistaken input across the CLIs: one line, the right exit code, no traceback unless --debug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cure_eval.audit import main as audit_main
from cure_eval.data import get_dataset_spec
from cure_eval.errors import CureEvalError
from cure_eval.models import create_model, model_config_for
from cure_eval.models.checkpoint import CheckpointInfo, save_checkpoint


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = model_config_for("wide_resnet", get_dataset_spec("digits"), depth=10, widen=1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "model.safetensors"
    save_checkpoint(path, create_model(cfg).eval(), CheckpointInfo(model=cfg, dataset="digits", method="standard"))
    return path


def _last_line(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_checkpoint_for_another_input_shape_is_refused(tmp_path: Path, digits_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert audit_main(["--checkpoint", str(digits_ckpt), "--dataset", "cifar10", "--out", str(tmp_path)]) == 1
    line = _last_line(capsys)
    assert line.startswith("error: ") and "--dataset" in line and "channels" in line


def test_truncated_checkpoint_via_cli(tmp_path: Path, digits_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(digits_ckpt.read_bytes()[:1000])
    assert audit_main(["--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 1
    line = _last_line(capsys)
    assert "truncated" in line or "corrupt" in line
    assert not (tmp_path / "o" / "results.json").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(CureEvalError):
        audit_main(["--checkpoint", str(tmp_path / "missing"), "--debug"])


@pytest.mark.slow
def test_subprocess_exit_codes_and_no_traceback(tmp_path: Path) -> None:
    for argv, code in ((["--eps", "999"], 2), (["--checkpoint", str(tmp_path / "nope")], 1)):
        res = subprocess.run([sys.executable, "-m", "cure_eval.audit", *argv, "--out", str(tmp_path / "o")],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == code, res.stderr
        assert "Traceback" not in res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith("error: ")
