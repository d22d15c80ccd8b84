"""Errors that the command-line tools turn into a one-line message and an exit code.

A message speaks the vocabulary of its caller: library code names the Python parameter in
backticks (```data_dir```, ```download=True```), never a command-line flag; each CLI turns the
names it has flags for into those flags (``cli.speak_cli``: ``--data-dir``, ``--download``).
"""

from __future__ import annotations


class CureEvalError(Exception):
    """A problem the user can fix; the message says what to do. Exit code 1 (runtime)."""

    exit_code = 1


class UsageError(CureEvalError):
    """Bad arguments: unknown names, values out of range. Exit code 2 (usage)."""

    exit_code = 2


class NotApplicable(UsageError):
    """A measurement that does not apply to this model (e.g. WCI without conv/linear weights).

    The pipelines report it as ``{"status": "not_applicable", "reason": ...}`` and keep the rest of
    the audit; called directly, it is a usage error (exit code 2)."""
