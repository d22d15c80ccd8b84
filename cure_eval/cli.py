"""Shared command-line plumbing: logging set-up, error handling, common arguments."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Mapping, Sequence

from .errors import CureEvalError, UsageError

log = logging.getLogger("cure_eval")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of exiting, so errors stay one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # an argument may hold a line break (argparse quotes it as given): keep the message one line
        one_line = message.replace("\r", "\\r").replace("\n", "\\n")
        raise UsageError(f"{one_line} (see --help)")


class _DropLibraryChatter(logging.Filter):
    """foolbox's DeepFool logs "Only testing the top-10 classes" on the root logger per call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and str(record.msg).startswith("Only testing the top"))


def setup_logging(*, verbose: bool = False, quiet: bool = False) -> None:
    """Plain messages on stderr; the CLIs call this, library code only logs."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropLibraryChatter())
    for noisy in ("matplotlib", "PIL", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:N (default: auto)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's, one per core); use 1 per job when "
                        "several jobs share the machine")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument("--quiet", action="store_true", help="only warnings and errors")
    g.add_argument("--verbose", action="store_true", help="debug logging")
    g.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def set_threads(threads: int | None) -> None:
    """Apply ``--threads``: ``torch.set_num_threads`` (None keeps torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def eps_from_255(value: float, flag: str = "--eps") -> float:
    """Convert a CLI ε in 1/255 units to [0, 1] units, refusing values outside [0, 255]."""
    if not (0.0 <= value <= 255.0):
        raise UsageError(f"{flag} {value:g} is outside [0, 255]: ε is given in 1/255 units (--eps 8 means 8/255)")
    return value / 255.0


def comma_list(text: str | None) -> list[str]:
    """The non-empty, stripped items of a comma list (``[]`` for ``None`` or blank)."""
    return [v.strip() for v in (text or "").split(",") if v.strip()]


#: A parameter named in a library message: ```name``` or ```name=value``` (errors.py's convention).
_PARAM = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=([^`]*))?`")


def flag_names(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's options by destination (``data_dir`` → the ``--data-dir`` action)."""
    return {a.dest: a for a in parser._actions if a.option_strings}


def speak_cli(message: str, parser: argparse.ArgumentParser, aliases: Mapping[str, str] = {}) -> str:  # noqa: B006
    """Turn the Python parameters a library message names (```data_dir```, ```download=True```)
    into this CLI's flags (``--data-dir``, ``--download``). ``aliases`` maps a library parameter
    to a parser destination where the two names differ (``n_points`` → ``features_n``). A name
    with no flag is left as written."""
    actions = flag_names(parser)

    def one(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        action = actions.get(aliases.get(name, name))
        if action is None:
            return m.group(0)
        flag = max(action.option_strings, key=len)
        if value is None or (action.nargs == 0 and value in ("True", "False")):
            return flag
        return f"{flag} {value}"

    return _PARAM.sub(one, message)


def run_cli(body: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None, *,
            parser: Callable[[], argparse.ArgumentParser] | None = None,
            aliases: Mapping[str, str] = {}) -> int:  # noqa: B006
    """Run ``body(argv)``; turn known errors into one line on stderr and an exit code. With
    ``parser`` (the CLI's parser factory), the parameters a library message names become flags."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        return body(args)
    except CureEvalError as exc:
        if debug:
            raise
        message = str(exc) if parser is None else speak_cli(str(exc), parser(), aliases)
        sys.stderr.write(f"error: {message}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
