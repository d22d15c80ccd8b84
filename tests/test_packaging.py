"""The install layout: `plugins/` ships under the import name `cure_eval_plugins` with its entry points."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_plugins_folder() -> None:
    import cure_eval

    if ROOT not in Path(cure_eval.__file__).resolve().parents:
        pytest.skip("installed from a wheel (tox -e wheel): tests/test_wheel_install.py covers that layout")
    import cure_eval_plugins.methods.cure as mod

    assert Path(mod.__file__).resolve() == ROOT / "plugins" / "methods" / "cure.py"


# The wheel itself (every package, the plugins' import name, the entry points, every CLI from a
# fresh install) is tests/test_wheel_install.py: built once there.
