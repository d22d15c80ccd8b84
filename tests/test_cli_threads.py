"""Passive OpenMP waiting for the CLIs (set before torch loads) and ``--threads``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cure_eval.cli import set_threads
from cure_eval.core._openmp import launched_as_cli
from cure_eval.errors import UsageError


@pytest.mark.parametrize("argv,expected", [
    (["python", "-m", "cure_eval.defend", "--epochs", "1"], True),
    (["python", "-u", "-m", "cure_eval.audit"], True),  # how torchrun starts its workers
    (["python", "-m", "cure_eval.reproduce"], True),
    (["python", "-m", "pytest", "-q"], False),
    (["python", "-c", "import cure_eval"], False),
    (["python", "my_script.py", "-m", "cure_eval.defend"], False),
])
def test_launched_as_cli(argv: list[str], expected: bool) -> None:
    assert launched_as_cli(argv) is expected


def _policy(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env}, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


AS_CLI = "import sys; sys.orig_argv = ['python', '-m', 'cure_eval.defend']; "
SHOW = "import cure_eval, os; print(os.environ.get('OMP_WAIT_POLICY'))"


@pytest.mark.slow
def test_a_cli_process_waits_passively_unless_the_user_chose() -> None:
    assert _policy(AS_CLI + SHOW) == "PASSIVE"
    assert _policy(AS_CLI + SHOW, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"  # the user's choice stands
    assert _policy(SHOW) == "None"  # importing the library from other code changes nothing
    assert _policy(AS_CLI + "import torch; " + SHOW) == "None"  # too late once torch is loaded


def test_threads_option() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(None)
        assert torch.get_num_threads() == 1  # None keeps what is set
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UsageError, match="--threads must be at least 1"):
        set_threads(0)
