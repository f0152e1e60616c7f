r"""The visual report of a tracked run: one self-contained HTML page plus PNG files.

:func:`write_report` draws, from a :class:`csl_fast.CSLTracker` and (optionally) what is
known about the samples (:class:`RunSamples`):

``csl_histogram.png``
    The distribution of CSL (log scale; per token for a tracker of sequences), split into
    clean, mislabeled and duplicated samples when the ground truth is known.
``roc.png``
    ROC curves of CSL against the free baselines (every score of
    :func:`csl_fast.scores`), for mislabeled and for duplicated samples. Needs the ground
    truth.
``data_map.png``
    Dataset-cartography map: variability (std of :math:`p_y` over training) against
    confidence (mean :math:`p_y`), coloured by whether the model predicted the label at
    the last eval pass that scored the sample (:func:`csl_fast.score_epoch`) while no
    training was recorded after the tracker's last pass, else at its last training
    presentation;
    corrupted samples are ringed when known. Not drawn for a tracker of sequences, whose
    :math:`p_y` statistics pool the tokens (the page says why).
``loss_curves.png``
    Per-epoch training loss of the easiest and hardest samples (lowest and highest CSL) of
    one class, with the mean of each group and of the class (the paper's "peacock" figure).
    Needs ``CSLTracker(history=True)``.
``top_samples.png``
    The top-k suspicious samples as images, with given and predicted labels. Needs images.
``flagging.png``
    The detection score's histogram with the no-ground-truth rule's threshold and its
    estimated count of bad samples, followed by what the flagged set is made of and what
    :func:`csl_fast.clean` would do with it (:mod:`csl_fast.report_cleaning`).

A run that recorded losses only (:func:`csl_fast.record_loss`, :func:`csl_fast.accumulate_bce`)
has no softmax statistics: the page says so at the top, the data map is not drawn, the
flagged set comes from the tail rule of :mod:`csl_fast.detect_losses` (no suggested
labels), and a tracker with per-label CSL (``num_labels``) adds the most suspicious
(sample, label) entries.

``report.html`` embeds every PNG (base64), so the page can be mailed or archived alone.
Needs matplotlib; the ROC needs scikit-learn.

:class:`RunSamples` is the side file (``samples.npz``) that ``csl-fast demo`` writes next to
its tracker and that ``csl-fast rank``/``report`` read: given labels, predictions, optional
ground-truth masks and images. Write one for your own runs with :meth:`RunSamples.save`.
"""

from __future__ import annotations

import datetime
import html
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from . import atomic_file
from .report_figures import (
    Curve,
    _fig_data_map,
    _fig_histogram,
    _fig_loss_curves,
    _fig_roc,
    _fig_top_grid,
    _np,
    roc_curves,
)
from .report_figures import _png as _png  # report_cleaning draws through it
from .tracker import CSLTracker
from .user_frame import user_stacklevel

__all__ = ["FIGURES", "SAMPLES_FILE", "RunSamples", "SamplesFileError", "write_report"]

#: Name of the per-sample side file in a run folder.
SAMPLES_FILE = "samples.npz"
#: The PNG files a report may write (the module docstring says what each shows).
FIGURES = (
    "csl_histogram.png",
    "roc.png",
    "data_map.png",
    "loss_curves.png",
    "top_samples.png",
    "flagging.png",
)

_ARRAY_FIELDS = (
    "labels",
    "predicted",
    "true_labels",
    "mislabeled",
    "duplicate",
    "images",
    "inputs",
)


# the CLI reads a run folder's samples.npz by default, so a damaged one blocks the run
_SAMPLES_FIX = (
    "write it again with csl_fast.report.RunSamples(...).save(path), or move it out of the "
    "run folder to use the tracker alone"
)


class SamplesFileError(ValueError):
    """A ``samples.npz`` side file cannot be read or does not fit the tracker."""


@dataclass
class RunSamples:
    """What is known about the ``N`` tracked samples besides the tracker (all optional).

    Attributes:
        labels: int ``[N]`` labels the model was trained on ("given" labels).
        predicted: int ``[N]`` predictions of the final model.
        true_labels: int ``[N]`` clean labels, when known (e.g. before injected noise).
        mislabeled: bool ``[N]`` ground truth: label flipped. Default, when ``labels``
            and ``true_labels`` are given: ``labels != true_labels``, but for the members
            of ``duplicate``.
        duplicate: bool ``[N]`` ground truth: member of a conflicting-label duplicate pair.
        images: ``[N, H, W]`` or ``[N, H, W, 3]`` images for the top-k grid.
        inputs: ``[N, ...]`` the training inputs as the network saw them: with ``labels``,
            ``csl-fast rank``/``report``/``clean`` find the groups of identical inputs
            with conflicting labels (:func:`csl_fast.detect.duplicates`). Added to format
            ``csl_fast.samples/1`` as an optional field: older files load without it, and
            older readers ignore it.
        class_names: names of the classes (default: the class numbers).
    """

    labels: np.ndarray | None = None
    predicted: np.ndarray | None = None
    true_labels: np.ndarray | None = None
    mislabeled: np.ndarray | None = None
    duplicate: np.ndarray | None = None
    images: np.ndarray | None = None
    class_names: list[str] | None = None
    inputs: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in _ARRAY_FIELDS:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            if value is not None:
                value = np.asarray(value)
                # (a scalar or a string array failed later, in len() or torch.from_numpy)
                if value.ndim == 0 or value.dtype.kind not in "biuf":
                    raise SamplesFileError(
                        f"RunSamples: {name} must be an array of numbers, one entry per "
                        f"sample; got {value.dtype} of shape {value.shape}"
                    )
                if name not in ("images", "inputs") and value.ndim != 1:
                    # (a sequence's token labels, a multi-label run's rows: the duplicate
                    # groups take them, through --labels or write_report's labels=)
                    raise SamplesFileError(
                        f"RunSamples: {name} must be 1-D, one class per sample; got shape "
                        f"{value.shape}. The targets of a run of sequences or of a "
                        "multi-label run go to csl-fast --labels FILE (or write_report's "
                        "labels=, csl_fast.clean's labels=), not into samples.npz"
                    )
                # astype(bool) made NaN and 0.5 True, int64(0.5) another class: silent
                if name in ("mislabeled", "duplicate"):
                    if value.dtype.kind != "b" and not np.isin(value, (0, 1)).all():
                        raise SamplesFileError(
                            f"RunSamples: {name} must be a mask of 0/1 or bools; it holds "
                            f"{value[~np.isin(value, (0, 1))][0]}"
                        )
                    value = value.astype(bool)
                elif (
                    name not in ("images", "inputs")
                    and value.dtype.kind == "f"
                    and not (np.isfinite(value) & (value == np.round(value))).all()
                ):
                    raise SamplesFileError(
                        f"RunSamples: {name} must hold whole class numbers; it holds "
                        "non-integer or non-finite values (a regression's targets go to "
                        "csl-fast --labels FILE or clean's labels=, not into samples.npz)"
                    )
                elif name not in ("images", "inputs") and value.dtype.kind == "f":
                    # kept as floats, they were saved, and rank, report and clean refused
                    # the folder ("labels must be integers")
                    if value.size and float(np.abs(value).max()) >= 2**53:
                        raise SamplesFileError(
                            f"RunSamples: {name} must hold class numbers; it holds "
                            f"{float(np.abs(value).max()):g}"
                        )
                    value = value.astype(np.int64)
            setattr(self, name, value)
        shape = None if self.images is None else self.images.shape
        if shape is not None and not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 3)):
            raise SamplesFileError(
                f"RunSamples: images must be [N, H, W] or [N, H, W, 3], got shape {shape}"
            )
        sizes = {
            name: len(getattr(self, name))
            for name in _ARRAY_FIELDS
            if getattr(self, name) is not None
        }
        if len(set(sizes.values())) > 1:
            raise SamplesFileError(f"RunSamples: fields have different lengths {sizes}")
        if self.class_names is not None:
            # (too few: the report mixed names and numbers, "given 4 ... predicted b")
            named = len(self.class_names)
            for name in ("labels", "predicted", "true_labels"):
                value = getattr(self, name)
                if value is not None and value.size and int(value.max()) >= named:
                    raise SamplesFileError(
                        f"RunSamples: class_names has {named} names but {name} holds class "
                        f"{int(value.max())}; give one name per class, 0 to {int(value.max())}"
                    )
        if self.mislabeled is None and self.labels is not None and self.true_labels is not None:
            # the ground truth the report, rank and clean read (ROC, what the flagged set is
            # made of): without it, true labels counted in one section and not in the others.
            # A conflicting duplicate's copy differs from its true label too (demo.inject):
            # it is a duplicate, not a flip.
            self.mislabeled = self.labels != self.true_labels
            if self.duplicate is not None:
                self.mislabeled &= ~self.duplicate

    @property
    def num_samples(self) -> int | None:
        for name in _ARRAY_FIELDS:
            value = getattr(self, name)
            if value is not None:
                return len(value)
        return None

    @property
    def has_truth(self) -> bool:
        return self.mislabeled is not None or self.duplicate is not None

    def class_name(self, c: int) -> str:
        if self.class_names is not None and 0 <= c < len(self.class_names):
            return str(self.class_names[c])
        return str(int(c))

    def save(self, path: str | os.PathLike) -> None:
        """Write the fields that are set to an ``.npz`` file (``.npz`` added to a path
        without it, as numpy adds it), atomically: a write that fails part way keeps the
        previous file, which ``csl-fast rank``, ``clean`` and ``report`` read."""
        arrays = {n: getattr(self, n) for n in _ARRAY_FIELDS if getattr(self, n) is not None}
        if self.class_names is not None:
            arrays["class_names"] = np.asarray([str(c) for c in self.class_names])
        arrays["format"] = np.asarray("csl_fast.samples/1")
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        action = "save the samples"
        target = atomic_file.target_of(path, action, SAMPLES_FILE)
        atomic_file.write(path, target, lambda f: np.savez_compressed(f, **arrays), action)

    @classmethod
    def load(cls, path: str | os.PathLike, num_samples: int | None = None) -> RunSamples:
        """Read a file written by :meth:`save`; ``num_samples`` checks the length.

        Raises :class:`SamplesFileError` (one-line message) for unreadable or foreign files.
        """
        path = os.fspath(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as exc:
            raise SamplesFileError(
                f"{path}: not a readable samples file (truncated or another format: "
                f"{type(exc).__name__}); {_SAMPLES_FIX}"
            ) from None
        tag = data.pop("format", None)
        if tag is None or str(tag) != "csl_fast.samples/1":
            # a tag of a later version read "no format tag"
            what = (
                "no format tag"
                if tag is None
                else f"format {str(tag)!r}, where this version reads 'csl_fast.samples/1'"
                + (": written by a newer csl_fast?" if str(tag).startswith("csl_fast.") else "")
            )
            raise SamplesFileError(f"{path}: not a csl_fast samples file ({what}); {_SAMPLES_FIX}")
        names = data.pop("class_names", None)
        known = {n: data[n] for n in _ARRAY_FIELDS if n in data}
        try:
            samples = cls(**known, class_names=None if names is None else [str(c) for c in names])
        except SamplesFileError as exc:
            raise SamplesFileError(f"{path}: {exc}") from None
        if num_samples is not None and samples.num_samples not in (None, num_samples):
            raise SamplesFileError(
                f"{path}: describes {samples.num_samples} samples but the tracker has "
                f"{num_samples}; it belongs to another run"
            )
        return samples


def detection_table(
    scores: Mapping[str, torch.Tensor], samples: RunSamples | None
) -> dict[str, dict[str, float]]:
    """AUROC of every score for each known corruption type: ``{score: {type: auroc}}``.

    Each type's positives are scored against the clean samples (see the report's notes).
    Samples with a non-finite score are left out of that score's AUROC.
    """
    for name, s in scores.items():
        if samples is not None and samples.num_samples not in (None, s.numel()):
            raise ValueError(
                f"detection_table: score {name!r} has {s.numel()} entries, samples describe "
                f"{samples.num_samples}; they come from different runs"
            )
    return _table(roc_curves(scores, samples), scores)


def _table(
    rocs: Mapping[str, list[Curve]], scores: Mapping[str, torch.Tensor]
) -> dict[str, dict[str, float]]:
    """:func:`detection_table` from the ROC curves (NaN: no curve for that type)."""
    auc = {(kind, c[1]): c[0] for kind, curves in rocs.items() for c in curves}
    return {name: {kind: auc.get((kind, name), math.nan) for kind in rocs} for name in scores}


#: The corruption types of the detection table, in column order.
_KINDS = ("mislabeled", "duplicates")


def _best(table: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The best AUROC of each corruption type that has one (none: nothing to show)."""
    best: dict[str, float] = {}
    for row in table.values():
        for kind, v in row.items():
            if not math.isnan(v):
                best[kind] = max(v, best.get(kind, v))
    return best


def _coverage(scores: Mapping[str, torch.Tensor]) -> str:
    """A sentence on the scores defined on fewer samples than the others ('' if none).

    An eval pass over part of the samples gives eval_csl on those only: its AUROC and ROC
    curve, over 50 of 200 samples, sat beside the others' with no word.
    """
    counts = {name: int(torch.isfinite(s).sum()) for name, s in scores.items()}
    most = max(counts.values(), default=0)
    fewer = [f"{name} over {k}" for name, k in counts.items() if k < most]
    if not fewer:
        return ""
    n = next(iter(scores.values())).numel()
    return (
        f" Scores cover different samples (those with a finite score, of {n}): "
        f"{', '.join(fewer)}; the others over {most}."
    )


def format_detection_table(table: Mapping[str, Mapping[str, float]]) -> str:
    """The detection table as aligned text (best value per column marked with ``*``)."""
    best = _best(table)
    if not best:
        # also with ground truth that has no corrupted sample (demo --noise 0 --pairs 0)
        return "(no detection table: it needs samples known to be corrupted and known clean)"
    kinds = [k for k in _KINDS if k in best]  # (a type without an AUROC: a column of n/a)
    width = max(len(n) for n in table) + 2
    head = "score".ljust(width) + "".join(f"{'AUROC ' + k:>20}" for k in kinds)
    lines = [head, "-" * len(head)]
    for name, row in table.items():
        cells = ""
        for k in kinds:
            v = row.get(k, math.nan)
            mark = "*" if not math.isnan(v) and v >= best[k] - 1e-12 else " "
            cells += f"{'n/a' if math.isnan(v) else f'{v:.3f}':>19}{mark}"
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)


# --------------------------------------------------------------------------- report
#: Why a run without per-label CSL cannot be ranked by ``label_csl`` (the CLI says it too).
NO_LABEL_CSL = (
    "score 'label_csl' ranks (sample, label) entries and needs a tracker created with "
    "num_labels=L and fed by csl_fast.accumulate_bce; this run has no per-label CSL"
)
_NO_LOGITS = (
    "needs the softmax statistics of csl_fast.accumulate (cross entropy); this run "
    "recorded losses only."
)


def _loss_only_detection(tracker: CSLTracker, score: str) -> Any:
    """The tail rule's detection of a loss-only run (:mod:`csl_fast.detect_losses`), its
    warning silenced (the flagged set's section says it)."""
    from .detect import DetectionWarning
    from .detect_losses import corrupted_targets
    from .scores import scores

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DetectionWarning)  # shown in the section
        # (the scores keep the tracker's counts: held-out samples an eval pass scored are
        # not ranked among the trained ones, as csl-fast rank and clean leave them out)
        return corrupted_targets(scores(tracker, [score]), score)


def _loss_only_sections(
    tracker: CSLTracker,
    samples: RunSamples | None,
    det: Any,
    score: str,
    top: int,
    out_dir: str,
) -> str:
    """The flagged set ``det`` (:func:`_loss_only_detection`) of a loss-only run (tail
    rule), what it is made of and, with per-label CSL, the entries; no cleaning plan
    (there are no suggested labels)."""

    from .detect import DetectionWarning, summary
    from .report_cleaning import _fig_flagging, composition_section

    e = html.escape
    if det.warning is not None:  # (as the cross-entropy run's section says it)
        warnings.warn(det.warning, DetectionWarning, stacklevel=3)
    b64 = _fig_flagging(det, os.path.join(out_dir, "flagging.png"))
    parts = [
        f"<h2>Flagged set: {e(score)} and the tail rule (csl_fast.detect_losses)</h2>",
        f"<img alt='flagged set' src='data:image/png;base64,{b64}'>",
        f"<p class=cap>{e(summary(det))} (<code>flagging.png</code>)</p>",
    ]
    if det.warning is not None and det.diagnostics.get("held_out"):
        # (summary says the note only when there is no warning)
        parts.append(f"<p class=cap><b>Note:</b> {e(det.diagnostics['held_out'])}</p>")
    # a cross-entropy run's page said it from the same samples; this one's never did
    parts.append(composition_section(tracker, samples, det))
    if tracker.label_csl is not None:
        parts.append(_entry_section(tracker, top))
    return "".join(parts)


def _entry_section(tracker: CSLTracker, top: int) -> str:
    """The top (sample, label) entries by per-label CSL, with the tail rule's flags."""

    from .detect import DetectionWarning, summary
    from .detect_losses import mislabeled_entries

    e = html.escape
    heading = f"<h2>Top {top} (sample, label) entries by per-label CSL</h2>"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DetectionWarning)  # shown in the section
        try:
            det = mislabeled_entries(tracker)
        except ValueError as exc:  # no per-label CSL recorded (record_loss alone)
            return f"{heading}<p class=cap>Not drawn: {e(str(exc))}</p>"
    if det.score_name == "label_csl_mean":  # (unequal presentation counts: by the mean)
        heading = f"<h2>Top {top} (sample, label) entries by per-label CSL per presentation</h2>"
    if det.warning is not None:  # (as the samples' section says its own; csl-fast says it)
        warnings.warn(det.warning, DetectionWarning, stacklevel=3)
    values = det.scores.cpu().double()
    rows = [
        f"<tr><td>{r + 1}</td><td>{i}</td><td>{k}</td><td>{float(values[i, k]):.4g}</td>"
        f"<td>{'yes' if bool(det.flagged[i, k]) else ''}</td></tr>"
        for r, (i, k) in enumerate(det.top(top).tolist())
        if math.isfinite(float(values[i, k]))
    ]
    return (
        f"{heading}<p class=cap>{e(summary(det))}</p><table><tr><th>rank</th><th>sample</th>"
        f"<th>label</th><th>{det.score_name}</th><th>flagged</th></tr>" + "".join(rows) + "</table>"
    )


_HISTOGRAM_CAPTIONS = {
    "softmax": "Cumulative sample loss of every training sample. Samples whose label "
    "contradicts similar samples keep a high loss for many epochs and sit in the right tail.",
    "loss_only": "Cumulative sample loss of every training sample. Samples whose target is "
    "wrong keep a high loss for many epochs and sit in the right tail.",
    # summed over tokens, CSL grows with a sequence's length: the figure draws it per token
    "sequences": "CSL per token (csl_mean) of every training sequence: its loss summed over "
    "training divided by its recorded tokens, so that length does not rank it. Sequences "
    "whose tokens contradict what similar sequences teach keep a high loss for many epochs "
    "and sit in the right tail.",
    # (score="csl" asked for on sequences: the sum, as the ranking)
    "sequences_summed": "CSL of every training sequence, its loss summed over training and "
    "over its tokens: it grows with a sequence's length, as the ranking by csl does "
    "(csl_mean, per token, does not).",
}
_MISSING = {
    "roc.png": "needs the ground truth (mislabeled/duplicate masks in samples.npz).",
    "top_samples.png": "needs images in samples.npz.",
}
_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
    "color:#222}table{border-collapse:collapse;font-size:13px}"
    "td,th{padding:3px 9px;border-bottom:1px solid #ddd;text-align:right}"
    "th{background:#f3f3f3}td.l,th.l{text-align:left}"
    "img{max-width:100%;border:1px solid #eee}"
    "pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:12px}"
    ".cap{color:#555;font-size:13px}.mis{color:#c33}.dup{color:#b67d00}.best{font-weight:bold}"
)


#: At most this many samples in the image grid (one panel each); the top-k table lists all.
GRID_MAX = 96


def require_matplotlib() -> None:
    """Import matplotlib (its file-only backend), or an :class:`ImportError` that names it
    (the CLI exits 4 with one line on such an error; without ``name`` it printed a
    traceback and called it an internal error)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        raise ImportError(
            "the report needs matplotlib: pip install matplotlib", name="matplotlib"
        ) from None


def write_report(
    tracker: CSLTracker,
    out_dir: str | os.PathLike,
    samples: RunSamples | None = None,
    *,
    title: str = "csl_fast report",
    score: str | None = None,
    top: int = 24,
    notes: Sequence[tuple[str, str]] = (),
    progress: bool = False,
    inputs: torch.Tensor | np.ndarray | None = None,
    labels: torch.Tensor | np.ndarray | None = None,
) -> str:
    """Write the PNGs and ``report.html`` into ``out_dir``; returns the HTML path.

    Args:
        tracker: the run's tracker (any device; read only).
        out_dir: folder to create or overwrite files in.
        samples: labels, predictions, ground truth and images when known.
        title: page title.
        score: the score that ranks the top-k table and image grid and flags the set
            (default ``"csl"``; ``"csl_mean"`` for a tracker of sequences or of unequal
            presentation counts, :func:`csl_fast.detect.default_score`). ``"label_csl"``
            (per-label CSL): the entries' section ranks by it, the samples by the default
            score.
        top: how many suspicious samples to list.
        notes: extra ``(heading, preformatted text)`` sections (e.g. the demo's overhead).
        progress: show a tqdm bar over the figures and the flagged set's sections.
        inputs: ``[N, ...]`` training inputs (default: ``samples.inputs``): adds the
            duplicate groups section (:mod:`csl_fast.report_duplicates`).
        labels: int ``[N]`` given labels (default: ``samples.labels``, with inputs); for a
            run of sequences or one that recorded losses only, the targets it trained on,
            ``[N, ...]`` (:func:`csl_fast.clean`'s ``labels``).
    """
    require_matplotlib()
    from .detect import default_score
    from .scores import LOSS_ONLY, definitions, epochs_without_loss, has_logit_stats
    from .scores import scores as compute_scores

    if not isinstance(tracker, CSLTracker):
        # a path or a scores dict failed with "'str' object has no attribute 'csl_count'"
        hint = (
            "; load a saved one with csl_fast.load(path)"
            if isinstance(tracker, (str, os.PathLike))
            else " (the page reads the tracker's buffers, which a scores mapping lacks)"
            if isinstance(tracker, Mapping)
            else ""
        )
        raise TypeError(
            f"write_report: tracker must be a csl_fast.CSLTracker, got "
            f"{type(tracker).__name__}{hint}"
        )
    # ranking[:top] with top < 0 listed all but the last -top samples as the "top"
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"write_report: top must be an int >= 0, got {top!r}")
    if not bool((tracker.csl_count > 0).any()):
        raise ValueError(
            "write_report: the tracker recorded no loss for any sample: no training step "
            "passed it to record_loss/accumulate, it was reset, or every loss was "
            "non-finite (training diverged; those are not recorded). Train with the "
            "tracker first"
        )
    out = os.fspath(out_dir)
    n = tracker.num_samples
    if samples is not None and samples.num_samples not in (None, n):
        raise SamplesFileError(f"samples describe {samples.num_samples} samples, the tracker {n}")
    all_scores = compute_scores(tracker)
    lost = epochs_without_loss(tracker)
    if lost is not None:  # said outside the page too, as a detection's warning is
        lost += ". The loss curves stop where the record does"
        warnings.warn(f"csl_fast.report: {lost}", RuntimeWarning, stacklevel=2)
    dup_args = _inputs_of(samples, inputs, labels, n)
    samples = _with_given_labels(samples, labels, n)
    loss_only = bool((tracker.csl_count > 0).any()) and not has_logit_stats(tracker)
    if loss_only:
        notes = [("What this run recorded", LOSS_ONLY + "."), *notes]
    if score == "label_csl" and tracker.label_csl is not None:
        # it ranks (sample, label) entries, which have their own section; the samples are
        # ranked by the default score, as csl-fast report --score label_csl does
        score = None
    if score is None:
        score = default_score(tracker)
    if score == "label_csl":  # (said 'was not recorded in this run' of a run that did)
        raise KeyError(f"write_report: {NO_LABEL_CSL}; available: {list(all_scores)}")
    if score not in all_scores:
        raise KeyError(
            f"write_report: score {score!r} was not recorded in this run; available: "
            f"{list(all_scores)}"
        )
    # (after the checks: a misspelled score left an empty folder behind)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"write_report: out_dir {out!r} is a file; pass a folder")
    os.makedirs(out, exist_ok=True)
    s = _np(all_scores[score])
    if loss_only:
        det = _loss_only_detection(tracker, score)
    else:
        from .cleaning import default_detection
        from .detect import DetectionWarning

        with warnings.catch_warnings():  # (said by the flagged set's section)
            warnings.simplefilter("ignore", DetectionWarning)
            # the tracker: every view of the rule; the labels count the classes in use
            # (labels= first, as csl-fast clean and rank read --labels: it was ignored)
            given = labels if labels is not None else getattr(samples, "labels", None)
            det = default_detection(tracker, score, given)
    # as the detection ranks: the top table numbered held-out samples an eval pass scored
    # among the trained ones (of a loss-only run too), which csl-fast rank and the plan
    # leave out
    ranking = det.ranked.cpu().numpy()
    # headings said "Top 100000" of 300 samples; samples without a score are not ranked
    shown = min(top, len(ranking))
    # the grid draws one panel per sample: top = 100,000 ran for minutes; the table lists all
    in_grid = min(shown, GRID_MAX)
    # a tracker of sequences: CSL per token (summed, it grows with a sequence's length);
    # unequal presentation counts: per presentation, as the ranking (summed, it partly
    # drew how often the sampler drew each sample)
    # (as the ranking: score="csl" asked for draws the sum)
    unequal = not tracker.sequences and default_score(tracker) == "csl_mean"
    mean = score == "csl_mean" or (score != "csl" and default_score(tracker) == "csl_mean")
    per = ("token" if tracker.sequences else "presentation") if mean else None
    hist_score = "csl_mean" if per else "csl"
    csl = _np(all_scores[hist_score]) if hist_score in all_scores else s
    rocs: dict[str, list[Curve]] = {}
    coverage = _coverage(all_scores)

    def roc_figure(p: str) -> str | tuple[None, str] | None:
        rocs.update(roc_curves(all_scores, samples))  # the AUROC table reads them too
        return _fig_roc(rocs, samples, p, score)

    steps: list[tuple[str, str, Callable[[str], Any]]] = [
        (
            "CSL histogram",
            "csl_histogram.png",
            lambda p: _fig_histogram(csl, samples, p, per),
        ),
        (
            "ROC curves: CSL against the free baselines",
            "roc.png",
            roc_figure,
        ),
        (
            "Data map",
            "data_map.png",
            lambda p: (None, _NO_LOGITS) if loss_only else _fig_data_map(tracker, samples, p),
        ),
        (
            "Loss curves of easy and hard samples",
            "loss_curves.png",
            lambda p: _fig_loss_curves(tracker, samples, p),
        ),
        (
            f"Top {in_grid} suspicious samples",
            "top_samples.png",
            lambda p: (
                _fig_top_grid(ranking, samples, s, p, in_grid, score)
                if samples is not None
                else None
            ),
        ),
    ]
    captions = {
        "csl_histogram.png": _HISTOGRAM_CAPTIONS[
            "sequences"
            if per == "token"
            else "sequences_summed"
            if tracker.sequences
            else "loss_only"
            if loss_only
            else "softmax"
        ]
        + (
            " Drawn per presentation (csl_mean, the loss summed over training divided by the "
            "sample's presentations), as the ranking"
            + (
                ": the samples were presented unequally often, and summed CSL would partly "
                "show how often."
                if unequal
                else "."
            )
            if per == "presentation"
            else ""
        ),
        "roc.png": "Each corruption type is scored against the clean samples only (the other "
        "type is left out, as in the paper where each experiment injects one kind). "
        f"Thick black: {score}, the score this report ranks by; thick colours: the other "
        f"scores among the three best by AUROC (three when {score} is not among them); thin "
        f"grey: the rest{_alike(tracker, score, all_scores)}. The false-positive "
        "axis is logarithmic: the left part is where the first flags land." + coverage,
        "data_map.png": "Dataset cartography: mean and spread of the probability the model gave "
        "the label over training. A label the model rejected over training sits at the bottom "
        "(low confidence); one it hesitated over, then memorized, at middle confidence and high "
        "variability.",
        "loss_curves.png": "",
        "top_samples.png": "Given label (what training saw)"
        + (
            " and the final model's prediction."
            if samples is not None and samples.predicted is not None
            else "; the run saved no prediction (samples.npz has no 'predicted')."
        )
        + (
            f" The first {GRID_MAX} of the top {shown}; the table 'Top {shown} by {score}' "
            "lists them all."
            if shown > GRID_MAX
            else ""
        ),
    }
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # one step per figure, and the flagged set's sections (detection, cleaning plan)
        bar = tqdm(total=len(steps) + 1, desc="report", leave=False)
    figures: list[tuple[str, str, str | None, str]] = []
    for heading, fname, draw in steps:
        if bar is not None:
            bar.set_postfix_str(fname, refresh=True)
        png = os.path.join(out, fname)
        result = draw(png)
        caption, extra = captions[fname], ""
        if isinstance(result, tuple):
            result, extra = result
            caption = (caption + " " + extra).strip()
        if result is None:
            caption = "Not drawn: " + (extra or _MISSING.get(fname, ""))
            if os.path.exists(png):  # a stale figure of an earlier report
                os.unlink(png)
        figures.append((heading, fname, result, caption))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.set_postfix_str("flagged set and cleaning plan", refresh=True)

    table = _table(rocs, all_scores) if samples is not None and samples.has_truth else {}
    if not _best(table):
        # truth with no corrupted (or no clean) sample with a score drew a table of
        # definitions and n/a, no AUROC
        table = {}
    if loss_only:
        cleaning = _loss_only_sections(tracker, samples, det, score, top, out)
    else:
        from .report_cleaning import sections as cleaning_sections

        cleaning = cleaning_sections(tracker, samples, score, out, det, *dup_args)
        if tracker.label_csl is not None:
            cleaning += _entry_section(tracker, top)
    if dup_args[0] is not None and (dup_args[1] is not None or not loss_only):
        # a loss-only run has no score rule to infer conflicts by: only labels reveal them
        from .report_duplicates import section as duplicates_section

        cleaning += duplicates_section(tracker, samples, *dup_args, score)
    if bar is not None:
        bar.update()
        bar.close()
    page = _html(
        title,
        tracker,
        samples,
        all_scores,
        definitions(tracker.sequences),
        table,
        ranking,
        s,
        score,
        shown,
        figures,
        notes,
        cleaning,
        coverage,
        lost,
    )
    path = os.path.join(out, "report.html")
    atomic_file.write_text(path, lambda f: f.write(page), "write the report", "report.html")
    return path


def _with_given_labels(
    samples: RunSamples | None, labels: torch.Tensor | np.ndarray | None, n: int
) -> RunSamples | None:
    """``samples`` with ``labels`` as its given labels where it has none and they are one
    class per sample: the loss curves drew "all samples (labels unknown)" and the top-k
    table had no given column beside a flagged set counted from those labels."""
    if labels is None or (samples is not None and samples.labels is not None):
        return samples
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.shape != (n,) or y.dtype.kind not in "iu":  # (targets of sequences, losses, labels)
        return samples
    try:
        return RunSamples(labels=y) if samples is None else replace(samples, labels=y)
    except SamplesFileError as e:  # (class names too few for them: it raised from here)
        warnings.warn(
            "csl_fast.report: the labels given (labels=, csl-fast report --labels) are not "
            f"shown as the given labels: {e}",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        return samples


def _inputs_of(
    samples: RunSamples | None, inputs: Any, labels: Any, n: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The inputs and labels of the duplicate section: the arguments, else ``samples``'."""
    if inputs is None and samples is not None and samples.inputs is not None:
        inputs = samples.inputs
    if inputs is None:
        if labels is not None:
            # (dropped without a word, as csl-fast report --labels without inputs is not)
            raise ValueError(
                "write_report: labels= are read with the inputs of the duplicate groups: "
                "pass inputs= too, or pass the labels as samples=RunSamples(labels=...), "
                "which every section reads"
            )
        return None, None
    if labels is None and samples is not None:
        labels = samples.labels
    x = torch.as_tensor(inputs)
    y = None if labels is None else torch.as_tensor(labels)
    for name, v in (("inputs", x), ("labels", y)):
        if v is not None and (v.dim() == 0 or v.shape[0] != n):
            raise ValueError(
                f"write_report: {name} must have one row per sample ({n}), got {tuple(v.shape)}"
            )
    return x, y


def _html(
    title,
    tracker,
    samples,
    all_scores,
    infos,
    table,
    ranking,
    s,
    score,
    shown,
    figures,
    notes,
    cleaning="",
    coverage="",
    lost=None,
) -> str:
    from .scores import no_epoch_closed

    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>",
        _CSS,
        "</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>{tracker.num_samples} samples, {_classes(tracker)}, {_tracked(tracker)}. "
        f"Written {e(datetime.datetime.now().strftime('%Y-%m-%d %H:%M'))}. "
        "Every score is oriented so that <b>higher = more suspicious</b>.</p>",
    ]
    no_epoch = no_epoch_closed(tracker)
    if no_epoch is not None:
        # the learning times and the suggestions' confidence rest on epoch stamps, all 0
        parts.append(
            f"<p><b>Warning:</b> {e(no_epoch[0].upper() + no_epoch[1:])}: the learning "
            "times are 0 or 1 and the suggestions' confidence is underestimated (more "
            "drops).</p>"
        )
    if lost is not None:
        # "6 epochs tracked" of a run that diverged at epoch 3, and loss curves that stop
        parts.append(f"<p><b>Warning:</b> {e(lost[0].upper() + lost[1:])}.</p>")
    unequal = _unequal_presentations(tracker)
    if unequal is not None:
        parts.append(f"<p><b>Note:</b> {e(unequal[0].upper() + unequal[1:])}.</p>")
    unseen = _unseen_note(tracker, all_scores)
    if unseen:
        parts.append(f"<p>{unseen}</p>")
    if table:
        best = _best(table)
        # a type with no finite AUROC was a column of n/a (and numpy's All-NaN warning)
        kinds = [k for k in _KINDS if k in best]
        parts.append("<h2>Detection (AUROC)</h2><table><tr><th class=l>score</th>")
        parts += [f"<th>{e(k)}</th>" for k in kinds] + ["<th class=l>definition</th></tr>"]
        for name, row in table.items():
            parts.append(f"<tr><td class=l>{e(name)}</td>")
            for k in kinds:
                v = row.get(k, math.nan)
                cls = " class=best" if not math.isnan(v) and v >= best[k] - 1e-12 else ""
                parts.append(f"<td{cls}>{'n/a' if math.isnan(v) else f'{v:.3f}'}</td>")
            info = infos.get(name)
            parts.append(f"<td class=l>{e(info.formula) if info else ''}</td></tr>")
        parts.append(
            "</table><p class=cap>Each corruption type against the clean samples only."
            f"{e(coverage)}</p>"
        )
    elif samples is not None and samples.has_truth:
        parts.append(
            "<h2>Detection (AUROC)</h2><p class=cap>Not computed: it needs samples known to be "
            "corrupted and samples known to be clean, each with a finite score.</p>"
        )
    for heading, text in notes:
        parts.append(f"<h2>{e(heading)}</h2><pre>{e(text)}</pre>")
    for heading, fname, b64, caption in figures:
        if b64 is None:
            parts.append(f"<h2>{e(heading)}</h2><p class=cap>{e(caption)}</p>")
            continue
        parts.append(
            f"<h2>{e(heading)}</h2><img alt='{e(heading)}' src='data:image/png;base64,{b64}'>"
            f"<p class=cap>{e(caption)} (<code>{e(fname)}</code>)</p>"
        )
    parts.append(cleaning)  # flagged set, its composition, suggested labels
    if shown == 0:  # top = 0 wrote an empty "Top 0" table
        why = "top = 0" if np.isfinite(s).any() else f"no sample has a finite {score}"
        parts.append(f"<h2>Top samples by {e(score)}</h2><p class=cap>None listed: {e(why)}.</p>")
        return "".join([*parts, _END])
    parts.append(
        f"<h2>Top {shown} by {e(score)}</h2><table><tr><th>rank</th><th>index</th>"
        f"<th>{e(score)}</th>"
    )
    has_lab = samples is not None and samples.labels is not None
    has_pred = samples is not None and samples.predicted is not None
    if has_lab:
        parts.append("<th>given</th>")
    if has_pred:
        parts.append("<th>predicted</th>")
    if samples is not None and samples.has_truth:
        parts.append("<th class=l>ground truth</th>")
    parts.append("</tr>")
    for r, i in enumerate(ranking[:shown]):
        parts.append(f"<tr><td>{r + 1}</td><td>{int(i)}</td><td>{s[i]:.4g}</td>")
        if has_lab:
            parts.append(f"<td>{e(samples.class_name(int(samples.labels[i])))}</td>")
        if has_pred:
            parts.append(f"<td>{e(samples.class_name(int(samples.predicted[i])))}</td>")
        if samples is not None and samples.has_truth:
            parts.append(f"<td class=l>{_truth_html(samples, int(i))}</td>")
        parts.append("</tr>")
    return "".join([*parts, "</table>", _END])


_END = "<p class=cap>Generated by csl_fast.</p></body></html>"


def _alike(tracker: CSLTracker, score: str, all_scores: Mapping[str, torch.Tensor]) -> str:
    """What the ROC caption says of the CSL sibling of ``score`` (csl beside csl_mean):
    whether it lies under the thick line. "csl_mean on a run of equal epochs lies under its
    line" was false of a sequence run, whose summed csl ranks the long sequences first."""
    other = {"csl": "csl_mean", "csl_mean": "csl"}.get(score)
    if other is None or other not in all_scores:
        return ""
    counts = tracker.csl_count.cpu()
    counts = counts[counts > 0]
    if bool((counts == counts[0]).all()):  # a sum and a mean over one count rank alike
        return f" ({other} ranks as {score} does here and lies under its line)"
    what = "supervised tokens" if tracker.sequences else "presentations"
    return (
        f" ({other} ranks otherwise: the trained samples have different numbers of {what}, "
        "which csl sums over and csl_mean divides by)"
    )


def _unseen_note(tracker: CSLTracker, all_scores: Mapping[str, torch.Tensor]) -> str:
    """The header's HTML on the samples never presented in training ('' if none).

    Absent from every ranking, they vanished with no word; but an eval pass may have
    scored them: those eval scores are in the figures and the AUROC table, where the page
    had said they had no score."""
    from .cleaning import NO_SUPERVISED_TOKEN, NO_TOKEN_WHY

    unseen = (tracker.csl_count == 0).cpu()
    k = int(unseen.sum())
    if not k:
        return ""
    if tracker.sequences:  # (its counts are of supervised tokens: csl_fast.cleaning)
        head = (
            f"<b>{k} of {tracker.num_samples} samples were {NO_SUPERVISED_TOKEN}</b> "
            f"({NO_TOKEN_WHY}: no recorded loss): they are not ranked and cannot be flagged"
        )
    else:
        head = (
            f"<b>{k} of {tracker.num_samples} samples were never presented</b> in training "
            "(no recorded loss): they are not ranked and cannot be flagged"
        )
    finite = {name: torch.isfinite(v.cpu()[unseen]) for name, v in all_scores.items()}
    named = [name for name, ok in finite.items() if bool(ok.any())]
    if not named:
        return head + "; they have no score and are left out of the figures."
    scored = int(torch.stack([finite[name] for name in named]).any(0).sum())
    rest = "" if scored == k else f"; the other {k - scored} have no score"
    return (
        f"{head}. An eval pass scored {scored} of them: their scores {', '.join(named)} are "
        f"drawn wherever the page shows those scores (none of them is ranked){rest}."
    )


def _unequal_presentations(tracker: CSLTracker) -> str | None:
    """What the page says when the trained samples were presented unequally often, or None.

    Nothing counts the rows a recorder skips as non-finite: a loss NaN for half of each
    batch of one epoch left half the samples one presentation short, and their CSL a sum
    of fewer losses, with no word. A sampler that presents some samples more often looks
    the same. A tracker of sequences counts tokens, unequal by design."""
    if tracker.sequences:
        return None
    counts = tracker.csl_count.cpu()
    trained = counts > 0
    lo, hi = float(counts[trained].min()), float(counts[trained].max())
    if lo == hi:
        return None
    short = int((trained & (counts < hi)).sum())
    said = (
        f"the {int(trained.sum())} trained samples were presented {lo:g} to {hi:g} times "
        f"({short} fewer than {hi:g}): CSL sums a sample's losses, so it grows with its "
        "presentations (csl_mean divides by them). A recorder skips a row whose loss is "
        "non-finite without counting it, and a sampler may present some samples more "
        "often: the tracker cannot tell which"
    )
    if tracker.runs > 1:  # (the runs' own counts add up in a merge)
        said += f"; the tracker merges {tracker.runs} runs, which may have presented them unequally"

    if tracker.history and tracker.loss_history.shape[0]:
        from .scores import _spans

        recorded = (~torch.isnan(tracker.loss_history.cpu()[:, trained])).sum(1).tolist()
        part = [e + 1 for e, k in enumerate(recorded) if 0 < k < int(trained.sum())]
        if part:
            said += f"; epoch{'s' if len(part) > 1 else ''} {_spans(part)} recorded a loss "
            said += "for only part of them"
    return said


def _tracked(tracker: CSLTracker) -> str:
    """The header's epochs and eval passes, per run for a merge (csl_fast.merge): '3 epochs
    tracked' of 2 runs sat over CSLs that each sum 6 presentations."""
    if tracker.runs == 1:
        return f"{tracker.epoch} epochs tracked, {tracker.eval_passes} eval passes"
    # (a merge keeps the most epochs and the most eval passes of any of its runs, which
    # need not be the same run's)
    return (
        f"{tracker.runs} runs merged (csl_fast.merge; scores sum or pool over them), up to "
        f"{tracker.epoch} epochs and up to {tracker.eval_passes} eval passes in a run"
    )


def _classes(tracker: CSLTracker) -> str:
    # a multi-label (accumulate_bce) run read "? classes", and so did a regression
    if tracker.num_labels is not None:
        return f"{tracker.num_labels} labels (multi-label)"
    if tracker.num_classes is None:
        return "class count not given"
    return f"{tracker.num_classes} classes"


def _truth_html(samples: RunSamples, i: int) -> str:
    if samples.mislabeled is not None and samples.mislabeled[i]:
        true = (
            ""
            if samples.true_labels is None
            else f" (true {samples.class_name(int(samples.true_labels[i]))})"
        )
        return f"<span class=mis>mislabeled{html.escape(true)}</span>"
    if samples.duplicate is not None and samples.duplicate[i]:
        return "<span class=dup>duplicate pair</span>"
    return "clean"
