"""What every benchmark result file records about its run: date, commit, machine and the
command that reruns it."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
#: when the script started (it imports this module first): "date" is when it wrote
STARTED = datetime.datetime.now(datetime.timezone.utc)


def commit(root: Path = ROOT) -> str:
    """The short commit hash of the checkout at ``root`` (this one by default),
    ``-dirty`` appended when tracked files differ from it or untracked ``.py`` files lie
    under csl_fast/ or benchmarks/ (the results then come from code no commit holds: a new
    module was not seen), or ``"unknown"`` outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=root,
        ).stdout.strip()
        untracked = subprocess.run(
            ["git", "ls-files", "--others", "--exclude-standard", "--", "csl_fast", "benchmarks"],
            capture_output=True,
            text=True,
            cwd=root,
        ).stdout.split()
    except OSError:
        return "unknown"
    changed = changed or any(path.endswith(".py") for path in untracked)
    return f"{head}-dirty" if head and changed else head or "unknown"


def cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model, torch version and thread count, in one line."""
    return f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def command() -> str:
    """The command line that runs this script again, from the checkout's root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return " ".join(["python", str(shown), *map(shlex.quote, sys.argv[1:])])


def run_meta() -> dict[str, str]:
    """``{"date", "started", "commit", "machine", "command"}`` for the header of a results
    file: ``date`` is now (the end of a run that calls this to write), ``started`` when
    the script started."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "started": STARTED.strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "machine": machine(),
        "command": command(),
    }


def write_results(out: str | Path, rows: list, markdown: Callable[[list, dict], str]) -> str:
    """Writes ``OUT.json`` (``{"meta": run_meta(), "rows": rows}``) and ``OUT.md``
    (``markdown(rows, meta)``), making OUT's folder; returns the markdown."""
    meta = run_meta()
    md, js = results_files(out)
    md.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, meta)  # (before anything is written: it may raise)
    write_atomic(js, json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_atomic(md, text)
    return text


def results_files(out: str | Path) -> tuple[Path, Path]:
    """The ``OUT.md`` and ``OUT.json`` that :func:`write_results` writes."""
    out = Path(out)
    return out.with_suffix(".md"), out.with_suffix(".json")


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file renamed over it):
    a run cut short while writing (a time limit's SIGINT) left an empty or partial
    results file where the last complete one had been."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:  # (this tree's csl_fast, not whichever is installed)
        sys.path.insert(0, root)
    from csl_fast import atomic_file

    atomic_file.write_text(str(path), lambda f: f.write(text), "write the results", "out.md")


def with_discussion(path: str | Path, text: str) -> str:
    """``text``, a generated report, followed by the hand-written ``## Discussion`` section
    of the report already at ``path`` (if it has one): regenerating the tables must not
    delete the prose. Its heading names the run the prose was written for (read from the
    old report's ``Date ..., commit ...`` line unless it names one already), so a reader
    sees when the tables are newer than what it says about them."""
    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    start = old.find("\n## Discussion")
    if start < 0:
        return text
    heading, _, body = old[start + 1 :].partition("\n")
    run = re.search(r"^Date (.+?), commit (\w+)", old, re.M)
    if "after the run of" not in heading and run:
        heading = (
            f"## Discussion (written by hand after the run of {run[1]}, commit {run[2]}; the "
            "tables above are generated: where they come from a later run, check the figures "
            "below against them)"
        )
    return text.rstrip("\n") + "\n\n" + heading + "\n" + body


def add_force(parser: argparse.ArgumentParser) -> None:
    """``--force``, the one way to let :func:`refuse_overwrite` replace a results file."""
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace results files that exist already (without it the run refuses: "
        "they may be the committed ones)",
    )


def refuse_overwrite(
    parser: argparse.ArgumentParser, force: bool, *paths: str | Path | None, option: str = "--out"
) -> None:
    """Exit 2 with a one-line usage error, before anything is measured, when one of the
    files a run would write exists and ``--force`` was not given (``None`` paths, options
    not given, are skipped). The default ``--out`` of most scripts is the committed results
    file, and a smoke run with the sizes a docstring suggests replaced it without a word.
    Every script that writes results calls this (``run.py``, ``paper/common.py``
    included): one rule for all. ``option``: the script's option that names the file."""
    existing = [str(p) for p in paths if p is not None and Path(p).exists()]
    if existing and not force:
        parser.exit(
            2,
            f"{parser.prog}: error: {existing[0]} exists; pass --force to replace it, or "
            f"{option} to write elsewhere\n",
        )


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``low`` (0 rounds, sizes or threads gave tracebacks,
    a ZeroDivisionError or StatisticsError, or an empty table with exit 0)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"  # (argparse names the type in its messages)
    return parse


at_least_one = at_least(1)


def device_arg(text: str) -> str:
    """An argparse type: a device this machine has (``--device foo`` gave torch's
    RuntimeError traceback, and a default of cuda on a CPU machine an AssertionError)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r}") from None
    if device.type == "cpu":
        return text
    # (mps, xpu, ...: torch.mps / torch.xpu; mps on a Linux machine ran into a
    # NotImplementedError traceback)
    backend = getattr(torch, device.type, None)
    count = getattr(backend, "device_count", lambda: 0)() if backend is not None else 0
    available = backend is not None and getattr(backend, "is_available", lambda: False)()
    if not available or (device.index is not None and device.index >= max(count, 1)):
        raise argparse.ArgumentTypeError(
            f"{text}: no such {device.type} device here (try --device cpu)"
        )
    return text


def rate_arg(text: str) -> float:
    """Argparse type of a rate or fraction option (``--noise``, ``--rates``,
    ``--top-fraction``, ``--sweep``): a float in [0, 1]. NaN, infinities, negatives and values
    over 1 are a usage error (exit 2) naming the option, before anything runs; they crashed
    later with tracebacks ("cannot convert float NaN to integer", "negative dimensions",
    "Cannot take a larger sample than population") or read "makes -22 of the 442 positive"."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:  # (NaN fails it too)
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate in [0, 1]")
    return value
