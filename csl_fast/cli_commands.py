"""The subcommands of ``csl-fast``: loading a run, and ``demo``, ``rank``, ``report``,
``clean``, ``info`` and ``bench`` (one ``cmd_*`` function each, taking the parsed arguments
and returning the exit code). The parser and the entry point are in :mod:`csl_fast.cli`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import math
import os
import sys
import warnings
from typing import Any, TextIO

from . import atomic_file, huge_pages
from .cli_clean import cmd_clean
from .cli_errors import (
    EXIT_DEPENDENCY,
    EXIT_INPUT,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    _one_line,
    _writable_folder,
    warning_line,
)

TRACKER_FILE = "tracker.csl"
CSV_COLUMNS = (
    "rank",
    "index",
    "score",
    "label",
    "predicted",
    "flagged",
    "mislabeled",
    "duplicate",
    "group",
)

_SCORE_NAMES = (
    "csl",
    "csl_mean",
    "eval_csl",
    "eval_csl_mean",
    "final_loss",
    "forgetting",
    "threshold_learning_time",
    "learning_time",
    "loss_sensitivity",
    "aum",
    "in_confidence",
    "confidence",
    "logit_grad_norm",
    "label_csl",
)  # not variability: two-sided, so it ranks nothing (csl_fast.scores). label_csl ranks
# (sample, label) entries of a tracker with num_labels (csl_fast.accumulate_bce).
ENTRY_CSV_COLUMNS = ("rank", "index", "entry_label", "score", "flagged")


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


def output_stream(out: str, option: str) -> TextIO | None:
    """The standard stream an output path names (``-`` or ``/dev/stdout``: standard output;
    ``/dev/stderr``), or None for a file. Written as a file, ``/dev/stdout`` replaced the
    file the shell redirected it to (a script's log) with the output alone."""
    if out == "-":
        return sys.stdout
    fd = atomic_file.descriptor_of(out)
    if fd is None:
        return None
    if fd in (1, 2):
        return sys.stdout if fd == 1 else sys.stderr
    raise CLIError(
        f"{option} {out!r} names an open file descriptor other than standard output or "
        "error; give a file name, or - for standard output",
        EXIT_INPUT,
    )


def check_output(run: str, out: str, option: str, *others: str | None) -> None:
    """Refuse, before any work, an output path that cannot be written (a folder, or in a
    folder that does not exist) or that names one of the command's input files (the run's
    tracker or samples file, ``others``): ``clean RUN --out RUN/tracker.csl`` replaced the
    tracker with the CSV and exited 0."""
    if os.path.isdir(out):
        raise CLIError(f"{option} {out!r} is a folder; give a file name", EXIT_INPUT)
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CLIError(f"{option} {out!r}: no folder {parent!r} to write it in", EXIT_INPUT)
    if not os.path.exists(out):
        return
    for path in (*_resolve_run(run), *others):
        if path is not None and os.path.exists(path) and os.path.samefile(out, path):
            raise CLIError(
                f"{option} {out!r} is an input of this command ({path}): writing it would "
                "destroy it; choose another file",
                EXIT_INPUT,
            )


#: Tracker files from this size on (about a million samples) get a status line: reading,
#: checking and scoring 10 million samples takes several seconds (8 s for ``rank`` on 2
#: cores), which showed nothing on the terminal.
LARGE_RUN_BYTES = 100 << 20


def load_run_for(args: argparse.Namespace) -> tuple[Any, Any]:
    """:func:`load_run` of ``args.run``; an ``args.score`` left unset becomes the
    detectors' default for this tracker (:func:`csl_fast.detect.default_score`), or
    ``eval_csl`` (``eval_csl_mean`` where eval counts differ:
    :func:`csl_fast.detect.default_eval_score`) for a run of eval passes alone (the default
    ``csl`` was refused there as a usage error the user never made)."""
    tracker, samples = load_run(args.run, args.quiet)
    if args.score is None:
        from .detect import default_eval_score, default_score

        eval_only = not bool(tracker.csl_count.any()) and bool(tracker.eval_count.any())
        args.score = default_eval_score(tracker) if eval_only else default_score(tracker)
    return tracker, samples


def load_run(run: str, quiet: bool = False) -> tuple[Any, Any]:
    """``(tracker, samples or None)`` of a run; one-line :class:`CLIError` on bad input.
    A large run gets a status line on stderr unless ``quiet``."""
    from .report import RunSamples, SamplesFileError
    from .tracker import CSLTracker, TrackerFileError, UnverifiedTrackerFileWarning

    tracker_path, samples_path = _resolve_run(run)
    if os.path.isdir(tracker_path):
        raise CLIError(f"{tracker_path}: is a folder, not a tracker file", EXIT_INPUT)
    with contextlib.suppress(OSError):
        size = os.path.getsize(tracker_path)
        if size >= LARGE_RUN_BYTES and not quiet:
            print(
                f"csl-fast: reading {tracker_path} ({size / 2**20:,.0f} MiB), a large run: "
                "ranking it takes seconds (8 s at 10 million samples on 2 cores)",
                file=sys.stderr,
                flush=True,
            )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnverifiedTrackerFileWarning)
            with huge_pages.not_asked():  # the CLI reads; it records nothing
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
    _check_recorded(tracker, tracker_path)
    samples = None
    if samples_path is not None:
        try:
            samples = RunSamples.load(samples_path, tracker.num_samples)
        except SamplesFileError as exc:
            raise CLIError(_one_line(exc), EXIT_INPUT) from None
        _check_sample_classes(samples, tracker, samples_path)
    return tracker, samples


def _check_sample_classes(samples: Any, tracker: Any, samples_path: str) -> None:
    """Refuse a samples.npz whose labels are not classes of the run (of another run with
    as many samples, or encoded otherwise): rank, the report and the ground truth behind
    "mislabeled" showed them as they were. Sequences are labelled by token strings, and a
    multi-label run has no class count."""
    classes = tracker.num_classes
    if classes is None or tracker.sequences or tracker.num_labels is not None:
        return
    for name in ("labels", "true_labels", "predicted"):
        values = getattr(samples, name)
        if values is None or values.size == 0:
            continue
        low, high = int(values.min()), int(values.max())
        # a negative label is an unlabelled sample (ignore_index), as the run trained on it
        if (low < 0 and name != "labels") or high >= classes:
            raise CLIError(
                f"{samples_path}: its {name} range over [{low}, {high}], but the run has "
                f"C = {classes} classes: they must be class indices in [0, {classes}) (a "
                "samples.npz of another run?)",
                EXIT_INPUT,
            )


def _check_recorded(tracker: Any, tracker_path: str) -> None:
    """Refuse a tracker without a single score (saved before any training step, trained
    on non-finite losses only, or with ``N = 0``) as bad input, in every command that
    reads a run: each needs a score, and no option can give one."""
    from .scores import diverged_reason, recorded_names

    if not recorded_names(tracker):
        diverged = diverged_reason(tracker)
        why = (
            f"): {diverged}"
            if diverged
            else (
                "; a tracker saved before any training step?): save the tracker after training "
                "on it"
            )
        )
        raise CLIError(
            f"{tracker_path}: the run recorded nothing (no training presentation, eval pass "
            f"or input-gradient record{why}",
            EXIT_INPUT,
        )


def _scores_for(tracker: Any, name: str) -> list[str]:
    """The names of the scores ``tracker`` recorded (what ``csl_fast.scores(tracker)``
    returns, none computed); a clear error when ``name`` is not among them."""
    from .scores import SCORES, has_logit_stats, recorded_names

    available = recorded_names(tracker)
    if name == "label_csl":
        if tracker.label_csl is None:
            from .report import NO_LABEL_CSL

            raise CLIError(f"{NO_LABEL_CSL}; available: " + ", ".join(available), EXIT_USAGE)
        return available
    if name not in available:
        needs = SCORES[name].needs
        why = {
            "eval": "eval passes (csl_fast.score_epoch)",
            "input_grad": "input-gradient norms (tracker.watch)",
            "input_grad_epochs": "an epoch closed with input-gradient norms (tracker.watch, "
            "then tracker.end_epoch())",
            "train": "training presentations",
            "logits": "the softmax statistics of csl_fast.accumulate's cross entropy",
        }[needs]
        also = ""
        if needs == "logits" and not has_logit_stats(tracker):
            also = (
                ", and this run recorded losses only (csl_fast.record_loss or "
                "csl_fast.accumulate_bce)"
            )
        raise CLIError(
            f"score {name!r} was not recorded in this run (it needs {why}{also}); available: "
            + ", ".join([*available, *(["label_csl"] if tracker.label_csl is not None else [])]),
            EXIT_USAGE,
        )
    return available


def loss_only(tracker: Any) -> bool:
    """The run recorded losses without softmax statistics (record_loss, accumulate_bce):
    the cross-entropy rule, its advice and suggested labels do not apply."""
    from .scores import has_logit_stats

    return bool((tracker.csl_count > 0).any()) and not has_logit_stats(tracker)


def detection_for(tracker: Any, score: str, labels: Any = None) -> Any:
    """The flagged set the CLI shows: :func:`csl_fast.detect.mislabeled` for a
    cross-entropy run (given the run's ``labels``, when they are class labels: the classes
    in use), the tail rule of :mod:`csl_fast.detect_losses` for a loss-only one
    (per entry for ``label_csl``). Its warning is left to the caller."""
    from . import detect_losses
    from .cleaning import default_detection

    if score == "label_csl":
        try:
            return detect_losses.mislabeled_entries(tracker)
        except ValueError as exc:  # a run without per-label CSL: a usage error, not a crash
            raise CLIError(f"--score label_csl: {exc}") from None
    return default_detection(tracker, score, labels)  # the tracker: every view of the rule


def _loss_only_note(tracker: Any, score: str) -> str | None:
    from .scores import LOSS_ONLY

    if score == "label_csl":
        return (
            "ranking (sample, label) entries by per-label CSL; flagged by "
            "csl_fast.detect_losses.mislabeled_entries (the tail rule, its doubt gate and "
            "the two-view count)"
        )
    if loss_only(tracker):
        return f"{LOSS_ONLY}; flagged by the tail rule of csl_fast.detect_losses"
    return None


# ----------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, DemoConfigError, run

    if args.device is not None:
        _check_device(args.device)
    try:
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
    except DemoConfigError as e:  # (the library's checks, said with the option's name)
        raise CLIError(f"--{e.option.replace('_', '-')}: {e.problem}") from None
    _writable_folder(args.out)
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


def rank_rows(
    tracker: Any, samples: Any, score: str, top: int, inputs: Any = None, labels: Any = None
) -> list[dict[str, Any]]:
    """The top-``top`` rows of ``rank`` (keys :data:`CSV_COLUMNS`, or
    :data:`ENTRY_CSV_COLUMNS` for ``label_csl``; ``None`` when unknown).

    With ``inputs`` (``[N, ...]``, and optionally int ``[N]`` ``labels``), ``flagged``
    also marks the samples :func:`csl_fast.detect.duplicates` flags, and ``group`` is
    the sample's group of identical inputs (numbered from 0 by smallest index; ``None``
    for a sample without an identical partner, or without inputs)."""
    return _rank(tracker, samples, score, top, inputs, labels)[0].rows()


#: Rows formatted (and written) at a time by ``rank``'s CSV and JSON output.
RANK_CHUNK = 16384
#: ``rank`` shows a progress bar on stderr (unless ``-q``, and when tqdm is installed)
#: while it writes at least this many CSV or JSON rows.
RANK_PROGRESS_ROWS = 200_000


class _RankTable:
    """The rows of ``rank`` as columns (arrays in ranked order, indexed once), turned
    into Python values (as :func:`rank_rows` gives them) a chunk of rows at a time: the
    whole ranking of a large run was a list of dicts, then a whole CSV/JSON text."""

    def __init__(self, columns: tuple[str, ...], data: dict[str, Any], length: int) -> None:
        self.columns = columns
        self.data = data  # name -> array in row order, (array, row order), or None
        self.length = length

    def __len__(self) -> int:
        return self.length

    def values(self, c: str, start: int, stop: int) -> list[Any]:
        """Column ``c`` of rows ``start:stop``, as Python values (``None``: unknown)."""
        if c == "rank":
            return list(range(start + 1, stop + 1))
        src = self.data[c]
        if src is None:
            return [None] * (stop - start)
        if isinstance(src, tuple):  # a samples field, indexed by the rows' sample indices
            arr, order = src
            return _field_values(arr, order, start, stop)
        vals = src[start:stop].tolist()
        if c == "group":
            return [None if g < 0 else g for g in vals]
        return vals

    def chunks(self, size: int | None = None) -> Any:
        """``(start, stop, columns)``: the columns' values, ``size`` (default
        :data:`RANK_CHUNK`) rows at a time."""
        size = size or RANK_CHUNK
        for start in range(0, self.length, size):
            stop = min(start + size, self.length)
            yield start, stop, [self.values(c, start, stop) for c in self.columns]

    def rows(self) -> list[dict[str, Any]]:
        cols = self.columns
        return [
            dict(zip(cols, r, strict=True))
            for _, _, v in self.chunks()
            for r in zip(*v, strict=True)
        ]


def _field_values(arr: Any, order: Any, start: int, stop: int) -> list[Any]:
    """A samples field of rows ``start:stop``: a Python bool, int or float, or a flat list
    for a row (a multi-label target, a sequence's token labels): a regression's 0.73 was
    printed as int 0. A NaN target is None (JSON has no NaN: --json wrote a bare NaN)."""
    import torch

    idx = order[start:stop]
    part = arr[torch.from_numpy(idx)] if isinstance(arr, torch.Tensor) else arr[idx]
    if part.ndim > 1:
        rows = part.reshape(len(idx), math.prod(part.shape[1:])).tolist()
        return [[None if x != x else x for x in v] for v in rows]  # (x != x: a NaN)
    return [None if x != x else x for x in part.tolist()]


def _rank(
    tracker: Any, samples: Any, score: str, top: int, inputs: Any, labels: Any
) -> tuple[_RankTable, Any, Any]:
    """:func:`rank_rows` (as a :class:`_RankTable`), the duplicate detection (None without
    inputs) and the detection behind ``flagged``."""
    import numpy as np

    from . import duplicate_groups
    from .cli_inputs import duplicates_for
    from .detect import DetectionWarning

    _scores_for(tracker, score)  # a clear error when the score was not recorded
    with warnings.catch_warnings():
        # about the samples of the flagged column's rule (the same one) when it flagged
        # groups: said by that rule itself, below; said here only when it flagged none
        warnings.simplefilter("ignore", DetectionWarning)
        dup = duplicates_for(tracker, score, inputs, labels, loss_only(tracker))
    if dup is not None and dup.warning is not None and not dup.groups:
        warnings.warn(dup.warning, DetectionWarning, stacklevel=3)
    # (the samples' labels count the classes in use, with or without --inputs)
    class_labels = getattr(samples, "labels", None) if labels is None else labels
    det = detection_for(tracker, score, class_labels)
    if score == "label_csl":
        return _entry_rows(det, top), dup, det
    values = det.scores.detach().cpu().double().numpy()
    flagged = det.flagged.cpu()
    ids = None
    if dup is not None:
        flagged = flagged | dup.flagged.cpu()
        ids = duplicate_groups.group_ids(inputs)
    # (not ranking: held-out samples an eval pass scored were listed after the ranked
    # ones with rank numbers, right after the note that said they are not ranked)
    order = det.ranked[:top].cpu().numpy().astype(np.int64, copy=False)

    def field(name: str) -> Any:
        arr = None if samples is None else getattr(samples, name)
        if name == "labels" and labels is not None:
            arr = labels  # --labels: the run's given labels, as samples.npz keeps them
        return None if arr is None else (arr, order)

    data = {
        "index": order,
        "score": values[order],
        "label": field("labels"),
        "predicted": field("predicted"),
        "flagged": flagged.numpy()[order],
        "mislabeled": field("mislabeled"),
        "duplicate": field("duplicate"),
        "group": None if ids is None else ids.cpu().numpy()[order],
    }
    return _RankTable(CSV_COLUMNS, data, len(order)), dup, det


def _entry_rows(det: Any, top: int) -> _RankTable:
    import torch

    values = det.scores.detach().cpu().double()
    flagged = det.flagged.cpu()
    entries = det.top(top).cpu().reshape(-1, 2)
    i, k = entries[:, 0], entries[:, 1]
    v = values[i, k]
    # (the ranking stops at the first entry without a finite value)
    bad = (~torch.isfinite(v)).nonzero()
    n = int(bad[0, 0]) if len(bad) else len(v)
    data = {
        "index": i[:n].numpy(),
        "entry_label": k[:n].numpy(),
        "score": v[:n].numpy(),
        "flagged": flagged[i[:n], k[:n]].numpy(),
    }
    return _RankTable(ENTRY_CSV_COLUMNS, data, n)


def _format_table(rows: list[dict[str, Any]], score: str, shown: str | None = None) -> str:
    """The table of ``rows``; ``shown``: the score column's heading (default ``score``)."""
    from .duplicate_groups import label_text

    columns = ENTRY_CSV_COLUMNS if score == "label_csl" else CSV_COLUMNS
    cols = [c for c in columns if any(r[c] is not None for r in rows)] or list(columns[:3])
    head = {c: ((shown or score) if c == "score" else c) for c in cols}

    def cell(c: str, v: Any) -> str:
        if v is None:
            return "-"
        if c == "score":
            return f"{v:.4g}"
        if c == "label":  # (a bool target is 0 or 1, not "yes" or blank)
            return label_text(v)
        if isinstance(v, bool):
            return "yes" if v else ""
        return str(v)

    body = [[cell(c, r[c]) for c in cols] for r in rows]
    widths = [max([len(head[c])] + [len(b[j]) for b in body]) for j, c in enumerate(cols)]
    lines = ["  ".join(head[c].rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, list):  # a row's values, space-separated (no list brackets)
        return " ".join("" if x is None else str(x) for x in v)
    return str(v)


def _csv_cells(c: str, vals: list[Any]) -> list[str] | map[str]:
    if c == "score":
        return map(repr, vals)
    if c in ("rank", "index", "entry_label"):  # (ints, never None)
        return map(str, vals)
    if c == "flagged":
        return ["1" if v else "0" for v in vals]
    return map(_csv_cell, vals)


def _write_csv(table: _RankTable, f: TextIO, bar: Any = None) -> None:
    """The CSV of ``table``, written to ``f`` a chunk of rows at a time."""
    w = csv.writer(f, lineterminator="\n")
    w.writerow(table.columns)
    for start, stop, cols in table.chunks():
        w.writerows(
            zip(*(_csv_cells(c, v) for c, v in zip(table.columns, cols, strict=True)), strict=True)
        )
        if bar is not None:
            bar.update(stop - start)


def _json_cell(v: Any) -> str:
    """``v`` as ``json.dumps(..., indent=2)`` writes it as a value of a row of the list."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if type(v) is int:
        return int.__repr__(v)
    if type(v) is float and math.isfinite(v):
        return float.__repr__(v)
    # a list (a row's values) is indented as the row's keys are; NaN, Infinity, others
    return json.dumps(v, indent=2).replace("\n", "\n      ")


def _json_cells(c: str, vals: list[Any]) -> list[str]:
    if c in ("rank", "index", "entry_label"):  # (ints, never None)
        return list(map(str, vals))
    if c == "flagged":
        return ["true" if v else "false" for v in vals]
    return list(map(_json_cell, vals))


def _write_json(table: _RankTable, payload: dict[str, Any], f: TextIO, bar: Any = None) -> None:
    """``json.dumps({**payload, "rows": rows}, indent=2) + "\\n"``, written to ``f`` a chunk
    of rows at a time (the same bytes)."""
    head = json.dumps({**payload, "rows": []}, indent=2)
    if not table.length:
        f.write(head + "\n")
        return
    head, tail = head.rsplit("[]", 1)
    # one row: its keys at indent 6, the row's braces at indent 4
    row = "    {{\n" + ",\n".join(f"      {json.dumps(c)}: {{}}" for c in table.columns)
    row = row + "\n    }}"
    f.write(head + "[\n")
    for start, stop, cols in table.chunks():
        cells = [_json_cells(c, v) for c, v in zip(table.columns, cols, strict=True)]
        text = ",\n".join(row.format(*r) for r in zip(*cells, strict=True))
        f.write(text if start == 0 else ",\n" + text)
        if bar is not None:
            bar.update(stop - start)
    f.write("\n  ]" + tail + "\n")


def _progress(rows: int, quiet: bool, what: str, out: TextIO) -> Any:
    """A tqdm bar on stderr over the rows written to ``out`` (None under ``-q``, for fewer
    than :data:`RANK_PROGRESS_ROWS` rows, without tqdm, or where ``out`` is stderr's own
    file: ``-o /dev/stderr``, or ``-o - > f 2>&1``, where the bar landed in the CSV)."""
    if quiet or rows < RANK_PROGRESS_ROWS or _same_file(out, sys.stderr):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=rows, desc=what, unit=" rows", leave=False, file=sys.stderr)


def _same_file(a: TextIO, b: TextIO) -> bool:
    if a is b:
        return True
    try:
        return os.path.sameopenfile(a.fileno(), b.fileno())
    except (AttributeError, OSError, ValueError):  # (a StringIO, a closed stream)
        return False


def cmd_rank(args: argparse.Namespace) -> int:
    from .cli_inputs import duplicates_summary, run_inputs
    from .scores import epochs_without_loss, no_epoch_closed

    stream = output_stream(args.output, "--output") if args.output else sys.stdout
    if stream is None:
        check_output(args.run, args.output, "--output", args.inputs, args.labels)
    tracker, samples = load_run_for(args)
    inputs, labels, aside = run_inputs(args, tracker, samples)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows, dup, det = _rank(tracker, samples, args.score, args.top, inputs, labels)
    # the detection's own note: why the rule does not apply to this score, or why its
    # flagged set is arbitrary (a cut inside a tie), which the table cannot show
    notes = [_loss_only_note(tracker, args.score), det.diagnostics.get("note"), aside]
    if dup is not None:
        notes.append(dup.diagnostics.get("note"))
    notes = [n for i, n in enumerate(notes) if n and n not in notes[:i]]
    lost = epochs_without_loss(tracker)
    note = "; ".join([*notes, *([lost] if lost else [])]) or None
    said = _echo_detection_warnings(caught, "rank")
    if lost is not None:  # a warning, --quiet or not: what every score rests on
        print(f"csl-fast rank: warning: {lost}", file=sys.stderr)
    if not args.quiet:
        for line in notes:
            # a warning that quotes the note says it (as a sentence of its own, capitalised)
            quoted = (line, line[:1].upper() + line[1:])
            if not any(q in w for q in quoted for w in said):
                print(f"csl-fast rank: note: {line}", file=sys.stderr)
    if dup is not None and not args.quiet:
        print(f"csl-fast rank: {duplicates_summary(dup)}", file=sys.stderr)
    unscored = _unscored_note(tracker, det, args.score, args.top, len(rows))
    if unscored is not None and not args.quiet:
        print(f"csl-fast rank: note: {unscored}", file=sys.stderr)
    no_epoch = no_epoch_closed(tracker)
    # (a score that counts epochs warned of it already)
    warned = any(no_epoch in str(w.message) for w in caught) if no_epoch else True
    if not warned and not args.quiet:
        print(f"csl-fast rank: note: {no_epoch}", file=sys.stderr)
    # label_csl's entries are ranked by their mean where presentation counts differ
    # (detect_losses.mislabeled_entries): a column headed label_csl showed the means
    shown = det.score_name if args.score == "label_csl" else args.score
    payload: dict[str, Any] | None = None
    if args.json:
        payload = {
            "run": args.run,
            "score": shown,
            "direction": "higher = more suspicious",
            "num_samples": tracker.num_samples,
        }
        if note is not None:
            payload["note"] = note
        # what the flagged column rests on, as the detection says it
        payload["flagged_count"] = int(det.flagged.sum())
        payload["estimated_count"] = det.estimated_count
        payload["count_interval"] = None if det.count_interval is None else list(det.count_interval)
        payload["warning"] = det.warning
        if dup is not None:
            payload["duplicates"] = duplicates_summary(dup)
            # the flagged column also marks the conflicting groups' members: its total
            payload["flagged_with_duplicates_count"] = int((det.flagged | dup.flagged).sum())

    def fill(f: TextIO) -> None:
        # CSV and JSON a chunk of rows at a time, with a progress bar for a long ranking
        # (the whole ranking of a large run was a list of dicts, then one text: 2.4 GB
        # and 34 s for the JSON of a million samples, nothing on the terminal meanwhile)
        if not (args.csv or args.json):
            f.write(_format_table(rows.rows(), args.score, shown) + "\n")
            return
        bar = _progress(len(rows), args.quiet, "rank", f)
        try:
            if args.csv:
                _write_csv(rows, f, bar)
            else:
                assert payload is not None
                _write_json(rows, payload, f, bar)
        finally:
            if bar is not None:
                bar.close()

    if stream is None:
        try:
            atomic_file.write_text(args.output, fill, "write", "rank.csv")
        except OSError as exc:
            raise CLIError(exc.strerror, EXIT_INPUT) from None
        if not args.quiet:
            print(f"wrote {len(rows)} rows to {args.output}", file=sys.stderr)
    else:
        fill(stream)
    return EXIT_OK


def _unscored_note(tracker: Any, det: Any, score: str, top: int, listed: int) -> str | None:
    """Why fewer than ``--top`` rows were listed: samples without a finite score (never
    presented, or the score is undefined for them) are not ranked, nor are held-out ones
    an eval pass scored (:func:`value_counts`)."""
    size = tracker.num_samples
    if score == "label_csl" and tracker.label_csl is not None:
        size *= tracker.label_csl.shape[1]
    if listed >= min(top, size):
        return None
    from .scores import unscored_reason

    what = "(sample, label) entries" if score == "label_csl" else "samples"
    valued, held = value_counts(det)
    if not held:
        return (
            f"listed {listed} of the --top {top}: only {listed} of the {size} {what} have a "
            f"{score} value; the others were {unscored_reason(score, tracker)} or the score is "
            f"undefined for them, and are not ranked{other_loss_clause(tracker, score)}"
        )
    # (it said "only 50 of the 400 samples have a value" of a run whose eval passes had
    # scored 150: the 100 held out among them were counted as having none)
    # ("the other 0 were never scored" when every sample had a value)
    others = (
        f"; the other {size - valued} were {unscored_reason(score, tracker)} or the score is "
        "undefined for them"
        if valued < size
        else ""
    )
    return (
        f"listed {listed} of the --top {top}: {valued} of the {size} {what} have a {score} "
        f"value, but {held} of them are {HELD_OUT}, and are not ranked{others}"
        f"{other_loss_clause(tracker, score)}"
    )


def other_loss_clause(tracker: Any, score: str) -> str:
    """``"; k of them ..."``: the samples without a value that were presented, recorded
    without softmax statistics in a tracker that mixes recorders (the detection gives them
    no score, :func:`csl_fast.scores.mixed_recorders`), which the notes called never
    presented; ``""`` when there are none."""
    from .scores import mixed_recorders, other_loss

    if score == "label_csl" or mixed_recorders(tracker) is None:
        return ""
    k = int(other_loss(tracker).sum())
    return (
        f"; but {k} of those without one were presented, recorded without softmax "
        "statistics (another recorder fed this tracker): the detection gives them no score"
    )


#: The samples with a score that are not ranked (:attr:`csl_fast.detect.Detection.ranked`).
HELD_OUT = "held out (scored by an eval pass, never trained on)"


def value_counts(det: Any) -> tuple[int, int]:
    """``(valued, held)``: how many samples of the detection ``det`` have a finite score,
    and how many of those are held out (an eval pass scored them, the run never trained
    on them), which the detection does not rank beside trained ones."""
    import torch

    valued = int(torch.isfinite(det.scores).sum())
    return valued, max(valued - int(det.ranked.shape[0]), 0)


def _echo_detection_warnings(caught: list[Any], command: str) -> set[str]:
    """A detection's warning as one stderr line, ``--quiet`` or not: it says why the
    flagged set is empty or what it rests on, not how far the work is (other warnings
    re-emitted as they came). Returns the lines said."""
    from .detect import SCORE_RULE_SAID, DetectionWarning

    said: set[str] = set()
    for w in caught:
        if issubclass(w.category, DetectionWarning):
            # the duplicates' quote of the score rule's warning, which is said on its own
            line = warning_line(_one_line(w.message).split(SCORE_RULE_SAID)[0])
            if line not in said:  # the flagged column's and the duplicates' detections
                said.add(line)
                print(f"csl-fast {command}: warning: {line}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return said


def cmd_report(args: argparse.Namespace) -> int:
    from .cli_inputs import run_inputs, say_note
    from .report import FIGURES, write_report
    from .scores import recorded_names

    tracker, samples = load_run_for(args)
    if not bool((tracker.csl_count > 0).any()):
        # an eval pass alone (csl_fast.score_epoch): the page's figures are of training.
        # Before the score check: "score 'csl' was not recorded; available: eval_csl" sent
        # the user to --score eval_csl, which this then refused
        score = args.score if args.score in recorded_names(tracker) else "eval_csl"
        raise CLIError(
            f"{args.run} recorded no training presentation (no loss through "
            "accumulate/record_loss), and the report is drawn from training (the CSL "
            "histogram, loss curves, data map); list its samples by an eval-pass score "
            f"instead: csl-fast rank {args.run} --score {score}",
            EXIT_USAGE,
        )
    _scores_for(tracker, args.score)
    inputs, labels, aside = run_inputs(args, tracker, samples)
    say_note(args, aside)
    notes = _run_notes(args.run, tracker.num_samples, args.quiet, args.score)
    if aside is not None:
        # on stderr alone (and not at all under --quiet) the page never said why it has
        # no duplicate section
        notes.append(("No duplicate groups", aside[0].upper() + aside[1:] + "."))
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
        notes=notes,
        title=f"csl_fast report: {os.path.basename(os.path.abspath(args.run))}",
        score=args.score,
        top=args.top,
        progress=not args.quiet,
        inputs=inputs,
        labels=labels,
    )
    # the report's own figures (another PNG in the folder is the user's, not written now)
    pngs = sorted(f for f in FIGURES if os.path.exists(os.path.join(out, f)))
    print(f"wrote {path} and {len(pngs)} PNG files: {', '.join(pngs)}")
    return EXIT_OK


def _run_notes(
    run: str, num_samples: int, quiet: bool, score: str = "csl"
) -> list[tuple[str, str]]:
    """The demo's report notes (setup, overhead) from ``results.json`` beside the tracker,
    when that file describes a run of the tracker's size (a tracker saved into an earlier
    run's folder got the other run's setup and retrain figures on its page). The demo
    cleaned by CSL: on a page that flags by another ``score`` its retrain note says so (it
    read as the result of the plan on that page)."""
    base = run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run))
    path = os.path.join(base, "results.json")
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
        notes = [(str(h), str(t)) for h, t in results.get("report_notes") or []]
        size = results.get("num_samples")
    except (OSError, ValueError, TypeError, AttributeError):
        return []
    if size != num_samples:
        if not quiet and notes:
            print(
                f"csl-fast report: note: {path} describes a run of {size} samples, the "
                f"tracker has {num_samples}: its notes are left out of the report",
                file=sys.stderr,
            )
        return []
    if score not in ("csl", "label_csl"):
        notes = [
            (f"{h} (the demo's plan, flagged by csl; this page flags by {score})", t)
            if h == "Clean and retrain"
            else (h, t)
            for h, t in notes
        ]
    return notes


def cmd_info(args: argparse.Namespace) -> int:
    from .info import report

    print(report())
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    if args.device is not None:
        _check_device(args.device)
    try:
        from .bench import compiled_backend, run_short
    except ImportError as exc:
        if exc.name and exc.name.endswith("csl_fast.bench"):
            raise CLIError(
                "the benchmark module is not part of this installation", EXIT_DEPENDENCY
            ) from None
        raise
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend, why = compiled_backend(device)
    if backend is None:
        # the report would hold no csl_fast row: nothing left to measure its overhead by
        raise CLIError(
            f"nothing to measure on {device}: {why}. Build the extension (`csl-fast info` "
            "says why it did not load)",
            EXIT_DEPENDENCY,
        )
    if args.quiet:
        from .bench.harness import stderr_fd_silenced

        with stderr_fd_silenced():
            text = run_short(device=args.device, quiet=True)
    else:
        text = _bench_verbose(run_short, args.device)
    print(text)
    return EXIT_OK


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


def _groups_once(cmd: Any) -> Any:
    """``cmd`` finding the groups of identical inputs once
    (:func:`csl_fast.duplicate_groups.computed_once`): ``rank`` found them twice,
    ``report`` four times, seconds each at a million rows."""

    @functools.wraps(cmd)
    def run(args: argparse.Namespace) -> int:
        from .duplicate_groups import computed_once

        with computed_once():
            return cmd(args)

    return run


COMMANDS = {
    "demo": cmd_demo,
    "rank": _groups_once(cmd_rank),
    "report": _groups_once(cmd_report),
    "clean": _groups_once(cmd_clean),
    "info": cmd_info,
    "bench": cmd_bench,
}
