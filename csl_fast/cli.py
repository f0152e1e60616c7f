"""The ``csl-fast`` command line (also ``python -m csl_fast``).

Subcommands::

    csl-fast demo   [--samples N] [--epochs E] [--noise P] [--pairs K] [--seed S] [--out DIR]
    csl-fast rank   RUN [--score NAME] [--top K] [--csv | --json] [--output FILE] [INPUTS]
    csl-fast report RUN [--out DIR] [--score NAME] [--top K] [INPUTS]
    csl-fast clean  RUN --out FILE [--policy P] [--budget K] [--min-confidence X] [--score NAME]
                    [INPUTS]
    csl-fast info
    csl-fast bench  [--device DEV]

``RUN`` is a run folder written by ``demo`` (it holds ``tracker.csl`` and ``samples.npz``)
or a tracker file written by :meth:`csl_fast.CSLTracker.save`. The optional
``samples.npz`` next to the tracker (:class:`csl_fast.report.RunSamples`) adds given and
predicted labels, ground truth and images to rankings and reports.

``INPUTS`` is ``[--inputs FILE] [--labels FILE]``: the run's training inputs ``[N, ...]``
and given labels ``[N]`` (``.npy``, or ``.pt``/``.pth`` of one tensor; default: the
``inputs`` and ``labels`` in ``samples.npz``, which ``demo`` stores). With them, every
group of identical inputs whose labels conflict is flagged, exactly
(:func:`csl_fast.detect.duplicates`): ``rank`` marks its members in ``flagged`` and
numbers the groups in ``group``, ``report`` adds a section on the groups, and ``clean``
keeps the member whose label the network preferred and relabels the others to it
(:mod:`csl_fast.cleaning_groups`), also under its default on two classes in use, which
drops the flagged samples it would otherwise relabel (``--policy drop`` drops every
member). A file that does not fit the run (not ``N`` rows,
labels that are not integers) exits with 3, an unsupported file type with 2
(:mod:`csl_fast.cli_inputs`).

``clean`` writes one decision per flagged sample (``drop``, ``relabel``, or ``keep`` for a
conflicting duplicate group's kept member) to a CSV with the
columns ``index,action,suggested_label,confidence,score,rank`` (:func:`csl_fast.clean`;
``rank`` 1-based as in ``rank --csv``) and prints a summary (with the ground truth when
``samples.npz`` has it).

Output: results go to stdout; progress bars and status lines go to stderr, and
``--quiet`` turns those off (not a detection's warning, which says why its flagged set is
empty or what it rests on; ``rank --json`` also carries it, with the estimated count).

``rank --csv`` columns: ``rank,index,score,label,predicted,flagged,mislabeled,duplicate,group``
(with ``--score label_csl``: ``rank,index,entry_label,score,flagged``, one row per
(sample, label) entry of a multi-label run).
``rank`` is 1-based, ``index`` the dataset index, ``score`` the chosen score (higher = more
suspicious), ``label``/``predicted`` the given label and the final model's prediction,
``flagged`` whether the no-ground-truth rule of :func:`csl_fast.detect.mislabeled` (or,
with inputs, :func:`csl_fast.detect.duplicates`) flags the sample (``1``/``0``),
``mislabeled``/``duplicate`` the ground truth (``1``/``0``), ``group`` the sample's group
of identical inputs (with inputs; empty for a sample without an identical partner).
Runs that recorded losses only (:func:`csl_fast.record_loss`, :func:`csl_fast.accumulate_bce`)
have no softmax statistics: ``rank``, ``report`` and ``clean`` say so (a note on stderr),
offer only the scores that exist (``csl``, ``csl_mean``, ``final_loss``, and ``label_csl``
with per-label CSL), flag by the tail rule of :mod:`csl_fast.detect_losses`, and ``clean``
drops flagged samples (there are no suggested labels to relabel with).
Fields that are not known for the run are empty. ``--json`` writes an object with
``run``, ``score``, ``direction``, ``num_samples``, the detection's ``flagged_count``,
``estimated_count``, ``count_interval`` and ``warning`` (``null`` when it has none), a
``note`` and ``duplicates`` when there are any, and ``rows`` (the same fields, ``null``
when unknown).

Exit codes:

==  =====================================================================
0   success
1   unexpected internal error (a bug: the traceback is printed)
2   usage error: unknown option, bad value, a score the run did not record, an
    --inputs/--labels file type other than .npy/.pt/.pth, --labels without inputs
3   input/output error: tracker, samples, --inputs or --labels file missing, truncated,
    corrupted, foreign, or of another run (N mismatch, inputs with no values, labels that
    are not integer class indices in ``[0, C)``); a tracker that recorded nothing (saved
    before any training step); an output file or folder that
    cannot be written (missing parent, not a folder, permission, disk full) or that is
    one of the command's input files
4   an optional dependency is missing (scikit-learn, matplotlib, tqdm)
130 interrupted (Ctrl-C)
==  =====================================================================

User errors (codes 2-4) and interruptions print one line,
``csl-fast <command>: error: <message>``, and no traceback; ``--debug`` (before or after
the command) adds the traceback. No message ever advises unsafe loading of a file.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from .cli_commands import (
    _SCORE_NAMES,
    COMMANDS,
    CSV_COLUMNS,
    ENTRY_CSV_COLUMNS,
    TRACKER_FILE,
    load_run,
    rank_rows,
)
from .cli_errors import (
    EXIT_DEPENDENCY,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    _one_line,
    _os_reason,
    warning_line,
)
from .cli_inputs import add_input_options

__all__ = [
    "COMMANDS",
    "CSV_COLUMNS",
    "EXIT_DEPENDENCY",
    "EXIT_INPUT",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "TRACKER_FILE",
    "CLIError",
    "build_parser",
    "load_run",
    "main",
    "rank_rows",
]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see {self.prog} --help)", EXIT_USAGE, self.prog)


# ----------------------------------------------------------------------------- types
def _checked(
    convert: Callable[[str], Any],
    ok: Callable[[Any], bool],
    expected: str,
    parse_expected: str = "",
) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert(text)``, which must satisfy ``ok``, else a one-line
    "expected ..., got ..." error (``parse_expected`` when ``text`` does not parse at all)."""

    def parse(text: str) -> Any:
        try:
            v = convert(text)
        except ValueError:
            msg = f"expected {parse_expected or expected}, got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {v}")
        return v

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_fraction = _checked(
    float, lambda v: 0.0 <= v <= 0.5, "a fraction in [0, 0.5]", "a number in [0, 0.5]"
)
_positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
# What torch and numpy accept as a seed (the demo also seeds with seed + 1).
_seed = _checked(int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)")
# The demo's MLP has two hidden layers of this width: 16384 is already 1 GB of weights
# (4 GB with Adam's state); a larger width failed in the allocator with a traceback.
_MAX_HIDDEN = 16384
_hidden = _checked(int, lambda v: 1 <= v <= _MAX_HIDDEN, f"an integer in [1, {_MAX_HIDDEN}]")
# More threads than CPUs never helps, and enough of them crash OpenBLAS (RLIMIT_NPROC).
_CPUS = os.cpu_count() or 1
_threads = _checked(int, lambda v: 1 <= v <= _CPUS, f"an integer in [1, {_CPUS}] (the CPUs)")


# ----------------------------------------------------------------------------- parser
_DEBUG_HELP = "print the traceback of errors too"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's default must not overwrite `csl-fast -q CMD` (main's own)
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars or status lines (stderr)",
    )
    # SUPPRESS: a subcommand's default must not overwrite `csl-fast --debug CMD`.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    parser = _Parser(
        prog="csl-fast",
        description="Cumulative Sample Loss for free: find mislabeled, duplicated and "
        "memorized training samples from per-sample training dynamics.",
        epilog="Exit codes: 0 ok; 1 internal error (a bug: the traceback is printed); "
        "2 usage error (an unknown option or a bad value, a score the run did not record, "
        "an --inputs/--labels file that is not .npy/.pt/.pth, --labels without inputs); "
        "3 bad input or output (a tracker, samples.npz, --inputs or --labels file that is "
        "missing, damaged, of another format or of another run: not N rows, labels not "
        "class indices in [0, C); a tracker that recorded nothing; an output that cannot be "
        "written); 4 missing optional dependency (or, for bench, the compiled extension); "
        "130 interrupted. --debug prints the traceback of errors too. Run `csl-fast demo` "
        "first.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"csl_fast {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars or status lines (stderr)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    from .demo import DIGITS_SAMPLES, DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="inject label noise and duplicates into digits, train, detect, report",
        description="Train a small MLP on scikit-learn's digits with seeded label flips and "
        "conflicting-label duplicate pairs, tracking CSL; print the detection table, clean the "
        "flagged samples and retrain once (clean-test accuracy: noisy, cleaned, true labels), "
        "the tracking overhead and the top suspicious samples; write a report folder, a saved "
        "tracker and the cleaning plan. Under half a minute on 2 idle CPU cores with the defaults "
        "(22 s with imports, benchmarks/results/demo-cpu-2026-12-05.md); longer on a busy "
        "machine.",
    )
    p.add_argument(
        "--samples",
        type=_positive_int,
        default=d.samples,
        help=f"training-set size, 50 to {DIGITS_SAMPLES}; the digits left out are the clean "
        f"test set of the retraining (default {d.samples})",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=d.epochs,
        help=f"training epochs (default {d.epochs})",
    )
    p.add_argument(
        "--noise",
        type=_fraction,
        default=d.noise,
        help=f"fraction of labels flipped, 0 to 0.5 (default {d.noise})",
    )
    p.add_argument(
        "--pairs",
        type=_nonneg_int,
        default=d.pairs,
        help=f"conflicting-label duplicate pairs, at most half the samples not flipped "
        f"(default {d.pairs})",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=d.seed,
        help=f"seed of the corruption, initialisation and batches (default {d.seed})",
    )
    p.add_argument("-o", "--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument(
        "--hidden",
        type=_hidden,
        default=d.hidden,
        help=f"hidden width of the MLP (default {d.hidden})",
    )
    p.add_argument(
        "--lr", type=_positive_float, default=d.lr, help=f"Adam learning rate (default {d.lr})"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=d.batch_size, help=f"(default {d.batch_size})"
    )
    p.add_argument(
        "--top",
        type=_positive_int,
        default=d.top,
        help=f"suspicious samples to print (default {d.top})",
    )
    p.add_argument(
        "--overhead-rounds",
        type=_nonneg_int,
        default=d.overhead_rounds,
        help=f"timing rounds of the overhead measurement, 0 to skip (default {d.overhead_rounds})",
    )
    p.add_argument(
        "--threads",
        type=_threads,
        default=d.threads,
        help=f"CPU threads for torch (default {d.threads}: the model is tiny)",
    )
    p.add_argument("--no-report", action="store_true", help="skip the HTML/PNG report")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)"
    )

    p = sub.add_parser(
        "rank",
        parents=[common],
        help="top-k suspicious samples of a saved run",
        description="List the most suspicious samples of a saved run by a score (higher = "
        "more suspicious). CSV columns: " + ",".join(CSV_COLUMNS) + " (empty when unknown); "
        "with --score label_csl: " + ",".join(ENTRY_CSV_COLUMNS) + ", one row per (sample, "
        "label) entry of a multi-label run.",
    )
    p.add_argument("run", metavar="RUN", help="run folder (with tracker.csl) or tracker file")
    p.add_argument(
        "--score",
        default=None,
        choices=_SCORE_NAMES,
        metavar="NAME",
        help="score to rank by: "
        + ", ".join(_SCORE_NAMES)
        + " (default csl; csl_mean for a run of sequences or unequal presentation counts)",
    )
    p.add_argument("--top", type=_positive_int, default=20, help="number of samples (default 20)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV instead of a table")
    fmt.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="write to this file instead of stdout ('-' and /dev/stdout: stdout; /dev/stderr)",
    )
    add_input_options(p)

    p = sub.add_parser(
        "report",
        parents=[common],
        help="the visual report (HTML + PNGs) of a saved run",
        description="Write report.html (self-contained) and its PNGs for a saved run.",
    )
    p.add_argument("run", metavar="RUN", help="run folder (with tracker.csl) or tracker file")
    p.add_argument(
        "-o",
        "--out",
        default=None,
        help="output folder (default: RUN/report; for a tracker file, the folder 'report' "
        "next to it)",
    )
    p.add_argument(
        "--score",
        default=None,
        choices=_SCORE_NAMES,
        metavar="NAME",
        help="score of the top-k table and grid (default csl; csl_mean for a run of sequences "
        "or unequal presentation counts)",
    )
    p.add_argument(
        "--top", type=_positive_int, default=24, help="suspicious samples shown (default 24)"
    )
    add_input_options(p)

    _add_clean_parser(sub, common)

    sub.add_parser("info", parents=[common], help="versions and kernel backends")

    p = sub.add_parser(
        "bench",
        parents=[common],
        help="a short overhead report on this machine (under a minute on a CPU)",
        description="Short version of the benchmark suite in benchmarks/: fused cross entropy "
        "against the eager reference, a tracked MLP training step, tracker memory.",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return parser


# (+ 0.0: -0 is 0, and was echoed as "min confidence -0")
_probability = _checked(lambda t: float(t) + 0.0, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def _add_clean_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    from .cleaning import CSV_COLUMNS as CLEAN_COLUMNS
    from .cleaning import DEFAULT_MIN_CONFIDENCE, POLICIES

    p = sub.add_parser(
        "clean",
        parents=[common],
        help="one decision (drop or relabel) per flagged sample of a saved run, as CSV",
        description="Flag the suspicious samples of a saved run (csl_fast.detect.mislabeled; "
        "with inputs, also every group of identical inputs whose labels conflict: "
        "csl_fast.detect.duplicates) and write one decision per flagged sample to a CSV file "
        "with the columns "
        + ", ".join(CLEAN_COLUMNS)
        + " (rank 1-based, as in `csl-fast rank`, empty for a sample the detection does not "
        "rank: a conflicting group's member never presented in training or recorded by "
        "another recorder than accumulate's, a held-out one an eval pass scored; "
        "suggested_label and confidence empty where there is no "
        "suggestion). Policies: relabel-confident relabels a sample to its "
        "suggested label when the suggestion's confidence is at least --min-confidence and "
        "drops it otherwise; drop drops every flagged sample; review lists the --budget most "
        "suspicious samples, flagged or not: a flagged one with the action relabel-confident would "
        "take, an unflagged one the action keep (its suggestion, if any, shown). "
        "In a conflicting duplicate group the member whose label the network preferred gets "
        "the action keep and the others are relabelled to that label, also under the default "
        "on two classes in use (under --policy drop every member is dropped, the preferred "
        "one too).",
    )
    p.add_argument("run", metavar="RUN", help="run folder (with tracker.csl) or tracker file")
    p.add_argument(
        "-o",
        "--out",
        required=True,
        metavar="FILE",
        help="the CSV file to write; '-' or /dev/stdout: standard output (the summary then on "
        "standard error); /dev/stderr",
    )
    p.add_argument(
        "--policy",
        default=None,
        choices=POLICIES,
        help="what to do with a flagged sample (default relabel-confident, or drop when two "
        "classes are in use: there a relabel is right only as often as the flagged set is "
        "precise; conflicting duplicate groups are still resolved)",
    )
    p.add_argument(
        "--budget",
        # 0 as in csl_fast.clean: a header-only plan, for a budget computed by a script
        type=_nonneg_int,
        default=None,
        metavar="K",
        help="at most K rows, the most suspicious (required with --policy review)",
    )
    p.add_argument(
        "--min-confidence",
        type=_probability,
        default=DEFAULT_MIN_CONFIDENCE,
        metavar="X",
        help=f"least suggestion confidence to relabel (default {DEFAULT_MIN_CONFIDENCE})",
    )
    p.add_argument(
        "--score",
        default=None,
        choices=_SCORE_NAMES,
        metavar="NAME",
        help="score that ranks and flags the samples (default csl; csl_mean for a run of "
        "sequences or unequal presentation counts)",
    )
    add_input_options(p)


_OPTIONAL = {
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "pandas": "pandas",
}


@contextlib.contextmanager
def _one_line_warnings(prog: str) -> Iterator[None]:
    """csl_fast's own warnings (their text starts with ``csl_fast``) as one stderr line
    each, ``prog: warning: ...``, once per command although several steps may raise the
    same (scores are computed for the check, the detection and the report); other
    packages' warnings as Python shows them."""
    shown: set[str] = set()
    python_way = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = warning_line(message)
        if not text.startswith("csl_fast"):
            python_way(message, category, filename, lineno, file, line)
        elif text not in shown:
            shown.add(text)
            print(f"{prog}: warning: {text}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = python_way


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``csl-fast`` / ``python -m csl_fast``; returns the exit code."""
    prog = "csl-fast"
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv[: argv.index("--")] if "--" in argv else "--debug" in argv

    def fail(message: str, code: int) -> int:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {_one_line(message)}", file=sys.stderr)
        return code

    try:
        parser = build_parser()
        # Unknown options reach the top-level parser, which would name itself; report
        # them against the subcommand they were given to, like its other usage errors.
        args, extra = parser.parse_known_args(argv)
        if extra:
            where = "csl-fast" if args.command is None else f"csl-fast {args.command}"
            raise CLIError(
                f"unrecognized arguments: {' '.join(extra)} (see {where} --help)", EXIT_USAGE, where
            )
        if args.command is None:  # (the whole help on stdout, exit 2: one line on stderr)
            raise CLIError(
                f"no command given; pick one of {', '.join(COMMANDS)} (csl-fast --help says "
                "what each does)",
                EXIT_USAGE,
                "csl-fast",
            )
        prog = f"csl-fast {args.command}"
        with _one_line_warnings(prog):
            return COMMANDS[args.command](args)
    except CLIError as exc:
        prog = exc.prog or prog
        return fail(str(exc), exc.code)
    except ImportError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in _OPTIONAL:
            traceback.print_exc()
            return EXIT_INTERNAL
        return fail(
            f"this command needs {_OPTIONAL[top]}: pip install {_OPTIONAL[top]} (or pip "
            "install 'csl_fast[eval]')",
            EXIT_DEPENDENCY,
        )
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `csl-fast rank RUN | head`: the reader went away; not an error.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return EXIT_OK
    except OSError as exc:
        # A file or folder the command could not read or write (a full disk, a folder
        # removed meanwhile, ...): the environment, not a bug.
        return fail(_os_reason(exc), EXIT_INPUT)
    except Exception:
        traceback.print_exc()
        print(
            f"{prog}: internal error (a bug in csl_fast: please report it with the traceback "
            "above)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
