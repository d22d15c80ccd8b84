"""Sharded audits: ``torchrun --nproc_per_node=2 -m cure_eval.audit`` (gloo, CPU) writes exactly
what a single-process audit of the same command writes (timings aside)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchattacks

from cure_eval.attacks.units import CHUNK_SEED_STRIDE as PGD_SEED_STRIDE
from cure_eval.audit import main
from cure_eval.auditing.shard import Shard, shard_from_env
from cure_eval.data import load_dataset, select_points
from cure_eval.errors import CureEvalError

from .test_audit_resume import assert_same_audit, computed_units

pytestmark = pytest.mark.slow  # torchrun

REPO = Path(__file__).resolve().parents[1]
# 40 points in 5 chunks of 8: rank 0 attacks chunks 0, 2, 4, rank 1 chunks 1, 3. Under torchrun
# --n and --h must be spelled --n-points and --fd-step (torchrun's parser takes --n and --h).
# The former default attacks, every one on every point (AutoAttack's units across ranks:
# tests/test_autoattack.py; the default cascade, in memory and through the store: test_audit_paths).
ARGS = ["--n-points", "40", "--batch-size", "8", "--spsa-iterations", "20", "--seed", "2",
        "--attacks", "fgsm,pgd7,pgd20,pgd40,pgd100,apgd-ce,apgd-dlr,deepfool_linf,deepfool_l2,spsa",
        "--eps-sweep", "0,16", "--no-progress"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, factory_argv: list[str]) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "audit"
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--standalone", "--nproc_per_node=2", "-m", "cure_eval.audit", *factory_argv, *ARGS,
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out.parent / "stderr.txt").write_text(proc.stderr)
    return out


def test_two_processes_equal_one(tmp_path: Path, factory_argv: list[str], sharded: Path) -> None:
    log = (sharded.parent / "stderr.txt").read_text()
    assert "rank 0 of 2: chunks 0,2,4 of 5 (24 points)" in log
    # rank 0 computed its own chunks; rank 1's came through the gather
    assert {u.split("/")[1] for u in computed_units(log)} == {"0", "2", "4"}
    assert json.loads((sharded / "config.json").read_text())["world_size"] == 2
    state = json.loads((sharded / "audit_state.json").read_text())
    # clean, fgsm, pgd, 2 APGD, 2 DeepFool, SPSA
    assert state["complete"] and len(state["units"]) == 5 * 8
    assert not list(sharded.glob("audit_state.rank*.json")) and not list(sharded.glob(".*.tmp"))
    assert sorted(p.name for p in sharded.iterdir() if p.name != ".audit_state.lock") == [
        "audit_state.json", "config.json", "eps_sweep.json", "eps_sweep.png", "per_sample.csv",
        "results.json", "results.md"]

    single = tmp_path / "single"
    assert main([*factory_argv, *ARGS, "--out", str(single)]) == 0
    assert_same_audit(sharded, single)  # per_sample.csv byte for byte, results.json but seconds
    assert (sharded / "eps_sweep.json").read_text() == (single / "eps_sweep.json").read_text()
    res = json.loads((sharded / "results.json").read_text())
    assert res["n"] == 40 and set(res["attacks"]) >= {"pgd100", "spsa", "deepfool_l2", "apgd-dlr"}


def test_a_sharded_state_resumes_in_one_process(tmp_path: Path, factory_argv: list[str], sharded: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Killed mid-way, a 2-process audit leaves one state file per rank; any number of processes
    resumes from them."""
    state = json.loads((sharded / "audit_state.json").read_text())
    out = tmp_path / "resumed"
    out.mkdir()
    rank0 = {k: v for k, v in state["units"].items() if int(k.split("/")[1]) % 2 == 0 and not k.startswith("spsa")}
    rank1 = {k: v for k, v in state["units"].items() if int(k.split("/")[1]) % 2 == 1 and k != "spsa/3"}
    for name, part in (("audit_state.json", rank0), ("audit_state.rank1.json", rank1)):
        (out / name).write_text(json.dumps({**state, "units": part, "stages": {}, "complete": False}))
    shutil.copy(sharded / "config.json", out / "config.json")
    capsys.readouterr()
    assert main([*factory_argv, *ARGS, "--out", str(out)]) == 0
    log = capsys.readouterr().err
    assert computed_units(log) == {"spsa/0", "spsa/2", "spsa/3", "spsa/4"}
    assert re.search(r"resuming from audit_state.json, audit_state.rank1.json: reusing 36 finished units", log)
    assert not (out / "audit_state.rank1.json").exists()
    assert_same_audit(out, sharded)


def test_environment_without_torchrun_is_refused() -> None:
    assert shard_from_env({}) == Shard()
    assert shard_from_env({"WORLD_SIZE": "1", "RANK": "0"}) == Shard()
    with pytest.raises(CureEvalError, match="start sharded audits with torchrun"):
        shard_from_env({"WORLD_SIZE": "2"})
    with pytest.raises(CureEvalError, match="not an integer"):
        shard_from_env({"WORLD_SIZE": "two"})
    assert Shard(rank=1, world_size=2).chunks(5) == [1, 3]
    assert Shard(rank=3, world_size=4, local_rank=1).device(torch.device("cuda")) == torch.device("cuda", 1)
    assert Shard().device(torch.device("cuda")) == torch.device("cuda")


def test_pgd_random_start_is_seeded_per_chunk(tmp_path: Path, factory_argv: list[str],
                                              trained_digits_model: torch.nn.Module) -> None:
    """Chunk k's PGD is torchattacks.PGD on the chunk's clean-correct points after
    torch.manual_seed(seed + 1000003·k): whichever process runs it, whenever."""
    out = tmp_path / "a"
    assert main([*factory_argv, "--n", "20", "--batch-size", "8", "--attacks", "pgd20", "--seed", "4", "--no-progress",
                 "--out", str(out)]) == 0
    rows = [r for r in csv.DictReader((out / "per_sample.csv").open()) if r["attack"] == "pgd20"]
    test = load_dataset("digits", "test")
    idx = select_points(len(test), 20, 4)
    x, y = test.tensors[0][idx], test.tensors[1][idx]
    model = trained_digits_model.eval()
    for k, s in enumerate(range(0, 20, 8)):
        xs, ys = x[s:s + 8], y[s:s + 8]
        with torch.no_grad():
            correct = model(xs).argmax(1) == ys
        with torch.random.fork_rng():
            torch.manual_seed(4 + PGD_SEED_STRIDE * k)
            adv = torchattacks.PGD(model, eps=32 / 255, alpha=4 / 255, steps=20)(xs[correct], ys[correct])
        with torch.no_grad():
            pred = model(adv).argmax(1)
        linf = (adv - xs[correct]).flatten(1).abs().amax(1)
        chunk = [r for r in rows[s:s + 8] if r["attacked"] == "True"]
        assert [int(r["index"]) for r in chunk] == idx[s:s + 8][correct].tolist()
        assert [int(r["adv_pred"]) for r in chunk] == pred.tolist()
        assert [float(r["linf"]) for r in chunk] == pytest.approx(linf.tolist(), abs=1e-6)
