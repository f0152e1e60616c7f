"""Exit codes, the one-line user error of ``csl-fast`` and the checks that raise it.

Shared by the parser (:mod:`csl_fast.cli`) and the subcommands
(:mod:`csl_fast.cli_commands`); the codes are listed in :mod:`csl_fast.cli`'s docstring.
"""

from __future__ import annotations

import os

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_DEPENDENCY = 4
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A user error: printed as one line, exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE, prog: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.prog = prog


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


#: Said after a warning whose advice is the Python API's (rule='fraction', top(k)), which
#: the CLI's options name otherwise: "--rule" is no option of it.
CLI_REVIEW = (
    " (on the command line: csl-fast clean RUN --policy review --budget K writes the K most "
    "suspicious samples for review; csl-fast rank RUN --top K lists them)"
)


#: The same for the (sample, label) entries of ``label_csl``, which clean does not take.
CLI_REVIEW_ENTRIES = (
    " (on the command line: csl-fast rank RUN --score label_csl --top K lists the K most "
    "suspicious (sample, label) entries)"
)


def warning_line(text: object) -> str:
    """A csl_fast warning as one line of the CLI, its Python-only advice translated."""
    line = _one_line(text)
    if "rule='fraction'" in line or ".top(k)" in line:
        # (clean refuses label_csl, and rank without --score lists samples by csl)
        line += CLI_REVIEW_ENTRIES if "'label_csl'" in line else CLI_REVIEW
    return line


def _writable_folder(out: str, option: str = "--out") -> None:
    """Create the output folder ``out`` now, so that a path that cannot be written is a
    one-line input error before any work, not a traceback after it."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"{option} {out!r} exists and is not a folder", EXIT_INPUT)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise CLIError(
            f"{option} {out!r}: cannot create this folder: {_os_reason(exc)}", EXIT_INPUT
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {out!r}: this folder is not writable", EXIT_INPUT)


def _os_reason(exc: OSError) -> str:
    """An OSError as one line: its message and the file it names."""
    text = exc.strerror or str(exc)
    if exc.filename is not None and str(exc.filename) not in text:
        text = f"{text}: {exc.filename!s}"
    return _one_line(text)
