"""Library errors name Python parameters; each CLI turns them into its own flags."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from cure_eval.cli import ArgumentParser, speak_cli

ROOT = Path(__file__).resolve().parents[1]
CLIS = {"defend.py", "audit.py", "reproduce.py", "cli.py"}


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="x")
    p.add_argument("--data-dir")
    p.add_argument("--download", action="store_true")
    p.add_argument("--features-n", type=int)
    p.add_argument("--n", type=int)
    return p


def test_parameters_become_flags() -> None:
    msg = "no CIFAR-10 files in `data_dir`; pass `download=True` or set `data_dir`, `n=4` or `n_points=3`"
    assert speak_cli(msg, _parser(), {"n_points": "features_n"}) == (
        "no CIFAR-10 files in --data-dir; pass --download or set --data-dir, --n 4 or --features-n 3")
    # A name the CLI has no flag for stays as the library wrote it.
    assert speak_cli("`model` has no `conv1`", _parser()) == "`model` has no `conv1`"


def _raised_strings(path: Path) -> list[tuple[int, str]]:
    """The string constants inside ``raise`` statements of one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for sub in ast.walk(node.exc):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    found.append((node.lineno, sub.value))
    return found


def test_library_errors_name_no_command_line_flag() -> None:
    flag = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")
    offenders = [f"{p.relative_to(ROOT)}:{line}: {text!r}"
                 for p in sorted((ROOT / "cure_eval").rglob("*.py"))
                 if not (p.parent == ROOT / "cure_eval" and p.name in CLIS)
                 for line, text in _raised_strings(p) if flag.search(text)]
    assert not offenders, "library errors name CLI flags:\n" + "\n".join(offenders)
