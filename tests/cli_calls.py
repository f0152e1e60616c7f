"""In-process calls of ``csl_fast.cli.main`` for the CLI tests (tests/test_cli*.py)."""

from __future__ import annotations

from csl_fast.cli import main


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``csl-fast ARGS`` run in this process."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def user_error(capsys, code: int, command: str, *args: str) -> str:
    """The one line ``csl-fast COMMAND ARGS`` prints on stderr as it exits with ``code``."""
    got, out, err = run_main(capsys, command, *args)
    assert got == code, (got, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"csl-fast {command}: error: "), lines[0]
    return lines[0]
