"""The documented GPU commands for the paper's settings start and run real steps on the CPU.

Each command is read from the "The paper's setting on a GPU" block of docs/gpu.md and run unchanged,
with smoke-test flags appended (argparse keeps the last value): two training images of a tiny
data set in torchvision's on-disk format, batch 2, one epoch of the normal model and one of the
method, one evaluation point. The models are the full-size ResNet-18 and WRN-28-10."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest

from cure_eval.core.io import read_jsonl
from cure_eval.data.synthetic import write_cifar10, write_svhn
from cure_eval.defend import main

GPU_DOC = Path(__file__).resolve().parents[1] / "docs" / "gpu.md"
SMOKE = ["--train-n", "2", "--batch-size", "2", "--pretrain-batch-size", "2", "--epochs", "1",
         "--pretrain-epochs", "1", "--eval-n", "1", "--device", "cpu", "--no-progress"]


def documented_gpu_commands() -> list[list[str]]:
    text = GPU_DOC.read_text(encoding="utf-8")
    section = text[text.index("## The paper's setting on a GPU"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "no bash block in the GPU section of docs/gpu.md"
    cmds = []
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            argv = shlex.split(line)
            assert argv[:3] == ["python", "-m", "cure_eval.defend"], line
            cmds.append(argv[3:])
    return cmds


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


COMMANDS = documented_gpu_commands()


def test_the_docs_document_cure_and_pgd_at_for_each_paper_setting() -> None:
    settings = {(_flag(c, "--dataset"), _flag(c, "--model"), _flag(c, "--method")) for c in COMMANDS}
    assert settings == {(d, m, meth) for d, m in [("cifar10", "resnet18"), ("cifar10", "wide_resnet"), ("svhn", "resnet18")]
                        for meth in ("cure", "pgd_at")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, n_per_batch=2)
    write_svhn(root, "train", 4)
    write_svhn(root, "test", 2, seed=2)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("argv", COMMANDS, ids=["-".join(_flag(c, f) for f in ("--dataset", "--model", "--method")) for c in COMMANDS])
def test_documented_gpu_command_runs_one_real_step_on_cpu(argv: list[str], data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # --download stays: the files are present, so nothing is fetched (the test machine is offline)
    rc = main([*argv, *SMOKE, "--data-dir", str(data_dir), "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    method = _flag(argv, "--method")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_config"]["name"] == ("wide_resnet28_10" if "wide_resnet" in argv else "cifar_resnet18")
    if "--preset" in argv:
        assert cfg["preset"] == "paper" and cfg["method_config"]["optimizer"] == "adam"
    for stage in ("standard", method):
        rows = read_jsonl(out / stage / "metrics.jsonl")
        assert [r["epoch"] for r in rows] == [1] and math.isfinite(rows[0]["loss"]), stage
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"standard", method}
    assert res["eps_255"] == pytest.approx(12 if "svhn" in argv else 8)
