"""Checkpoints: atomic safetensors with metadata, rebuilt from the file alone, never unpickled."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from cure_eval.data import get_dataset_spec
from cure_eval.errors import CureEvalError
from cure_eval.models import create_model, model_config_for
from cure_eval.models.checkpoint import (
    CheckpointInfo,
    load_checkpoint,
    load_weights_file,
    read_checkpoint_info,
    save_checkpoint,
)


def _saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    spec = get_dataset_spec("digits")
    cfg = model_config_for("wide_resnet", spec, depth=10, widen=1)
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, CheckpointInfo(model=cfg, dataset="digits", method="cure",
                                                method_config={"gamma": 4.0}, epoch=3))
    return path, model


def test_roundtrip_rebuilds_model_from_file_alone(tmp_path: Path) -> None:
    path, model = _saved(tmp_path)
    loaded, info = load_checkpoint(path)
    assert info.method == "cure" and info.epoch == 3 and info.dataset == "digits"
    assert info.model.kwargs == {"depth": 10, "widen_factor": 1}
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert not loaded.training
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left behind


def test_run_folder_resolves_to_method_checkpoint(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path / "cure")
    (tmp_path / "results.json").write_text('{"method": "cure"}')
    _, info = load_checkpoint(tmp_path)
    assert info.path == str(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_checkpoints_give_one_line_errors(tmp_path: Path, damage: str) -> None:
    path, _ = _saved(tmp_path)
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    else:
        path.unlink()
    with pytest.raises(CureEvalError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    other = create_model(model_config_for("wide_resnet", get_dataset_spec("digits"), depth=10, widen=2))
    meta = {"cure_eval": __import__("json").dumps(read_checkpoint_info(path).to_dict())}
    save_file(state, str(path), metadata=meta)
    with pytest.raises(CureEvalError, match="does not fit"):
        from cure_eval.models.checkpoint import load_state

        load_state(other, state, source=str(path))


class _Exploit:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.target, "w"))


def test_crafted_pickle_is_refused_and_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"weight": _Exploit(str(marker))}, fh, protocol=2)
    with pytest.raises(CureEvalError, match="refusing"):
        load_weights_file(evil)
    assert not marker.exists()
    with pytest.raises(CureEvalError):
        load_checkpoint(evil)
    assert not marker.exists()
    # the same payload unpickled naively would have written the file: the test is meaningful
    with open(evil, "rb") as fh:
        pickle.load(fh)
    assert marker.exists()
    os.unlink(marker)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """A checkpoint, a train state and a results file get the mode a plain ``open()`` would give."""
    from cure_eval.core.io import write_json_atomic
    from cure_eval.models.checkpoint import save_train_state

    old = os.umask(umask)
    try:
        path, _ = _saved(tmp_path)
        save_train_state(tmp_path / "train_state.pt", {"epoch": 1})
        write_json_atomic(tmp_path / "results.json", {"n": 1})
        with open(tmp_path / "plain.txt", "w") as fh:  # the reference: what open() gives
            fh.write("x")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == expected
    for name in (path.name, "train_state.pt", "results.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
