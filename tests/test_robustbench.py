"""``--model robustbench:NAME``: RobustBench models through the official package (the optional
extra), offline. Which tests run depends on the install: the core install has no robustbench
(one-line error saying how to install it); ``tox -e robustbench`` runs this file with the real
package, again after torchattacks (whose wheel ships an old robustbench copy at the same paths)
is reinstalled last, and again after robustbench is reinstalled."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
import torch

from cure_eval.audit import main
from cure_eval.errors import CureEvalError, UsageError
from cure_eval.models.robustbench import (
    REPAIR_HINT,
    alias_autoattack,
    load_robustbench_model,
    robustbench_distribution,
)

#: A model-zoo entry (the CURE authors' is on the leaderboard only: see test_the_cure_paper_...).
NAME = "Standard"


def _state() -> str:
    try:
        robustbench_distribution()
    except CureEvalError as exc:
        return "missing" if "needs the robustbench package" in str(exc) else "replaced"
    return "intact"


STATE = _state()


def _fake_dist(site: Path, content: bytes, recorded: bytes) -> None:
    """A robustbench distribution whose RECORD lists the hash of ``recorded`` for a file holding ``content``."""
    (site / "robustbench").mkdir(parents=True)
    (site / "robustbench" / "__init__.py").write_bytes(content)
    info = site / "robustbench-1.1.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: robustbench\nVersion: 1.1.1\n")
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
    (info / "RECORD").write_text(f"robustbench/__init__.py,sha256={digest},{len(recorded)}\n"
                                 f"robustbench-1.1.1.dist-info/RECORD,,\n")


def test_replaced_files_are_detected(tmp_path: Path) -> None:
    _fake_dist(tmp_path / "ok", b"from .utils import load_model\n", b"from .utils import load_model\n")
    assert robustbench_distribution(path=[str(tmp_path / "ok")]).version == "1.1.1"
    _fake_dist(tmp_path / "bad", b"import pkg_resources\n", b"from .utils import load_model\n")
    with pytest.raises(CureEvalError, match="torchattacks") as info:
        robustbench_distribution(path=[str(tmp_path / "bad")])
    assert REPAIR_HINT in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CureEvalError, match=r"cure-eval\[robustbench\]"):
        robustbench_distribution(path=[str(tmp_path / "nothing")])


def test_robustbench_finds_autoattack_under_its_old_name() -> None:
    """robustbench 1.1.1 imports ``autoattack``; its declared dependency installs ``pyautoattack``."""
    import importlib
    import sys

    import pyautoattack

    had = "autoattack" in sys.modules
    alias_autoattack()
    try:
        assert importlib.import_module("autoattack").AutoAttack is pyautoattack.AutoAttack
        assert importlib.import_module("autoattack.state").EvaluationState is pyautoattack.state.EvaluationState
        assert alias_autoattack() is False  # once is enough
    finally:
        if not had:
            for name in [m for m in sys.modules if m == "autoattack" or m.startswith("autoattack.")]:
                del sys.modules[name]


@pytest.mark.parametrize("name", ["Moosavi-Dezfooli2019", "Moosavi-Dezfooli2019Robustness"])
def test_the_cure_paper_is_on_the_leaderboard_only(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's example name: one line saying why nothing can load it, in every install state."""
    assert main(["--model", f"robustbench:{name}", "--model-dir", "nowhere", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "38.50 % AutoAttack" in err and "no weights" in err and "--checkpoint" in err


@pytest.mark.skipif(STATE != "missing", reason="robustbench is installed")
def test_without_the_extra_one_line_says_how_to_install(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", f"robustbench:{NAME}", "--model-dir", "nowhere", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "cure-eval[robustbench]"' in err


@pytest.mark.skipif(STATE != "replaced", reason="robustbench's files are its own (or it is missing)")
def test_files_replaced_by_torchattacks_one_line_says_how_to_repair(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", f"robustbench:{NAME}", "--model-dir", "nowhere", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and REPAIR_HINT in err


intact = pytest.mark.skipif(STATE != "intact", reason="needs the robustbench extra, its files intact")


@intact
def test_unknown_name_missing_checkpoint_and_bad_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match="unknown RobustBench model 'Moosavi2019'"):
        load_robustbench_model("Moosavi2019", model_dir=tmp_path)
    with pytest.raises(UsageError, match="unknown RobustBench threat model"):
        load_robustbench_model("Standard", model_dir=tmp_path, threat_model="L3")
    with pytest.raises(CureEvalError, match="pass `download=True`") as info:
        load_robustbench_model("Standard", model_dir=tmp_path)
    assert str(tmp_path / "cifar10" / "Linf" / "Standard.pt") in str(info.value)
    assert not any(tmp_path.rglob("*.pt"))  # nothing was downloaded
    assert main(["--model", "robustbench:Standard", "--model-dir", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--download" in err


@intact
def test_offline_checkpoint_in_robustbenchs_layout(tmp_path: Path) -> None:
    """A checkpoint written from the architecture RobustBench builds for the name loads through
    robustbench.utils.load_model, offline, and gives that network's logits on [0, 1] images."""
    # robustbench 1.1.1 imports `autoattack` on import: alias it as the loader does (under xdist
    # this test may run on a worker where no other test has imported robustbench first).
    alias_autoattack()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    zoo = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]
    name = NAME
    torch.manual_seed(0)
    net = zoo[name]["model"]().eval()
    path = tmp_path / "cifar10" / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": net.state_dict()}, path)  # tensors only: loads with weights_only=True
    model, desc = load_robustbench_model(name, model_dir=tmp_path)
    assert desc["source"] == "robustbench" and desc["model"] == name and desc["robustbench"] == "1.1.1"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    assert not model.training


@intact
def test_audit_command_on_a_robustbench_model(tmp_path: Path) -> None:
    """The issue's command shape, offline: synthetic CIFAR-10 files, a checkpoint in RobustBench's layout."""
    import json

    alias_autoattack()  # as in test_offline_checkpoint_in_robustbenchs_layout
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    from cure_eval.data.synthetic import write_cifar10

    zoo = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]
    name = NAME
    torch.manual_seed(0)
    path = tmp_path / "models" / "cifar10" / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True)
    torch.save(zoo[name]["model"]().state_dict(), path)
    write_cifar10(tmp_path / "data")
    out = tmp_path / "audit"
    assert main(["--model", f"robustbench:{name}", "--model-dir", str(tmp_path / "models"), "--dataset", "cifar10",
                 "--data-dir", str(tmp_path / "data"), "--n", "4", "--attacks", "fgsm", "--out", str(out),
                 "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["source"] == "robustbench" and res["dataset"] == "cifar10" and res["n"] == 4
