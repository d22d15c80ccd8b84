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


def _error_strings(path: Path) -> list[tuple[int, str]]:
    """The string constants of one module that become an error's message: inside ``raise``
    statements and inside calls that build an error (``UsageError(…)``, ``NotApplicable(…)``, a
    ``_missing(…)``-style factory returning one is caught through its ``…Error(`` call)."""
    found = []

    def is_error_call(node: ast.AST) -> bool:
        if not isinstance(node, ast.Call):
            return False
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        return name.endswith(("Error", "NotApplicable"))

    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Raise) and node.exc is not None) or is_error_call(node):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    found.append((sub.lineno, sub.value))
    return sorted(set(found))


def test_library_errors_name_no_command_line_flag() -> None:
    flag = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")
    offenders = [f"{p.relative_to(ROOT)}:{line}: {text!r}"
                 for p in sorted((ROOT / "cure_eval").rglob("*.py"))
                 if not (p.parent == ROOT / "cure_eval" and p.name in CLIS)
                 for line, text in _error_strings(p) if flag.search(text)]
    assert not offenders, "library errors name CLI flags:\n" + "\n".join(offenders)
