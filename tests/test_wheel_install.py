"""The built wheel is the product: install it (not editable, not the checkout) and run every CLI.

A fresh virtual environment gets the wheel through its own pip (so the console scripts point at
its interpreter); the third-party dependencies come from this environment's site-packages through
a plain path line, which Python does not scan for ``.pth`` files, so this checkout's editable
finder is never installed there. The CLIs then run from a folder outside the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Path]:
    tmp = tmp_path_factory.mktemp("wheel")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    if res.returncode != 0 and "No module named" in res.stderr:
        pytest.skip(f"cannot build without isolation here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr
    (wheel,) = tmp.glob("*.whl")

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
         cwd=tmp, env=env)
    # Only now the dependencies: had pip seen this environment's (editable) cure-eval, it would
    # have called the wheel's requirement satisfied and installed nothing.
    (site / "_deps_from_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp / "work"
    work.mkdir()
    return py, env, work


def test_wheel_holds_every_package_of_the_checkout(wheel_env: tuple[Path, dict[str, str], Path]) -> None:
    py, env, work = wheel_env
    (wheel,) = work.parent.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for init in ROOT.joinpath("cure_eval").rglob("__init__.py"):
        rel = init.relative_to(ROOT).as_posix()
        assert rel in names, f"{rel} is missing from the wheel"
    for init in ROOT.joinpath("plugins").rglob("__init__.py"):
        rel = "cure_eval_plugins/" + init.relative_to(ROOT / "plugins").as_posix()
        assert rel in names, f"{rel} is missing from the wheel"
    # plugins/ ships under its unique import name, with its entry points
    assert "cure_eval_plugins/methods/cure.py" in names and "cure_eval_plugins/models/wide_resnet.py" in names
    assert not any(n.startswith("plugins/") for n in names)  # no generic top-level `plugins`
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "cure = cure_eval_plugins.methods.cure:CureMethod" in entry_points
    assert "[cure_eval.models]" in entry_points
    # The import resolves to the installed copy, not to this checkout.
    where = _run([str(py), "-c", "import cure_eval, cure_eval.features, cure_eval_plugins.methods.cure as c; "
                  "print(cure_eval.__file__); print(c.__file__)"], cwd=work, env=env).stdout.split()
    for path in where:
        assert str(ROOT) not in path and "site-packages" in path, path


def test_every_cli_runs_from_the_wheel(wheel_env: tuple[Path, dict[str, str], Path]) -> None:
    py, env, work = wheel_env
    bin_dir = py.parent
    out = _run([str(bin_dir / "cure-eval-defend"), "--list-methods"], cwd=work, env=env).stdout
    assert "cure" in out and "pgd_at" in out

    run = work / "runs" / "tiny"
    _run([str(py), "-m", "cure_eval.defend", "--depth", "10", "--widen", "1", "--train-n", "128",
          "--pretrain-epochs", "1", "--epochs", "1", "--eval-n", "40", "--out", str(run),
          "--cache-dir", str(work / "cache"), "--threads", "1", "--no-progress"], cwd=work, env=env)
    assert json.loads((run / "results.json").read_text())["method"] == "cure"

    audit = work / "audit"
    _run([str(bin_dir / "cure-eval-audit"), "--checkpoint", str(run / "cure"), "--n", "24",
          "--attacks", "fgsm,pgd20,deepfool_l2", "--features", "--features-n", "8", "--threads", "1",
          "--no-progress", "--quiet", "--out", str(audit)], cwd=work, env=env)
    res = json.loads((audit / "results.json").read_text())
    assert res["features"]["n_points"] > 0 and res["features"]["layers"][-1] == "logits"

    repro = work / "repro"
    _run([str(py), "-m", "cure_eval.reproduce", "--depth", "10", "--widen", "1", "--train-n", "128",
          "--pretrain-epochs", "1", "--epochs", "1", "--n", "16", "--masking-n", "16", "--geometry-n", "2",
          "--spsa-iterations", "2", "--methods", "cure", "--out", str(repro), "--cache-dir", str(work / "cache"),
          "--no-progress"], cwd=work, env=env)
    assert (repro / "report.md").read_text().startswith("#")
