"""Passive OpenMP waiting for this project's command-line tools, set before torch is imported.

By default libgomp's idle worker threads spin for a while after each parallel region. Two torch
processes on a small machine then spin against each other: on a 2-core CPU two ``defend`` runs side
by side took 3.5× the time of one (docs/gpu.md, "Several jobs on one CPU"). ``OMP_WAIT_POLICY`` is
read once, when torch loads libgomp, so it must be in the environment before ``import torch``;
``python -m cure_eval.defend`` imports this package (and torch) before the CLI module runs, hence
this hook in ``cure_eval/__init__.py``. It acts only when the process *is* one of our CLIs and the
user has not chosen a policy: importing the library from your own code changes nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CLI_MODULES = ("cure_eval.defend", "cure_eval.audit", "cure_eval.reproduce")
CLI_SCRIPTS = ("cure-eval-defend", "cure-eval-audit")  # [project.scripts]


def launched_as_cli(argv: list[str] | None = None) -> bool:
    """True when the interpreter runs ``-m cure_eval.<cli>`` or a ``cure-eval-*`` console script."""
    args = list(getattr(sys, "orig_argv", sys.argv) if argv is None else argv)
    i = 1
    while i < len(args):  # interpreter options, up to -m MODULE, -c CODE or a script
        a = args[i]
        if a == "-m":
            return i + 1 < len(args) and args[i + 1] in CLI_MODULES
        if a == "-c" or not a.startswith("-"):
            break
        i += 2 if a in ("-W", "-X") else 1
    return bool(sys.argv) and Path(sys.argv[0]).name in CLI_SCRIPTS


def prefer_passive_openmp() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless set, torch already imported, or not run as a CLI."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or not launched_as_cli():
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
