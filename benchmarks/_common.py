"""What every benchmark shares: the ``--tiny`` size and the check that its figures are not degenerate.

A benchmark that nothing runs rots: a renamed argument, a counter that stops counting, a time
that divides by zero. Each benchmark therefore has a ``--tiny`` size (every stage, a few points,
one round, small data: seconds on one CPU thread, a check that it runs, not a measurement) that
``tests/test_benchmarks.py`` runs, and each checks its figures with :func:`exit_if_degenerate`
before it prints them: a zero count, a zero or non-finite time, a NaN or infinite ratio or an
empty table ends it with exit status 1 and one line on stderr instead of a table of nonsense.

No torch here: the benchmarks set ``OMP_WAIT_POLICY`` before torch loads, and import this first.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

TINY_HELP = ("every stage at a tiny size (a few points, one round, small data, seconds on one CPU thread): "
             "a check that the benchmark runs, not a measurement")


class DegenerateFigure(ValueError):
    """A figure that cannot be a measurement: a zero count, a NaN or infinite ratio, an empty table."""


def add_tiny_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--tiny`` (the same name and help in every benchmark)."""
    parser.add_argument("--tiny", action="store_true", help=TINY_HELP)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *,
               tiny: Mapping[str, Any]) -> argparse.Namespace:
    """Parse ``argv``; with ``--tiny``, ``tiny`` (destination → value) replaces the defaults.

    Options given on the command line still win over the tiny sizes, so ``--tiny --points 5``
    runs the tiny benchmark on 5 points. Without ``--tiny`` the defaults are untouched.
    """
    add_tiny_flag(parser)
    args = parser.parse_args(argv)
    if args.tiny:
        unknown = set(tiny) - set(vars(args))
        if unknown:
            raise ValueError(f"tiny sizes for options the parser does not have: {sorted(unknown)}")
        parser.set_defaults(**tiny)
        args = parser.parse_args(argv)
    return args


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DegenerateFigure(f"{value!r} is not a number") from None


def check_figures(*, counts: Mapping[str, Any] | None = None, times: Mapping[str, Any] | None = None,
                  ratios: Mapping[str, Any] | None = None, tables: Mapping[str, Sized] | None = None) -> None:
    """Raise :class:`DegenerateFigure` for the first figure that cannot be a measurement.

    Args:
        counts: name → count (points, model evaluations, HVPs, FLOPs, layers): finite and > 0.
        times: name → seconds: finite and > 0.
        ratios: name → ratio (speed-ups, shares, accuracies): finite (zero is a possible result).
        tables: name → rows: at least one row.
    """
    for kind, figures, positive in (("count", counts, True), ("time", times, True), ("ratio", ratios, False)):
        for name, value in (figures or {}).items():
            try:
                number = _number(value)
            except DegenerateFigure as exc:
                raise DegenerateFigure(f"{kind} {name!r}: {exc}") from None
            if not math.isfinite(number):
                raise DegenerateFigure(f"{kind} {name!r} is {number} (expected a finite number)")
            if positive and number <= 0:
                raise DegenerateFigure(f"{kind} {name!r} is {value} (expected > 0)")
    for name, rows in (tables or {}).items():
        if len(rows) == 0:
            raise DegenerateFigure(f"table {name!r} is empty")


def exit_if_degenerate(**figures: Any) -> None:
    """:func:`check_figures`, and on failure exit with status 1 and one line on stderr."""
    try:
        check_figures(**figures)
    except DegenerateFigure as exc:
        raise SystemExit(f"{Path(sys.argv[0]).name}: degenerate figures, nothing reported: {exc}") from None
