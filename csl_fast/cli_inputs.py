"""The training inputs (and labels) of a saved run, for the duplicate detection of
``csl-fast rank``, ``report`` and ``clean``.

A tracker does not keep inputs, so the groups of identical inputs
(:func:`csl_fast.detect.duplicates`) need them from outside: ``--inputs FILE`` (``.npy``,
or ``.pt``/``.pth`` holding one tensor, shape ``[N, ...]``), or the ``inputs`` field of the
run's ``samples.npz`` (``csl-fast demo`` stores it). The labels that reveal a conflict come
from ``--labels FILE`` (int ``[N]`` class indices, same formats; for a run that recorded
losses only, a regression's or a multi-label run's, the targets it trained on, ``[N]`` or
``[N, ...]`` of any real dtype; for a run of sequences, the token labels ``[N, T]``) or
the run's ``samples.npz``. With
both, every group of identical inputs whose labels differ is flagged (exactly); with
inputs only, each group holding a sample the score rule flags is flagged whole.

Errors, one line each: an unsupported file type, or ``--labels`` with no inputs, is a
usage error (exit 2); a file that is missing, unreadable, not an array, or does not fit
the run (N rows for the tracker's N samples; integer labels for a classifier) is an input
error (exit 3),
as a ``samples.npz`` of another run is.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ._args import class_indices, label_range
from .cli_errors import EXIT_INPUT, EXIT_USAGE, CLIError

__all__ = [
    "INPUT_SUFFIXES",
    "add_input_options",
    "check_combination",
    "duplicates_for",
    "duplicates_summary",
    "load_array",
    "run_inputs",
    "say_note",
]

INPUT_SUFFIXES = (".npy", ".pt", ".pth")

_HELP_INPUTS = (
    "the run's training inputs, [N, ...] in dataset order, as .npy or .pt (one tensor): finds "
    "groups of identical inputs and flags those whose labels conflict "
    "(csl_fast.detect.duplicates); default: the inputs in RUN's samples.npz, if any"
)
_HELP_LABELS = (
    "the run's given labels, int [N] (a run of sequences or one that recorded losses only: "
    "its targets, [N, ...]), "
    "as .npy or .pt (default: the labels in RUN's samples.npz); with inputs, a conflict "
    "between identical inputs is exact"
)


def add_input_options(parser: argparse.ArgumentParser) -> None:
    """``--inputs FILE`` and ``--labels FILE`` for a command that reads a run."""
    parser.add_argument("--inputs", metavar="FILE", default=None, help=_HELP_INPUTS)
    parser.add_argument("--labels", metavar="FILE", default=None, help=_HELP_LABELS)


def _tensor(array: Any) -> Any:
    """``array`` as a CPU tensor; torch takes native byte order only, and a big-endian
    array is as numeric as any."""
    import torch

    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False))


def load_array(path: str, option: str) -> Any:
    """The tensor in ``path`` (``.npy`` or a ``.pt``/``.pth`` of one tensor), on the CPU."""
    import numpy as np
    import torch

    suffix = os.path.splitext(path)[1].lower()
    if suffix not in INPUT_SUFFIXES:
        raise CLIError(
            f"{option} {path!r}: expected a .npy, .pt or .pth file, got {suffix or 'no suffix'!r}",
            EXIT_USAGE,
        )
    if not os.path.isfile(path):
        raise CLIError(f"{option} {path!r}: no such file", EXIT_INPUT)
    try:
        if suffix == ".npy":
            value = _tensor(np.load(path, allow_pickle=False))
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any damage or foreign content: one line, no traceback
        # Not numpy's or torch's message: both advise loading the file unsafely
        # (allow_pickle, weights_only=False), which a tool must never print.
        what = "a numeric .npy array" if suffix == ".npy" else "a .pt file of one tensor"
        raise CLIError(
            f"{option} {path!r}: not a readable array file: not {what} (truncated, damaged, "
            f"or holding Python objects, which are never loaded; {type(exc).__name__}); save "
            "the array itself (numpy.save(path, x) or torch.save(x, path))",
            EXIT_INPUT,
        ) from None
    if not isinstance(value, torch.Tensor):
        raise CLIError(
            f"{option} {path!r}: holds a {type(value).__name__}, not one tensor; save the "
            "tensor itself (torch.save(x, path) or numpy.save)",
            EXIT_INPUT,
        )
    if value.layout != torch.strided or value.is_meta:  # the groups read dense values
        what = "a meta tensor (no values)" if value.is_meta else f"a {value.layout} tensor"
        raise CLIError(
            f"{option} {path!r}: holds {what}; save a dense tensor with its values (x.to_dense())",
            EXIT_INPUT,
        )
    return value


def run_inputs(args: argparse.Namespace, tracker: Any, samples: Any) -> tuple[Any, Any, Any]:
    """``(inputs [N, ...] or None, labels int [N] or None, note or None)`` for a run,
    checked against the tracker's ``N``; labels only come with inputs.

    Inputs the run's ``samples.npz`` holds are used where the duplicate detection can use
    them and set aside otherwise, with the ``note`` saying why (a multi-label or loss-only
    run saved with its inputs still ranks and reports); ``--inputs`` or ``--labels`` given
    where they cannot be used are refused (:func:`check_combination`)."""
    from .cli_commands import loss_only

    inputs, labels = _run_inputs(args, tracker, samples)
    score = getattr(args, "score", None)
    if inputs is None or score is None:
        return inputs, labels, None
    try:
        check_combination(inputs, labels, score, loss_only(tracker))
    except CLIError as exc:
        if getattr(args, "inputs", None) is not None or getattr(args, "labels", None):
            raise
        why = str(exc).replace("--inputs", "inputs")
        note = f"the inputs in samples.npz are not used, so no duplicate groups are formed: {why}"
        return None, None, note
    return inputs, labels, None


def say_note(args: argparse.Namespace, note: str | None) -> None:
    """Print ``note`` on stderr as the command's note, unless ``--quiet``."""
    import sys

    if note is not None and not getattr(args, "quiet", False):
        print(f"csl-fast {args.command}: note: {note}", file=sys.stderr)


def _run_inputs(args: argparse.Namespace, tracker: Any, samples: Any) -> tuple[Any, Any]:
    from .cleaning_groups import targets_not_classes

    n = tracker.num_samples
    inputs = labels = None
    if getattr(args, "inputs", None) is not None:
        inputs = load_array(args.inputs, "--inputs")
        where = f"--inputs {args.inputs!r}"
    elif samples is not None and samples.inputs is not None:
        inputs = _tensor(samples.inputs)
        where = "the inputs in samples.npz"
    if getattr(args, "labels", None) is not None:
        if inputs is None:
            raise CLIError(
                "--labels needs the inputs whose groups it compares: give --inputs FILE "
                + (
                    "(the run's samples.npz has none)"
                    if samples is not None
                    else "(the run has no samples.npz to take them from)"
                )
                + "; for the given labels alone (the classes in use, the report's given "
                "column), put them in the run's samples.npz: "
                + (
                    "dataclasses.replace(csl_fast.report.RunSamples.load(RUN/samples.npz), "
                    "labels=...).save(RUN/samples.npz), which keeps what it holds"
                    if samples is not None
                    else "csl_fast.report.RunSamples(labels=...).save(RUN/samples.npz)"
                ),
                EXIT_USAGE,
            )
        labels = load_array(args.labels, "--labels")
        lwhere = f"--labels {args.labels!r}"
    elif inputs is not None and samples is not None and samples.labels is not None:
        labels = _tensor(samples.labels)
        lwhere = "the labels in samples.npz"
    if inputs is not None and (inputs.dim() == 0 or inputs.shape[0] != n):
        raise CLIError(
            f"{where}: shape {tuple(inputs.shape)} does not fit the run: the tracker has {n} "
            f"samples, so the inputs must be [{n}, ...] in dataset order",
            EXIT_INPUT,
        )
    if inputs is not None and inputs.numel() == 0 and n > 0:
        raise CLIError(
            f"{where}: shape {tuple(inputs.shape)} holds no values, so no two inputs can be "
            f"compared; give the inputs the run trained on, [{n}, ...] in dataset order",
            EXIT_INPUT,
        )
    if labels is not None and targets_not_classes(tracker, labels):
        # a regression's or multi-label run's targets, a sequence's token labels: rows of
        # any real dtype, compared as detect.duplicates compares them
        if labels.dim() == 0 or labels.shape[0] != n or labels.dtype.is_complex:
            raise CLIError(
                f"{lwhere}: {labels.dtype} of shape {tuple(labels.shape)} does not fit the "
                f"run: its labels must be the targets it trained on, [{n}] or [{n}, ...] "
                "real numbers in dataset order (a sequence's token labels: [N, T])",
                EXIT_INPUT,
            )
        return inputs, labels
    if labels is not None and (not class_indices(labels) or labels.shape[0] != n):
        raise CLIError(
            f"{lwhere}: {labels.dtype} of shape {tuple(labels.shape)} does not fit the run: "
            f"labels must be integers of shape [{n}]",
            EXIT_INPUT,
        )
    classes = getattr(tracker, "num_classes", None)
    if labels is not None and classes is not None and labels.numel() > 0:
        # clean relabels a duplicate group to one of these labels: 99 would land in the
        # plan as a class of a 10-class run (a negative one, ignore_index, never wins)
        low, high = label_range(labels)
        if high >= classes:
            raise CLIError(
                f"{lwhere}: labels range over [{low}, {high}], but the run has C = {classes} "
                f"classes: labels must be class indices in [0, {classes}), or negative for "
                "an unlabelled sample (the labels the run trained on)",
                EXIT_INPUT,
            )
    return inputs, None if labels is None else labels.long()


def check_combination(inputs: Any, labels: Any, score: str, loss_only: bool) -> None:
    """Refuse inputs where the duplicate detection cannot use them (one-line usage error)."""
    if inputs is None:
        return
    if score == "label_csl":
        raise CLIError(
            "--score label_csl ranks (sample, label) entries; the duplicate groups of "
            "--inputs are found per sample: use another --score",
            EXIT_USAGE,
        )
    if labels is None and loss_only:
        raise CLIError(
            "--inputs without labels on a run that recorded losses only: its duplicates are "
            "found by their conflicting labels; give --labels FILE",
            EXIT_USAGE,
        )


def duplicates_for(tracker: Any, score: str, inputs: Any, labels: Any, loss_only: bool) -> Any:
    """:func:`csl_fast.detect.duplicates` of the run, or None without inputs."""
    from .detect import duplicates

    check_combination(inputs, labels, score, loss_only)
    if inputs is None:
        return None
    return duplicates(tracker, score, inputs=inputs, labels=labels)


def duplicates_summary(det: Any) -> str:
    """One line: the groups of identical inputs and what was flagged among them."""
    d = det.diagnostics
    total = d.get("duplicate_groups", 0)
    members = len(det)
    line = f"duplicates: {total} groups of identical inputs"
    if "conflicting_groups" in d:
        line += f", {d['conflicting_groups']} with conflicting labels"
    return line + f"; {members} samples in {len(det.groups)} groups flagged (rule {det.rule})"
