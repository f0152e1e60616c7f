"""The ``csl-fast`` command line (also ``python -m csl_fast``).

Subcommands::

    csl-fast demo   [--samples N] [--epochs E] [--noise P] [--pairs K] [--seed S] [--out DIR]
    csl-fast rank   RUN [--score NAME] [--top K] [--csv | --json] [--output FILE]
    csl-fast report RUN [--out DIR] [--score NAME] [--top K]
    csl-fast clean  RUN --out FILE [--policy P] [--budget K] [--min-confidence X] [--score NAME]
    csl-fast info
    csl-fast bench  [--device DEV]

``RUN`` is a run folder written by ``demo`` (it holds ``tracker.csl`` and ``samples.npz``)
or a tracker file written by :meth:`csl_fast.CSLTracker.save`. The optional
``samples.npz`` next to the tracker (:class:`csl_fast.report.RunSamples`) adds given and
predicted labels, ground truth and images to rankings and reports.

``clean`` writes one decision per flagged sample (``drop`` or ``relabel``) to a CSV with the
columns ``index,action,suggested_label,confidence,score,rank`` (:func:`csl_fast.clean`;
``rank`` 1-based as in ``rank --csv``) and prints a summary (with the ground truth when
``samples.npz`` has it).

Output: results go to stdout; progress bars and status lines go to stderr, and
``--quiet`` turns those off.

``rank --csv`` columns: ``rank,index,score,label,predicted,flagged,mislabeled,duplicate``.
``rank`` is 1-based, ``index`` the dataset index, ``score`` the chosen score (higher = more
suspicious), ``label``/``predicted`` the given label and the final model's prediction,
``flagged`` whether the no-ground-truth GMM rule of :func:`csl_fast.detect.mislabeled`
flags the sample (``1``/``0``), ``mislabeled``/``duplicate`` the ground truth (``1``/``0``).
Fields that are not known for the run are empty. ``--json`` writes an object with
``run``, ``score``, ``direction``, ``num_samples`` and ``rows`` (the same fields, ``null``
when unknown).

Exit codes:

==  =====================================================================
0   success
1   unexpected internal error (a bug: the traceback is printed)
2   usage error: unknown option, bad value, a score the run did not record
3   input/output error: tracker or samples file missing, truncated, corrupted, foreign,
    or of another run; an output file or folder that cannot be written (missing parent,
    not a folder, permission, disk full)
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
import csv
import io
import json
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_DEPENDENCY = 4
EXIT_INTERRUPTED = 130

TRACKER_FILE = "tracker.csl"
CSV_COLUMNS = ("rank", "index", "score", "label", "predicted", "flagged", "mislabeled", "duplicate")

_SCORE_NAMES = (
    "csl",
    "csl_mean",
    "eval_csl",
    "final_loss",
    "forgetting",
    "threshold_learning_time",
    "learning_time",
    "loss_sensitivity",
    "aum",
    "in_confidence",
    "confidence",
    "logit_grad_norm",
)  # not variability: two-sided, so it ranks nothing (csl_fast.scores)


class CLIError(Exception):
    """A user error: printed as one line, exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE, prog: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see {self.prog} --help)", EXIT_USAGE, self.prog)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


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


# ----------------------------------------------------------------------------- parser
_DEBUG_HELP = "print the traceback of errors too"


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


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars or status lines (stderr)"
    )
    # SUPPRESS: a subcommand's default must not overwrite `csl-fast --debug CMD`.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    parser = _Parser(
        prog="csl-fast",
        description="Cumulative Sample Loss for free: find mislabeled, duplicated and "
        "memorized training samples from per-sample training dynamics.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 usage error, 3 bad or missing input "
        "file or unwritable output, 4 missing optional dependency, 130 interrupted. "
        "--debug prints tracebacks. Run `csl-fast demo` first.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"csl_fast {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
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
        "tracker and the cleaning plan. About a minute on 2 CPU cores with the defaults.",
    )
    p.add_argument(
        "--samples",
        type=_positive_int,
        default=d.samples,
        help=f"training-set size, at most {DIGITS_SAMPLES}; the digits left out are the clean "
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
        help=f"fraction of labels flipped (default {d.noise})",
    )
    p.add_argument(
        "--pairs",
        type=_nonneg_int,
        default=d.pairs,
        help=f"conflicting-label duplicate pairs (default {d.pairs})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help=f"seed of the corruption, initialisation and batches (default {d.seed})",
    )
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument(
        "--hidden",
        type=_positive_int,
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
        type=_positive_int,
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
        "more suspicious). CSV columns: " + ",".join(CSV_COLUMNS) + " (empty when unknown).",
    )
    p.add_argument("run", metavar="RUN", help="run folder (with tracker.csl) or tracker file")
    p.add_argument(
        "--score",
        default="csl",
        choices=_SCORE_NAMES,
        metavar="NAME",
        help="score to rank by: " + ", ".join(_SCORE_NAMES) + " (default csl)",
    )
    p.add_argument("--top", type=_positive_int, default=20, help="number of samples (default 20)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV instead of a table")
    fmt.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")

    p = sub.add_parser(
        "report",
        parents=[common],
        help="the visual report (HTML + PNGs) of a saved run",
        description="Write report.html (self-contained) and its PNGs for a saved run.",
    )
    p.add_argument("run", metavar="RUN", help="run folder (with tracker.csl) or tracker file")
    p.add_argument("--out", default=None, help="output folder (default: RUN/report)")
    p.add_argument(
        "--score",
        default="csl",
        choices=_SCORE_NAMES,
        metavar="NAME",
        help="score of the top-k table and grid (default csl)",
    )
    p.add_argument(
        "--top", type=_positive_int, default=24, help="suspicious samples shown (default 24)"
    )

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


# ----------------------------------------------------------------------------- runs
def _resolve_run(run: str) -> tuple[str, str | None]:
    """``(tracker path, samples path or None)`` of a run folder or tracker file."""
    from .report import SAMPLES_FILE

    if os.path.isdir(run):
        tracker_path = os.path.join(run, TRACKER_FILE)
        if not os.path.exists(tracker_path):
            raise CLIError(
                f"{run}: no {TRACKER_FILE} in this folder (is it a run folder?)", EXIT_INPUT
            )
    else:
        tracker_path = run
        if not os.path.exists(run):
            raise CLIError(f"no such run folder or tracker file: {run!r}", EXIT_INPUT)
    samples = os.path.join(os.path.dirname(os.path.abspath(tracker_path)), SAMPLES_FILE)
    return tracker_path, samples if os.path.exists(samples) else None


def load_run(run: str) -> tuple[Any, Any]:
    """``(tracker, samples or None)`` of a run; one-line :class:`CLIError` on bad input."""
    from .report import RunSamples, SamplesFileError
    from .tracker import CSLTracker, TrackerFileError, UnverifiedTrackerFileWarning

    tracker_path, samples_path = _resolve_run(run)
    if os.path.isdir(tracker_path):
        raise CLIError(f"{tracker_path}: is a folder, not a tracker file", EXIT_INPUT)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnverifiedTrackerFileWarning)
            tracker = CSLTracker.from_file(tracker_path)
        for w in caught:  # ours as one line; any other warning as it came
            if issubclass(w.category, UnverifiedTrackerFileWarning):
                print(f"csl-fast: warning: {_one_line(w.message)}", file=sys.stderr)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except FileNotFoundError as exc:
        raise CLIError(str(exc).removeprefix("csl_fast: "), EXIT_INPUT) from None
    except (TrackerFileError, OSError) as exc:
        raise CLIError(_one_line(exc), EXIT_INPUT) from None
    samples = None
    if samples_path is not None:
        try:
            samples = RunSamples.load(samples_path, tracker.num_samples)
        except SamplesFileError as exc:
            raise CLIError(_one_line(exc), EXIT_INPUT) from None
    return tracker, samples


def _scores_for(tracker: Any, name: str) -> Any:
    from .scores import SCORES, scores

    available = scores(tracker)
    if name not in available:
        needs = SCORES[name].needs
        why = {
            "eval": "eval passes (csl_fast.score_epoch)",
            "input_grad": "input-gradient norms (tracker.watch)",
            "train": "training presentations",
        }[needs]
        raise CLIError(
            f"score {name!r} was not recorded in this run (it needs {why}); available: "
            + ", ".join(available),
            EXIT_USAGE,
        )
    return available


# ----------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DIGITS_SAMPLES, DemoConfig, run

    if args.samples > DIGITS_SAMPLES:
        raise CLIError(f"--samples: digits has {DIGITS_SAMPLES} samples, got {args.samples}")
    if args.samples < 50:
        raise CLIError(f"--samples: need at least 50 samples, got {args.samples}")
    flipped = int(args.noise * args.samples)
    if 2 * args.pairs > args.samples - flipped:
        raise CLIError(
            f"--pairs {args.pairs}: {2 * args.pairs} samples do not fit among the "
            f"{args.samples - flipped} samples whose labels were not flipped"
        )
    if args.device is not None:
        _check_device(args.device)
    _writable_folder(args.out)
    cfg = DemoConfig(
        samples=args.samples,
        epochs=args.epochs,
        noise=args.noise,
        pairs=args.pairs,
        seed=args.seed,
        hidden=args.hidden,
        lr=args.lr,
        batch_size=args.batch_size,
        out=args.out,
        device=args.device,
        top=args.top,
        overhead_rounds=args.overhead_rounds,
        threads=args.threads,
        report=not args.no_report,
        quiet=args.quiet,
    )
    run(cfg)
    return EXIT_OK


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device: not a device: {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available in this torch build/machine")
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {device}: only cpu and cuda are supported")


def rank_rows(tracker: Any, samples: Any, score: str, top: int) -> list[dict[str, Any]]:
    """The top-``top`` rows of ``rank`` (keys :data:`CSV_COLUMNS`; ``None`` when unknown)."""
    from .detect import mislabeled

    _scores_for(tracker, score)  # a clear error when the score was not recorded
    det = mislabeled(tracker, score)  # the tracker: every view of the rule
    values = det.scores.detach().cpu().double()
    flagged = det.flagged.cpu()
    rows = []
    for r, i in enumerate(det.ranking[:top].tolist()):
        v = float(values[i])
        if not math.isfinite(v):
            break

        def field(name: str, i: int = i) -> Any:
            arr = None if samples is None else getattr(samples, name)
            if arr is None:
                return None
            return bool(arr[i]) if arr.dtype == bool else int(arr[i])

        rows.append(
            {
                "rank": r + 1,
                "index": i,
                "score": v,
                "label": field("labels"),
                "predicted": field("predicted"),
                "flagged": bool(flagged[i]),
                "mislabeled": field("mislabeled"),
                "duplicate": field("duplicate"),
            }
        )
    return rows


def _format_table(rows: list[dict[str, Any]], score: str) -> str:
    cols = [c for c in CSV_COLUMNS if any(r[c] is not None for r in rows)] or list(CSV_COLUMNS[:3])
    head = {c: (score if c == "score" else c) for c in cols}

    def cell(c: str, v: Any) -> str:
        if v is None:
            return "-"
        if c == "score":
            return f"{v:.4g}"
        if isinstance(v, bool):
            return "yes" if v else ""
        return str(v)

    body = [[cell(c, r[c]) for c in cols] for r in rows]
    widths = [max([len(head[c])] + [len(b[j]) for b in body]) for j, c in enumerate(cols)]
    lines = ["  ".join(head[c].rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def _format_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        out = []
        for c in CSV_COLUMNS:
            v = r[c]
            if v is None:
                out.append("")
            elif isinstance(v, bool):
                out.append("1" if v else "0")
            elif c == "score":
                out.append(repr(v))
            else:
                out.append(str(v))
        w.writerow(out)
    return buf.getvalue()


def cmd_rank(args: argparse.Namespace) -> int:
    tracker, samples = load_run(args.run)
    rows = rank_rows(tracker, samples, args.score, args.top)
    if args.csv:
        text = _format_csv(rows)
    elif args.json:
        text = (
            json.dumps(
                {
                    "run": args.run,
                    "score": args.score,
                    "direction": "higher = more suspicious",
                    "num_samples": tracker.num_samples,
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )
    else:
        text = _format_table(rows, args.score) + "\n"
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8", newline="") as f:
                f.write(text)
        except OSError as exc:
            raise CLIError(f"cannot write {args.output!r}: {exc.strerror}", EXIT_INPUT) from None
        if not args.quiet:
            print(f"wrote {len(rows)} rows to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    tracker, samples = load_run(args.run)
    _scores_for(tracker, args.score)
    if args.out is None:
        base = args.run if os.path.isdir(args.run) else os.path.dirname(os.path.abspath(args.run))
        out = os.path.join(base, "report")
    else:
        out = args.out
    _writable_folder(out)
    path = write_report(
        tracker,
        out,
        samples,
        notes=_run_notes(args.run),
        title=f"csl_fast report: {os.path.basename(os.path.abspath(args.run))}",
        score=args.score,
        top=args.top,
        progress=not args.quiet,
    )
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    print(f"wrote {path} and {len(pngs)} PNG files: {', '.join(pngs)}")
    return EXIT_OK


def _run_notes(run: str) -> list[tuple[str, str]]:
    """The demo's report notes (setup, overhead) from ``results.json`` beside the tracker."""
    base = run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run))
    try:
        with open(os.path.join(base, "results.json"), encoding="utf-8") as f:
            notes = json.load(f).get("report_notes") or []
        return [(str(h), str(t)) for h, t in notes]
    except (OSError, ValueError, TypeError, AttributeError):
        return []


_probability = _checked(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def _add_clean_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    from .clean import CSV_COLUMNS as CLEAN_COLUMNS
    from .clean import DEFAULT_MIN_CONFIDENCE, POLICIES

    p = sub.add_parser(
        "clean",
        parents=[common],
        help="one decision (drop or relabel) per flagged sample of a saved run, as CSV",
        description="Flag the suspicious samples of a saved run (csl_fast.detect.mislabeled) "
        "and write one decision per flagged sample to a CSV file with the columns "
        + ", ".join(CLEAN_COLUMNS)
        + " (rank 1-based, as in `csl-fast rank`; suggested_label and confidence empty where "
        "there is no suggestion). Policies: relabel-confident relabels a sample to its "
        "suggested label when the suggestion's confidence is at least --min-confidence and "
        "drops it otherwise; drop drops every flagged sample; review lists the --budget most "
        "suspicious samples, flagged or not, with the action relabel-confident would take.",
    )
    p.add_argument("run", metavar="RUN", help="run folder (with tracker.csl) or tracker file")
    p.add_argument("--out", required=True, metavar="FILE", help="the CSV file to write")
    p.add_argument(
        "--policy",
        default="relabel-confident",
        choices=POLICIES,
        help="what to do with a flagged sample (default relabel-confident)",
    )
    p.add_argument(
        "--budget",
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
        default="csl",
        choices=_SCORE_NAMES,
        metavar="NAME",
        help="score that ranks and flags the samples (default csl)",
    )


def cmd_clean(args: argparse.Namespace) -> int:
    from .clean import clean
    from .detect import DetectionWarning, mislabeled

    if args.policy == "review" and args.budget is None:
        raise CLIError("--policy review needs --budget K (how many samples you will review)")
    if os.path.isdir(args.out):
        raise CLIError(f"--out {args.out!r} is a folder; give a file name", EXIT_INPUT)
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise CLIError(f"--out {args.out!r}: no folder {parent!r} to write it in", EXIT_INPUT)
    tracker, samples = load_run(args.run)
    with warnings.catch_warnings():
        # the detection's warning, if any, is printed below as one line
        warnings.simplefilter("ignore", DetectionWarning)
        _scores_for(tracker, args.score)  # a clear error when the score was not recorded
        det = mislabeled(tracker, args.score)  # the tracker: every view of the rule
    plan = clean(
        tracker,
        detection=det,
        policy=args.policy,
        min_confidence=args.min_confidence,
        budget=args.budget,
    )
    try:
        plan.to_csv(args.out)
    except OSError as exc:
        raise CLIError(f"cannot write {args.out!r}: {exc.strerror}", EXIT_INPUT) from None
    if plan.warning:
        print(f"csl-fast clean: warning: {_one_line(plan.warning)}", file=sys.stderr)
    print(_clean_summary(plan, samples, args))
    return EXIT_OK


def _clean_summary(plan: Any, samples: Any, args: argparse.Namespace) -> str:
    det = plan.detection
    lines = [
        f"wrote {len(plan)} decisions to {args.out}: {plan.num_relabeled} relabel, "
        f"{plan.num_dropped} drop (policy {args.policy}"
        + ("" if args.budget is None else f", budget {args.budget}")
        + f", min confidence {args.min_confidence:g})",
        f"flagged {len(det)} of {det.scores.numel()} samples by {args.score} (rule {det.rule})",
    ]
    if det.estimated_count is not None and det.count_interval is not None:
        lo, hi = det.count_interval
        lines.append(f"estimated mislabeled: {det.estimated_count} (interval {lo}-{hi})")
    if det.diagnostics.get("note"):
        lines.append(f"note: {det.diagnostics['note']}")
    if samples is None or not samples.has_truth or len(plan) == 0:
        return "\n".join(lines)
    from .clean import evaluate_plan

    acc = evaluate_plan(plan, samples.true_labels, samples.mislabeled, samples.duplicate)
    lines.append(
        f"ground truth (samples.npz): of the {len(plan)} rows {acc['mislabeled']} are "
        f"mislabeled, {acc['duplicate']} duplicated, {acc['clean']} clean"
        + (
            ""
            if acc["relabel_correct"] is None
            else f"; {acc['relabel_correct']} of {plan.num_relabeled} relabels give the true label"
        )
    )
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from .info import report

    print(report())
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    if args.device is not None:
        _check_device(args.device)
    try:
        from .bench import run_short
    except ImportError as exc:
        if exc.name and exc.name.endswith("csl_fast.bench"):
            raise CLIError(
                "the benchmark module is not part of this installation", EXIT_DEPENDENCY
            ) from None
        raise
    if args.quiet:
        with _stderr_fd_silenced():
            text = run_short(device=args.device, quiet=True)
    else:
        text = _bench_verbose(run_short, args.device)
    print(text)
    return EXIT_OK


@contextlib.contextmanager
def _stderr_fd_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block.

    The CPU memory probe runs torch's profiler, whose Kineto backend logs
    ``profiler_start``/``profiler_stop`` lines from C++ straight to fd 2, past
    ``sys.stderr``; only the descriptor itself can silence them. An exception raised
    inside still propagates and is reported by ``main`` after fd 2 is restored.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _bench_verbose(run_short: Any, device: str | None) -> str:
    # run_short prints its report itself unless quiet; capture that so the report is
    # printed exactly once, by us, while its status lines still reach stderr.
    buf = io.StringIO()
    real = sys.stdout
    sys.stdout = buf
    try:
        return run_short(device=device, quiet=False)
    finally:
        sys.stdout = real


COMMANDS = {
    "demo": cmd_demo,
    "rank": cmd_rank,
    "report": cmd_report,
    "clean": cmd_clean,
    "info": cmd_info,
    "bench": cmd_bench,
}

_OPTIONAL = {
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "pandas": "pandas",
}


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
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        prog = f"csl-fast {args.command}"
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
