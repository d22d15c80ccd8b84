"""The install layout: `plugins/` ships under the import name `cure_eval_plugins` with its entry points."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_plugins_folder() -> None:
    import cure_eval

    if ROOT not in Path(cure_eval.__file__).resolve().parents:
        pytest.skip("installed from a wheel (tox -e wheel): tests/test_wheel_install.py covers that layout")
    import cure_eval_plugins.methods.cure as mod

    assert Path(mod.__file__).resolve() == ROOT / "plugins" / "methods" / "cure.py"


@pytest.mark.slow
def test_wheel_contains_plugins_under_unique_name(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    if res.returncode != 0 and "No module named" in res.stderr:
        pytest.skip(f"cannot build without isolation here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "cure_eval_plugins/methods/cure.py" in names
    # every subpackage ships (setuptools' `packages` is an explicit list: a new folder must be added)
    missing = [i.relative_to(ROOT).as_posix() for i in sorted((ROOT / "cure_eval").rglob("__init__.py"))
               if i.relative_to(ROOT).as_posix() not in names]
    assert not missing, f"not in the wheel (add them to [tool.setuptools] packages): {missing}"
    assert "cure_eval_plugins/models/wide_resnet.py" in names
    assert not any(n.startswith("plugins/") for n in names)  # no generic top-level `plugins`
    assert "cure = cure_eval_plugins.methods.cure:CureMethod" in entry_points
    assert "[cure_eval.models]" in entry_points
