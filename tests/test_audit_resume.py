"""Resumable audits: a ``kill -9``-ed audit resumes without redoing finished units, and ends equal
to an uninterrupted one; a state made with other settings is refused."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from cure_eval.attacks import ATTACKS, run_suite
from cure_eval.audit import main
from cure_eval.data import load_dataset, select_points

REPO = Path(__file__).resolve().parents[1]
# 40 points in 5 chunks of 8; SPSA long enough per chunk to be killed in the middle.
# the old default list (every built-in; SPSA is what the kill test interrupts)
ARGS = ["--n", "40", "--batch-size", "8", "--spsa-iterations", "60", "--seed", "3", "--no-progress",
        "--attacks", ",".join(ATTACKS)]


def without_seconds(obj: Any) -> Any:
    """results.json without timings (they differ from run to run)."""
    if isinstance(obj, dict):
        return {k: without_seconds(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [without_seconds(v) for v in obj]
    return obj


def units(out: Path) -> set[str]:
    return set(json.loads((out / "audit_state.json").read_text())["units"])


def computed_units(log: str) -> set[str]:
    return set(re.findall(r"audit unit (\S+) done", log))


def assert_same_audit(a: Path, b: Path) -> None:
    assert (a / "per_sample.csv").read_text() == (b / "per_sample.csv").read_text()
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert without_seconds(ra) == without_seconds(rb)


@pytest.mark.slow
def test_sigkill_during_spsa_then_resume(tmp_path: Path, factory_argv: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "cure_eval.audit", *factory_argv, *ARGS, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "audit unit spsa/1 done" in line:  # two SPSA chunks finished, the third running
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-2000:]

    # An unfinished audit never looks finished; its state holds what finished.
    for name in ("results.json", "results.md", "per_sample.csv"):
        assert not (out / name).exists()
    done = units(out)
    assert {"clean/0", "fgsm/4", "pgd/4", "deepfool_l2/4", "spsa/0", "spsa/1"} <= done
    assert "spsa/4" not in done
    (out / ".audit_state.json.torn.tmp").write_text("{")  # a torn write of the killed run

    capsys.readouterr()
    assert main([*factory_argv, *ARGS, "--out", str(out)]) == 0
    log = capsys.readouterr().err
    assert f"reusing {len(done)} finished units of 40" in log
    computed = computed_units(log)
    assert computed and not computed & done  # nothing that finished was attacked again
    assert computed | done == units(out) and len(units(out)) == 40
    assert not (out / ".audit_state.json.torn.tmp").exists()

    ref = tmp_path / "uninterrupted"
    assert main([*factory_argv, *ARGS, "--out", str(ref)]) == 0
    assert_same_audit(out, ref)
    state = json.loads((out / "audit_state.json").read_text())
    assert state["complete"] is True


def test_changed_settings_are_refused_and_restart_discards(tmp_path: Path, factory_argv: list[str],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a"

    def argv(weights: str = factory_argv[3], **changed: str) -> list[str]:
        opts = {"--n": "16", "--batch-size": "8", "--attacks": "fgsm,pgd7", "--seed": "0", "--eps": "32",
                **{f"--{k.replace('_', '-')}": v for k, v in changed.items()}}
        flags = [f for k, v in opts.items() for f in ((k,) if v == "" else (k, v))]
        return [*factory_argv[:3], weights, *flags, "--no-progress", "--out", str(out)]

    assert main(argv()) == 0
    state_before = (out / "audit_state.json").read_bytes()
    results_before = (out / "results.json").read_bytes()

    # a finished audit rerun: everything reused, nothing attacked, the same results
    capsys.readouterr()
    assert main(argv()) == 0
    log = capsys.readouterr().err
    assert "reusing 6 finished units of 6" in log and not computed_units(log)
    assert without_seconds(json.loads((out / "results.json").read_bytes())) == \
        without_seconds(json.loads(results_before))
    state_before = (out / "audit_state.json").read_bytes()

    for changed in ({"eps": "16"}, {"seed": "1"}, {"attacks": "fgsm"}, {"batch_size": "4"}, {"cascade": ""},
                    {"alpha": "2"}, {"spsa_iterations": "5"}, {"n": "17"}):
        assert main(argv(**changed)) == 1, changed
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and "different settings" in err[-1], err
        assert "--restart" in err[-1] and "--out" in err[-1]
        assert (out / "audit_state.json").read_bytes() == state_before  # untouched
        assert (out / "results.json").read_bytes() == results_before

    assert main(argv(eps="16")) == 1
    assert "(eps: 0.12549019607843137 → 0.06274509803921569)" in capsys.readouterr().err

    # other weights, same factory: the model's hash differs
    other = tmp_path / "other.safetensors"
    w = load_file(factory_argv[3])
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in w.items()}, str(other))
    assert main(argv(weights=str(other))) == 1
    assert "(model: state_sha256 differ)" in capsys.readouterr().err

    assert main([*argv(eps="16"), "--restart"]) == 0
    assert "--restart: discarded audit_state.json" in capsys.readouterr().err
    state = json.loads((out / "audit_state.json").read_text())
    assert state["fingerprint"]["eps"] == pytest.approx(16 / 255) and state["complete"] is True
    assert json.loads((out / "results.json").read_text())["eps"] == pytest.approx(16 / 255)


def test_a_running_audit_is_not_joined(tmp_path: Path, factory_argv: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Two audits never write into one folder: the second is refused while the first runs."""
    out = tmp_path / "a"
    out.mkdir()
    holder = subprocess.Popen(  # stands in for a running audit (rank 0 holds byte 0 of the lock)
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(out / '.audit_state.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0)\nprint('locked', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        argv = [*factory_argv, "--n", "8", "--attacks", "fgsm", "--no-progress", "--out", str(out)]
        assert main(argv) == 1
        assert "another audit is running in" in capsys.readouterr().err
        assert not (out / "audit_state.json").exists() and not (out / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0  # the lock died with its process


def test_unreadable_state_is_refused(tmp_path: Path, factory_argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a"
    out.mkdir()
    (out / "audit_state.json").write_text("{not json")
    argv = [*factory_argv, "--n", "8", "--attacks", "fgsm", "--no-progress", "--out", str(out)]
    assert main(argv) == 1
    assert "not a readable audit state" in capsys.readouterr().err
    assert main([*argv, "--restart"]) == 0


@pytest.mark.parametrize("cascade", [False, True])
def test_resume_from_any_subset_of_units(tmp_path: Path, factory_argv: list[str], cascade: bool,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A crash leaves some finished units: whichever they are, the resumed audit is the same."""
    argv = [*factory_argv, "--n", "24", "--batch-size", "8", "--spsa-iterations", "10", "--no-progress",
            *(["--cascade"] if cascade else [])]
    ref = tmp_path / "ref"
    assert main([*argv, "--out", str(ref)]) == 0
    state = json.loads((ref / "audit_state.json").read_text())
    out = tmp_path / "resumed"
    out.mkdir()
    keep = {k: v for i, (k, v) in enumerate(sorted(state["units"].items())) if i % 3 != 1}
    (out / "audit_state.json").write_text(json.dumps({**state, "units": keep, "complete": False}))
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 0
    computed = computed_units(capsys.readouterr().err)
    assert computed == set(state["units"]) - set(keep)
    assert_same_audit(out, ref)


def test_one_chunk_equals_run_suite(tmp_path: Path, factory_argv: list[str], trained_digits_model: torch.nn.Module) -> None:
    """Up to --batch-size points the audit is one run_suite call: its numbers are bit-identical."""
    out = tmp_path / "a"
    assert main([*factory_argv, "--n", "30", "--spsa-iterations", "10", "--seed", "7", "--no-progress",
                 "--attacks", ",".join(ATTACKS), "--out", str(out)]) == 0
    test = load_dataset("digits", "test")
    idx = select_points(len(test), 30, 7)
    suite = run_suite(trained_digits_model, test.tensors[0][idx], test.tensors[1][idx], eps=32 / 255,
                      device="cpu", pgd_alpha=4 / 255, spsa_iterations=10, seed=7, indices=idx, progress=False)
    rows = list(csv.DictReader((out / "per_sample.csv").open()))
    expected = suite.rows()
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected, strict=True):
        assert got == {k: "" if want[k] is None else str(want[k]) for k in got}
    res = json.loads((out / "results.json").read_text())
    assert res["worst_case_accuracy"] == suite.worst_case_accuracy
    assert {a: r["robust_accuracy"] for a, r in res["attacks"].items()} == \
        {a: r.robust_accuracy for a, r in suite.attacks.items()}
