r"""The visual report of a tracked run: one self-contained HTML page plus PNG files.

:func:`write_report` draws, from a :class:`csl_fast.CSLTracker` and (optionally) what is
known about the samples (:class:`RunSamples`):

``csl_histogram.png``
    The distribution of CSL (log scale), split into clean, mislabeled and duplicated
    samples when the ground truth is known.
``roc.png``
    ROC curves of CSL against the free baselines (every score of
    :func:`csl_fast.scores`), for mislabeled and for duplicated samples. Needs the ground
    truth.
``data_map.png``
    Dataset-cartography map: variability (std of :math:`p_y` over training) against
    confidence (mean :math:`p_y`), coloured by whether the final model classifies the
    sample as labelled; corrupted samples are ringed when known.
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

``report.html`` embeds every PNG (base64), so the page can be mailed or archived alone.
Needs matplotlib; the ROC needs scikit-learn.

:class:`RunSamples` is the side file (``samples.npz``) that ``csl-fast demo`` writes next to
its tracker and that ``csl-fast rank``/``report`` read: given labels, predictions, optional
ground-truth masks and images. Write one for your own runs with :meth:`RunSamples.save`.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .tracker import CSLTracker

__all__ = ["SAMPLES_FILE", "RunSamples", "SamplesFileError", "write_report"]

#: Name of the per-sample side file in a run folder.
SAMPLES_FILE = "samples.npz"

_ARRAY_FIELDS = ("labels", "predicted", "true_labels", "mislabeled", "duplicate", "images")
_CLEAN, _MIS, _DUP = "#4C72B0", "#DD4444", "#E8A317"


class SamplesFileError(ValueError):
    """A ``samples.npz`` side file cannot be read or does not fit the tracker."""


@dataclass
class RunSamples:
    """What is known about the ``N`` tracked samples besides the tracker (all optional).

    Attributes:
        labels: int ``[N]`` labels the model was trained on ("given" labels).
        predicted: int ``[N]`` predictions of the final model.
        true_labels: int ``[N]`` clean labels, when known (e.g. before injected noise).
        mislabeled: bool ``[N]`` ground truth: label flipped.
        duplicate: bool ``[N]`` ground truth: member of a conflicting-label duplicate pair.
        images: ``[N, H, W]`` or ``[N, H, W, 3]`` images for the top-k grid.
        class_names: names of the classes (default: the class numbers).
    """

    labels: np.ndarray | None = None
    predicted: np.ndarray | None = None
    true_labels: np.ndarray | None = None
    mislabeled: np.ndarray | None = None
    duplicate: np.ndarray | None = None
    images: np.ndarray | None = None
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        for name in _ARRAY_FIELDS:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            if value is not None:
                value = np.asarray(value)
                if name in ("mislabeled", "duplicate"):
                    value = value.astype(bool)
            setattr(self, name, value)
        sizes = {
            name: len(getattr(self, name))
            for name in _ARRAY_FIELDS
            if getattr(self, name) is not None
        }
        if len(set(sizes.values())) > 1:
            raise SamplesFileError(f"RunSamples: fields have different lengths {sizes}")

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
        """Write the fields that are set to an ``.npz`` file."""
        arrays = {n: getattr(self, n) for n in _ARRAY_FIELDS if getattr(self, n) is not None}
        if self.class_names is not None:
            arrays["class_names"] = np.asarray([str(c) for c in self.class_names])
        arrays["format"] = np.asarray("csl_fast.samples/1")
        np.savez_compressed(os.fspath(path), **arrays)

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
                f"{path}: not a readable samples file (truncated or another format): "
                f"{type(exc).__name__}"
            ) from None
        if str(data.pop("format", "")) != "csl_fast.samples/1":
            raise SamplesFileError(f"{path}: not a csl_fast samples file (no format tag)")
        names = data.pop("class_names", None)
        known = {n: data[n] for n in _ARRAY_FIELDS if n in data}
        samples = cls(**known, class_names=None if names is None else [str(c) for c in names])
        if num_samples is not None and samples.num_samples not in (None, num_samples):
            raise SamplesFileError(
                f"{path}: describes {samples.num_samples} samples but the tracker has "
                f"{num_samples}; it belongs to another run"
            )
        return samples


# --------------------------------------------------------------------------- helpers
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _png(fig: Any, path: str) -> str:
    """Save ``fig`` to ``path`` and return the PNG as base64."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(data).decode("ascii")


def _groups(samples: RunSamples | None, n: int) -> list[tuple[str, np.ndarray, str]]:
    """``(name, mask, colour)`` of clean / mislabeled / duplicate samples (truth known)."""
    if samples is None or not samples.has_truth:
        return []
    mis = samples.mislabeled if samples.mislabeled is not None else np.zeros(n, bool)
    dup = samples.duplicate if samples.duplicate is not None else np.zeros(n, bool)
    out = [("clean", ~mis & ~dup, _CLEAN)]
    if mis.any():
        out.append(("mislabeled", mis, _MIS))
    if dup.any():
        out.append(("duplicate (conflicting label)", dup, _DUP))
    return out


def _eval_sets(samples: RunSamples | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each corruption type: (samples to evaluate on, positives among them).

    Each type is evaluated against the clean samples only (the other corruption type is
    left out), as in the paper, where each experiment injects one kind of corruption.
    """
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if samples is None:
        return out
    n = samples.num_samples or 0
    mis = samples.mislabeled if samples.mislabeled is not None else np.zeros(n, bool)
    dup = samples.duplicate if samples.duplicate is not None else np.zeros(n, bool)
    if samples.mislabeled is not None and mis.any() and (~mis & ~dup).any():
        keep = ~dup
        out["mislabeled"] = (keep, mis[keep])
    if samples.duplicate is not None and dup.any() and (~mis & ~dup).any():
        keep = ~mis
        out["duplicates"] = (keep, dup[keep])
    return out


def detection_table(
    scores: Mapping[str, torch.Tensor], samples: RunSamples | None
) -> dict[str, dict[str, float]]:
    """AUROC of every score for each known corruption type: ``{score: {type: auroc}}``.

    Each type's positives are scored against the clean samples (see the report's notes).
    Samples with a non-finite score are left out of that score's AUROC.
    """
    from .evaluate import auroc

    sets = _eval_sets(samples)
    table: dict[str, dict[str, float]] = {}
    for name, s in scores.items():
        v = _np(s)
        row = {}
        for kind, (keep, pos) in sets.items():
            vv = v[keep]
            ok = np.isfinite(vv)
            if ok.sum() < 2 or pos[ok].all() or not pos[ok].any():
                row[kind] = math.nan
                continue
            row[kind] = auroc(vv[ok], pos[ok])
        table[name] = row
    return table


def format_detection_table(table: Mapping[str, Mapping[str, float]]) -> str:
    """The detection table as aligned text (best value per column marked with ``*``)."""
    kinds = sorted(
        {k for row in table.values() for k in row}, key=["mislabeled", "duplicates"].index
    )
    if not kinds:
        return "(no ground truth: no detection table)"
    best = {
        k: max(
            (r[k] for r in table.values() if not math.isnan(r.get(k, math.nan))), default=math.nan
        )
        for k in kinds
    }
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


# --------------------------------------------------------------------------- figures
def _fig_histogram(csl: np.ndarray, samples: RunSamples | None, path: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ok = np.isfinite(csl) & (csl > 0)
    lo, hi = np.percentile(csl[ok], 0.1), csl[ok].max()
    bins = np.geomspace(max(lo, 1e-6), hi * 1.0001, 50)
    groups = _groups(samples, len(csl))
    if groups:
        for name, mask, colour in groups:
            ax.hist(
                csl[ok & mask],
                bins=bins,
                alpha=0.6,
                color=colour,
                label=f"{name} ({int((ok & mask).sum())})",
            )
        ax.legend(frameon=False, fontsize=8)
    else:
        ax.hist(csl[ok], bins=bins, color=_CLEAN, alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cumulative sample loss (CSL, log scale)")
    ax.set_ylabel("samples")
    ax.set_title("CSL: clean vs corrupted samples" if groups else "CSL distribution")
    return _png(fig, path)


_ROC_LEADERS = 3  # scores drawn thick and coloured in each panel; the rest thin grey


def _fig_roc(
    scores: Mapping[str, torch.Tensor], samples: RunSamples | None, path: str
) -> str | None:
    """ROC curves of every score, one panel per corruption type.

    A dozen curves on a linear axis pile up in the top-left corner, so: the leading
    ``_ROC_LEADERS`` scores by AUROC (and ``csl``, in black, wherever it ranks) are thick
    and in distinct colours, the others thin grey and summed up in one legend entry; the
    false-positive axis is logarithmic, down to one clean sample, where a detector's
    useful region (its first few dozen flags) lies.
    """
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    sets = _eval_sets(samples)
    if not sets:
        return None
    fig, axes = plt.subplots(1, len(sets), figsize=(5.4 * len(sets), 4.6), squeeze=False)
    leader_colours = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple")
    for ax, (kind, (keep, pos)) in zip(axes[0], sets.items(), strict=True):
        curves = []
        for name, s in scores.items():
            v = _np(s)[keep]
            ok = np.isfinite(v)
            if pos[ok].all() or not pos[ok].any():
                continue
            fpr, tpr, _ = roc_curve(pos[ok], v[ok])
            curves.append((roc_auc_score(pos[ok], v[ok]), name, fpr, tpr))
        curves.sort(key=lambda c: -c[0])
        leaders = [c[1] for c in curves if c[1] != "csl"][:_ROC_LEADERS]
        if "csl" in [c[1] for c in curves[:_ROC_LEADERS]]:
            leaders = leaders[: _ROC_LEADERS - 1]
        rest = [c for c in curves if c[1] != "csl" and c[1] not in leaders]
        for i, (_, _, fpr, tpr) in enumerate(rest):
            label = None
            if i == 0:
                lo, hi = min(c[0] for c in rest), max(c[0] for c in rest)
                label = f"{len(rest)} other scores ({lo:.2f}-{hi:.2f})"
            ax.plot(fpr, tpr, color="0.7", lw=0.8, label=label, zorder=1)
        for auc, name, fpr, tpr in reversed(curves):
            if name == "csl":
                ax.plot(fpr, tpr, color="black", lw=2.6, label=f"csl ({auc:.3f})", zorder=4)
            elif name in leaders:
                colour = leader_colours[leaders.index(name)]
                ax.plot(fpr, tpr, color=colour, lw=2.0, label=f"{name} ({auc:.3f})", zorder=3)
        clean = int((~pos).sum())
        floor = 0.5 / max(clean, 1)
        chance = np.geomspace(floor, 1.0, 50)
        ax.plot(chance, chance, ls=":", color="grey", lw=0.8, zorder=0)
        ax.set_xscale("log")
        ax.set_xlim(floor, 1.0)
        ax.set_ylim(0.0, 1.02)
        ax.grid(True, which="major", color="0.92", lw=0.6)
        ax.set_xlabel("false-positive rate (log scale; left edge: below one clean sample)")
        ax.set_ylabel("true-positive rate")
        ax.set_title(f"{kind}: {int(pos.sum())} positives vs {clean} clean")
        # Legend: the emphasised curves first (best AUROC first), the grey summary last.
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda j: (" other scores " in labels[j], -j))
        ax.legend(
            [handles[j] for j in order],
            [labels[j] for j in order],
            fontsize=7,
            frameon=False,
            loc="lower right",
            title="score (AUROC)",
            title_fontsize=7,
        )
    return _png(fig, path)


def _fig_data_map(tracker: CSLTracker, samples: RunSamples | None, path: str) -> str:
    import matplotlib.pyplot as plt

    conf = _np(tracker.confidence)
    var = _np(tracker.variability)
    correct = tracker.eval_last_correct if tracker.eval_passes > 0 else tracker.last_correct
    correct = correct.cpu().numpy().astype(bool)
    ok = np.isfinite(conf) & np.isfinite(var)
    fig, ax = plt.subplots(figsize=(7.6, 4.8))
    for mask, colour, name in (
        (ok & correct, "#55A868", "final model agrees with the label"),
        (ok & ~correct, "#222222", "final model disagrees"),
    ):
        ax.scatter(
            var[mask],
            conf[mask],
            s=7,
            c=colour,
            alpha=0.6,
            lw=0,
            label=f"{name} ({int(mask.sum())})",
        )
    for name, mask, colour in _groups(samples, len(conf))[1:]:
        m = ok & mask
        ax.scatter(
            var[m],
            conf[m],
            s=30,
            facecolors="none",
            edgecolors=colour,
            lw=1.0,
            label=f"{name} (ringed)",
        )
    ax.set_xlabel("variability (std of p(label) over training)")
    ax.set_ylabel("confidence (mean p(label) over training)")
    ax.set_title("Data map")
    ax.legend(
        fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0), markerscale=1.5
    )
    ax.set_ylim(-0.02, 1.02)
    return _png(fig, path)


def _fig_loss_curves(
    tracker: CSLTracker, samples: RunSamples | None, path: str, k: int = 8
) -> tuple[str | None, str]:
    import matplotlib.pyplot as plt

    hist = tracker.loss_history if tracker.history else torch.empty(0)
    source = "training loss"
    if hist.numel() == 0 and tracker.history and tracker.eval_passes > 0:
        hist, source = tracker.eval_loss_history, "eval-pass loss"
    if hist.numel() == 0 or hist.shape[0] < 2:
        return None, "needs a tracker created with history=True and at least two epochs"
    h = hist.float().cpu().numpy()  # [E, N]
    csl = _np(tracker.csl)
    labels = samples.labels if samples is not None and samples.labels is not None else None
    if labels is not None:
        classes, counts = np.unique(labels, return_counts=True)
        cls = int(classes[np.argmax(counts)])
        members = np.flatnonzero((labels == cls) & np.isfinite(csl))
        who = f"class {samples.class_name(cls)}"  # type: ignore[union-attr]
    else:
        members = np.flatnonzero(np.isfinite(csl))
        who = "all samples (labels unknown)"
    if members.size < 2:
        return None, "too few samples with a CSL"
    order = members[np.argsort(csl[members], kind="stable")]
    k = max(1, min(k, order.size // 2))
    easy, hard = order[:k], order[-k:]
    epochs = np.arange(1, h.shape[0] + 1)
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    for i in easy:
        ax.plot(epochs, h[:, i], color="#4C72B0", lw=0.8, alpha=0.45)
    for i in hard:
        ax.plot(epochs, h[:, i], color="#DD4444", lw=0.8, alpha=0.45)
    ax.plot(
        epochs,
        np.nanmean(h[:, easy], 1),
        color="#1F3F7A",
        lw=2.2,
        label=f"mean of the {k} lowest-CSL (easy)",
    )
    ax.plot(
        epochs,
        np.nanmean(h[:, hard], 1),
        color="#9E1B1B",
        lw=2.2,
        label=f"mean of the {k} highest-CSL (hard)",
    )
    ax.plot(
        epochs,
        np.nanmean(h[:, members], 1),
        color="black",
        lw=1.6,
        ls="--",
        label=f"mean of {who} ({members.size})",
    )
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"per-sample {source}")
    ax.set_title(f"Loss curves of easy and hard samples, {who}")
    ax.legend(fontsize=7, frameon=False)
    return _png(fig, path), f"{who}; {k} easiest and {k} hardest by CSL"


def _fig_top_grid(
    ranking: np.ndarray, samples: RunSamples, score: np.ndarray, path: str, k: int
) -> str | None:
    import matplotlib.pyplot as plt

    if samples.images is None:
        return None
    top = ranking[:k]
    cols = min(8, len(top))
    rows = math.ceil(len(top) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.35 * cols, 1.7 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, (ax, i) in enumerate(zip(axes.ravel(), top, strict=False)):
        img = samples.images[i]
        ax.imshow(img, cmap="gray_r" if img.ndim == 2 else None, interpolation="nearest")
        given = samples.class_name(int(samples.labels[i])) if samples.labels is not None else "?"
        pred = (
            samples.class_name(int(samples.predicted[i])) if samples.predicted is not None else "?"
        )
        colour = "black"
        if samples.mislabeled is not None and samples.mislabeled[i]:
            colour = _MIS
        elif samples.duplicate is not None and samples.duplicate[i]:
            colour = _DUP
        ax.set_title(f"#{r + 1} idx {int(i)}\ngiven {given}, pred {pred}", fontsize=7, color=colour)
    fig.suptitle(
        "Most suspicious samples by CSL"
        + (" (red: mislabeled, amber: duplicate)" if samples.has_truth else ""),
        fontsize=9,
    )
    return _png(fig, path)


# --------------------------------------------------------------------------- report
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


def write_report(
    tracker: CSLTracker,
    out_dir: str | os.PathLike,
    samples: RunSamples | None = None,
    *,
    title: str = "csl_fast report",
    score: str = "csl",
    top: int = 24,
    notes: Sequence[tuple[str, str]] = (),
    progress: bool = False,
) -> str:
    """Write the PNGs and ``report.html`` into ``out_dir``; returns the HTML path.

    Args:
        tracker: the run's tracker (any device; read only).
        out_dir: folder to create or overwrite files in.
        samples: labels, predictions, ground truth and images when known.
        title: page title.
        score: the score that ranks the top-k table and image grid.
        top: how many suspicious samples to list.
        notes: extra ``(heading, preformatted text)`` sections (e.g. the demo's overhead).
        progress: show a tqdm bar over the figures.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError as exc:
        raise ImportError("the report needs matplotlib: pip install matplotlib") from exc
    from .scores import SCORES
    from .scores import scores as compute_scores

    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    n = tracker.num_samples
    if samples is not None and samples.num_samples not in (None, n):
        raise SamplesFileError(f"samples describe {samples.num_samples} samples, the tracker {n}")
    all_scores = compute_scores(tracker)
    if score not in all_scores:
        raise KeyError(
            f"score {score!r} was not recorded in this run; available: {list(all_scores)}"
        )
    s = _np(all_scores[score])
    key = np.where(np.isfinite(s), s, -np.inf)
    ranking = np.argsort(-key, kind="stable")
    csl = _np(all_scores["csl"]) if "csl" in all_scores else s

    steps: list[tuple[str, str, Callable[[str], Any]]] = [
        ("CSL histogram", "csl_histogram.png", lambda p: _fig_histogram(csl, samples, p)),
        (
            "ROC curves: CSL against the free baselines",
            "roc.png",
            lambda p: _fig_roc(all_scores, samples, p),
        ),
        ("Data map", "data_map.png", lambda p: _fig_data_map(tracker, samples, p)),
        (
            "Loss curves of easy and hard samples",
            "loss_curves.png",
            lambda p: _fig_loss_curves(tracker, samples, p),
        ),
        (
            f"Top {top} suspicious samples",
            "top_samples.png",
            lambda p: _fig_top_grid(ranking, samples, s, p, top) if samples is not None else None,
        ),
    ]
    captions = {
        "csl_histogram.png": "Cumulative sample loss of every training sample. Samples whose label "
        "contradicts similar samples keep a high loss for many epochs and sit in the right tail.",
        "roc.png": "Each corruption type is scored against the clean samples only (the other "
        "type is left out, as in the paper where each experiment injects one kind). "
        "Thick black: CSL; thick colours: the three best other scores by AUROC; thin grey: "
        "the rest. The false-positive axis is logarithmic: the left part is where the first "
        "flags land.",
        "data_map.png": "Dataset cartography: mean and spread of the probability the model gave "
        "the label over training. Mislabeled samples sit at the bottom (low confidence).",
        "loss_curves.png": "",
        "top_samples.png": "Given label (what training saw) and the final model's prediction.",
    }
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(steps), desc="report", leave=False)
    figures: list[tuple[str, str, str | None, str]] = []
    for heading, fname, draw in steps:
        png = os.path.join(out, fname)
        result = draw(png)
        caption, extra = captions[fname], ""
        if isinstance(result, tuple):
            result, extra = result
            caption = (caption + " " + extra).strip()
        if result is None:
            caption = "Not drawn: " + _MISSING.get(fname, extra)
            if os.path.exists(png):  # a stale figure of an earlier report
                os.unlink(png)
        figures.append((heading, fname, result, caption))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()

    table = (
        detection_table(all_scores, samples) if samples is not None and samples.has_truth else {}
    )
    from .report_cleaning import sections as cleaning_sections

    cleaning = cleaning_sections(tracker, samples, score, out)
    page = _html(
        title,
        tracker,
        samples,
        all_scores,
        SCORES,
        table,
        ranking,
        s,
        score,
        top,
        figures,
        notes,
        cleaning,
    )
    path = os.path.join(out, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


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
    top,
    figures,
    notes,
    cleaning="",
) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>",
        _CSS,
        "</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>{tracker.num_samples} samples, {tracker.num_classes or '?'} classes, "
        f"{tracker.epoch} epochs tracked, {tracker.eval_passes} eval passes. "
        f"Written {e(datetime.datetime.now().strftime('%Y-%m-%d %H:%M'))}. "
        "Every score is oriented so that <b>higher = more suspicious</b>.</p>",
    ]
    if table:
        kinds = [k for k in ("mislabeled", "duplicates") if any(k in r for r in table.values())]
        best = {k: np.nanmax([r.get(k, np.nan) for r in table.values()]) for k in kinds}
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
            "</table><p class=cap>Each corruption type against the clean samples only.</p>"
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
    parts.append(
        f"<h2>Top {top} by {e(score)}</h2><table><tr><th>rank</th><th>index</th><th>{e(score)}</th>"
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
    for r, i in enumerate(ranking[:top]):
        if not np.isfinite(s[i]):
            break
        parts.append(f"<tr><td>{r + 1}</td><td>{int(i)}</td><td>{s[i]:.4g}</td>")
        if has_lab:
            parts.append(f"<td>{e(samples.class_name(int(samples.labels[i])))}</td>")
        if has_pred:
            parts.append(f"<td>{e(samples.class_name(int(samples.predicted[i])))}</td>")
        if samples is not None and samples.has_truth:
            parts.append(f"<td class=l>{_truth_html(samples, int(i))}</td>")
        parts.append("</tr>")
    parts.append("</table><p class=cap>Generated by csl_fast.</p></body></html>")
    return "".join(parts)


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
