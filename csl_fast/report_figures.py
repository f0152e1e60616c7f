"""The figures of the visual report (:func:`csl_fast.report.write_report`): each
``_fig_*`` draws one PNG from a tracker or its scores, writes it and returns it as base64
for the self-contained HTML page; ``None`` where the run lacks what the figure needs.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from . import atomic_file

if TYPE_CHECKING:
    from .report import RunSamples
    from .tracker import CSLTracker


# Colours of the sample groups, the same in every figure.
_CLEAN, _MIS, _DUP = "#4C72B0", "#DD4444", "#E8A317"


# --------------------------------------------------------------------------- helpers
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _png(fig: Any, path: str) -> str:
    """Save ``fig`` to ``path`` (atomically: a full disk or an interrupt leaves the
    earlier figure whole, never a truncated one) and return the PNG as base64."""
    import matplotlib.text

    # drawn literally: class names and titles are the user's text ("$30-$39" was set as
    # maths, and a TeX-like name crashed the report); per text, not rcParams, which are
    # global to the process
    for text in fig.findobj(matplotlib.text.Text):
        text.set_parse_math(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    data = buf.getvalue()
    action = "write the report's figure"
    atomic_file.write(
        path, atomic_file.target_of(path, action, "roc.png"), lambda f: f.write(data), action
    )
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(data).decode("ascii")


def _log_scale(ax: Any, which: str) -> None:
    """A log scale on axis ``which`` ("x" or "y") ticked in plain numbers (3, 10, 20).
    Across less than a decade matplotlib labels the minor ticks 3x10^0, 4x10^0, ...:
    hard to read at the size of a report's figure."""
    from matplotlib.ticker import LogFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(LogFormatter())
    # the default minor formatter's choice of which minor ticks to label, in plain numbers
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


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


class Curve(NamedTuple):
    """One ROC curve, over the samples with a finite score (``positives`` corrupted and
    ``clean`` clean ones: a score defined on a subset covers fewer than the truth knows)."""

    auroc: float
    name: str
    fpr: np.ndarray
    tpr: np.ndarray
    positives: int
    clean: int


def roc_curves(
    scores: Mapping[str, torch.Tensor], samples: RunSamples | None
) -> dict[str, list[Curve]]:
    """For each corruption type (:func:`_eval_sets`), the ROC curve of every score with
    both positives and clean samples among its finite values, best AUROC first.

    One ``sklearn.metrics.roc_curve`` per score and type, the AUROC the area under it (what
    ``roc_auc_score`` computes from the same curve): each is a sort of the ``N`` scores,
    and the report sorted every score three times (its curve, its AUROC, the table), 27
    sorts and two minutes at N = 10 million."""
    from sklearn.metrics import auc, roc_curve

    out: dict[str, list[Curve]] = {}
    for kind, (keep, pos) in _eval_sets(samples).items():
        curves = []
        for name, s in scores.items():
            v = _np(s)[keep]
            ok = np.isfinite(v)
            if pos[ok].all() or not pos[ok].any():
                continue
            fpr, tpr, _ = roc_curve(pos[ok], v[ok])
            auroc = float(auc(fpr, tpr))
            npos = int(pos[ok].sum())
            curves.append(Curve(auroc, name, fpr, tpr, npos, int(ok.sum()) - npos))
        curves.sort(key=lambda c: -c[0])
        out[kind] = curves
    return out


# --------------------------------------------------------------------------- figures
def _on_log_axis(fpr: np.ndarray, tpr: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """An ROC curve's points for a log false-positive axis: each straight segment (a run of
    tied scores) sampled along its length, and ``fpr = 0`` drawn at ``floor``. Drawn as
    is, the segment from (0, 0) of a score tied everywhere (AUROC 0.5) ran flat along the
    top from the axis's clipped left edge, as a perfect detector's would."""
    fpr, tpr = np.asarray(fpr, float), np.asarray(tpr, float)
    grid = np.geomspace(floor, 1.0, 200)
    k = np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, max(len(fpr) - 2, 0))
    if len(fpr) < 2:
        return np.maximum(fpr, floor), tpr
    dx = fpr[k + 1] - fpr[k]
    inside = (grid > fpr[k]) & (grid < fpr[k + 1]) & (dx > 0)
    y = tpr[k] + (tpr[k + 1] - tpr[k]) * (grid - fpr[k]) / np.where(dx > 0, dx, 1.0)
    x = np.concatenate([fpr, grid[inside]])
    y = np.concatenate([tpr, y[inside]])
    order = np.lexsort((y, x))
    return np.maximum(x[order], floor), y[order]


def _fig_histogram(
    csl: np.ndarray, samples: RunSamples | None, path: str, per: str | None = None
) -> str | tuple[None, str]:
    """The CSL histogram; ``per``: ``"token"`` for CSL per token (a tracker of sequences),
    ``"presentation"`` for the mean loss (samples presented unequally often)."""
    import matplotlib.pyplot as plt

    finite = np.isfinite(csl)
    if not finite.any():
        # the message below blamed a perfect fit for a CSL that is NaN everywhere
        return None, "no sample has a finite CSL (every value is NaN or infinite)."
    # a loss that can be negative (record_loss of a Gaussian NLL): a log axis has no place
    # for those samples, which vanished without a word (all negative: "every CSL is 0")
    negative = int((csl[finite] < 0).sum())
    ok = finite if negative else finite & (csl > 0)
    if not ok.any():
        # a log axis has no place for 0, and np.percentile of nothing raised IndexError
        return None, (
            "every sample's CSL is 0: the model fitted every label from the first step "
            "(with a single class the loss is always 0), so there is no distribution to draw."
        )
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    bins = _linear_bins(csl[ok]) if negative else _log_bins(csl[ok])
    what = f"CSL per {per}" if per else "CSL"
    full = f"mean loss per {per} over training" if per else "cumulative sample loss"
    if negative:
        scale = f"linear scale: {negative} samples with a negative {what}, the loss can be < 0"
    else:  # a log axis cannot show them, and they left without a word
        zeros = int((csl == 0).sum())
        scale = "log scale" + (f"; {zeros} samples with CSL 0 not shown" if zeros else "")
    groups = _groups(samples, len(csl))
    # the lowest 0.1% lay left of the first bin and were not drawn, yet counted in the legend
    csl = np.clip(csl, bins[0], bins[-1])
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
    if not negative:
        _log_scale(ax, "x")
    _log_scale(ax, "y")
    # autoscaled, the axis began just under 1: a bin of one sample, as a small group's bins
    # are, was a sliver at the bottom
    ax.set_ylim(bottom=0.3)
    ax.set_xlabel(f"{full} ({what}, {scale})")
    ax.set_ylabel("samples")
    if len(groups) > 1:
        ax.set_title(f"{what}: clean vs corrupted samples")
    else:  # with the truth known and nothing corrupted it promised a comparison not drawn
        ax.set_title(f"{what} distribution" + (" (no sample corrupted)" if groups else ""))
    return _png(fig, path)


def _log_bins(values: np.ndarray) -> np.ndarray:
    """50 log-spaced bins over positive ``values`` from their 0.1th percentile."""
    lo, hi = np.percentile(values, 0.1), values.max()
    if hi <= lo * (1 + 1e-9):
        # one value (N = 1, equal CSLs): a 1e-4 wide log axis of overlapping tick labels
        lo, hi = lo / 2, hi * 2
    return np.geomspace(max(lo, 1e-6), hi * 1.0001, 50)


def _linear_bins(values: np.ndarray) -> np.ndarray:
    """50 bins over ``values`` of any sign."""
    lo, hi = values.min(), values.max()
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi), 1.0):  # one value: a readable axis around it
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, 50)


_ROC_LEADERS = 3  # scores drawn thick and coloured in each panel; the rest thin grey


def _fig_roc(
    rocs: Mapping[str, list[Curve]], samples: RunSamples | None, path: str, lead: str
) -> str | tuple[None, str] | None:
    """ROC curves of every score, one panel per corruption type.

    A dozen curves on a linear axis pile up in the top-left corner, so: the leading
    ``_ROC_LEADERS`` scores by AUROC (and ``lead``, the score the report ranks by, in black,
    wherever it ranks) are thick
    and in distinct colours, the others thin grey and summed up in one legend entry; the
    false-positive axis is logarithmic, down to one clean sample, where a detector's
    useful region (its first few dozen flags) lies.
    """
    import matplotlib.pyplot as plt

    known = _eval_sets(samples)
    # a type whose corrupted samples have no score (never presented) drew an empty panel
    sets = {kind: v for kind, v in known.items() if rocs.get(kind)}
    if not sets:
        if known:
            return None, (
                "no score has a finite value for both a corrupted and a clean sample (the "
                "corrupted ones were never presented, or no sample has a score): there is "
                "nothing to tell apart."
            )
        if samples is not None and (
            samples.mislabeled is not None or samples.duplicate is not None
        ):
            # "needs the ground truth" read wrong beside a samples.npz that holds it
            return None, (
                "the ground truth (samples.npz) holds no corrupted sample, or no clean one: "
                "there is nothing to tell apart."
            )
        return None
    fig, axes = plt.subplots(1, len(sets), figsize=(5.4 * len(sets), 4.6), squeeze=False)
    for ax, kind in zip(axes[0], sets, strict=True):
        _roc_panel(ax, kind, rocs[kind], lead)
    left_out = [kind for kind in known if kind not in sets]
    if left_out:
        return _png(fig, path), (
            f"No panel for {' or '.join(left_out)}: no score has a finite value for both a "
            "corrupted and a clean sample of that type."
        )
    return _png(fig, path)


def _sizes(curves: Sequence[Curve]) -> str:
    """'2 vs 8': the positives and clean samples ``curves`` cover (ranges if they differ)."""

    def span(values: set[int]) -> str:
        return f"{min(values)}" if len(values) == 1 else f"{min(values)}-{max(values)}"

    return f"{span({c.positives for c in curves})} vs {span({c.clean for c in curves})}"


def _roc_panel(ax: Any, kind: str, curves: list[Curve], lead: str) -> None:
    """One corruption type's panel of :func:`_fig_roc`, ``lead``'s curve in thick black
    (the report's score: csl drawn there beside a histogram and ranking of a sequence
    run's csl_mean showed a score the page did not rank by)."""
    leader_colours = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple")
    leaders = [c.name for c in curves if c.name != lead][:_ROC_LEADERS]
    if lead in [c.name for c in curves[:_ROC_LEADERS]]:
        leaders = leaders[: _ROC_LEADERS - 1]
    rest = [c for c in curves if c.name != lead and c.name not in leaders]
    # over the samples with a finite score, not every known one: 10 trained of 300 read
    # "30 positives vs 270 clean", the axis down to 1/540 under a first step of 1/8
    apart = len({(c.positives, c.clean) for c in curves}) > 1
    floor = 0.5 / max(c.clean for c in curves)
    for i, c in enumerate(rest):
        summary = None
        if i == 0:
            lo, hi = min(c.auroc for c in rest), max(c.auroc for c in rest)
            summary = f"{len(rest)} other scores ({lo:.2f}-{hi:.2f}"
            summary += f"; {_sizes(rest)})" if apart else ")"
        ax.plot(*_on_log_axis(c.fpr, c.tpr, floor), color="0.7", lw=0.8, label=summary, zorder=1)
    for c in reversed(curves):
        if c.name != lead and c.name not in leaders:
            continue
        label = f"{c.name} ({c.auroc:.3f}" + (f"; {_sizes([c])})" if apart else ")")
        x, y = _on_log_axis(c.fpr, c.tpr, floor)
        if c.name == lead:
            ax.plot(x, y, color="black", lw=2.6, label=label, zorder=4)
        else:
            colour = leader_colours[leaders.index(c.name)]
            ax.plot(x, y, color=colour, lw=2.0, label=label, zorder=3)
    chance = np.geomspace(floor, 1.0, 50)
    ax.plot(chance, chance, ls=":", color="grey", lw=0.8, zorder=0)
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, which="major", color="0.92", lw=0.6)
    ax.set_xlabel("false-positive rate (log scale; left edge: below one clean sample)")
    ax.set_ylabel("true-positive rate")
    if apart:  # the curves' sample sets differ: each legend entry says its own
        ax.set_title(f"{kind}: scores cover different samples (positives vs clean: legend)")
    else:
        ax.set_title(f"{kind}: {curves[0].positives} positives vs {curves[0].clean} clean")
    # Legend: the emphasised curves first (best AUROC first), the grey summary last.
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda j: (" other scores " in labels[j], -j))
    ax.legend(
        [handles[j] for j in order],
        [labels[j] for j in order],
        fontsize=7,
        frameon=False,
        loc="lower right",
        title="score (AUROC; positives vs clean)" if apart else "score (AUROC)",
        title_fontsize=7,
    )


# tracker.record_sequences pools p(label) over every token of every presentation
_SEQUENCE_DATA_MAP = (
    "a tracker of sequences pools the probability of each target token over all tokens "
    "and presentations: its spread mixes the spread across a sequence's tokens with that "
    "over training (a model that never changed still has a large one), and 'agrees with "
    "the label' would mean every token; the map's reading does not hold for sequences."
)


def _agreement(tracker: CSLTracker, shown: np.ndarray) -> tuple[np.ndarray, str]:
    """Whether the model predicted each sample's label, and the caption's word on when.

    An eval pass (:func:`csl_fast.score_epoch`) may score a subset: the samples it did not
    score were coloured by its default ``eval_last_correct`` (False), as disagreeing.
    """
    from .scores import eval_is_latest

    correct = tracker.last_correct.cpu().numpy().astype(bool)
    scored = (tracker.eval_count > 0).cpu().numpy() & shown
    if not eval_is_latest(tracker):  # training went on after it: an older model's word
        scored[:] = False
    if scored.any():
        correct = np.where(scored, tracker.eval_last_correct.cpu().numpy().astype(bool), correct)
    k, n = int(scored.sum()), int(shown.sum())
    if k == 0:
        when = "at its last training presentation"
    elif k == n:
        when = "at the last eval pass that scored it (csl_fast.score_epoch)"
    else:
        when = (
            f"at the last eval pass that scored it for the {k} samples an eval pass scored, "
            f"at its last training presentation for the other {n - k}"
        )
    return correct, f"Colour: whether the model predicted the sample's label {when}."


def _fig_data_map(
    tracker: CSLTracker, samples: RunSamples | None, path: str
) -> tuple[str | None, str]:
    import matplotlib.pyplot as plt

    if tracker.sequences:
        return None, _SEQUENCE_DATA_MAP
    conf = _np(tracker.confidence)
    var = _np(tracker.variability)
    ok = np.isfinite(conf) & np.isfinite(var)
    correct, colour_note = _agreement(tracker, ok)
    fig, ax = plt.subplots(figsize=(7.6, 4.8))
    for mask, colour, name in (
        (ok & correct, "#55A868", "model agrees with the label"),
        (ok & ~correct, "#222222", "model disagrees"),
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
    # a std is >= 0, but one class (every variability 0) drew an axis from -0.04 to 0.04
    right = max(float(var[ok].max()) if ok.any() else 0.0, 0.05) * 1.05
    ax.set_xlim(-0.02 * right, right)
    if ok.any() and not (var[ok] > 0).any():
        # one epoch put every point on the left edge, with no word why
        colour_note += (
            " Every variability is 0: each sample was presented once (a run of one epoch) "
            "or its p(label) never changed (one class), so the map spreads samples along "
            "confidence only."
        )
    return _png(fig, path), colour_note


def _fig_loss_curves(
    tracker: CSLTracker, samples: RunSamples | None, path: str, k: int = 8
) -> tuple[str | None, str]:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from .detect import _unequal_counts as unequal_counts

    hist = tracker.loss_history if tracker.history else torch.empty(0)
    source = "training loss"
    if hist.numel() == 0 and tracker.history and tracker.eval_passes > 0:
        hist, source = tracker.eval_loss_history, "eval-pass loss"
    if hist.numel() == 0 or hist.shape[0] < 2:
        return None, "needs a tracker created with history=True and at least two epochs"
    h = hist.float().cpu().numpy()  # [E, N]
    eval_only = source == "eval-pass loss"
    csl = _np(tracker.eval_csl_sum if eval_only else tracker.csl)
    count = _np(tracker.eval_count if eval_only else tracker.csl_count)
    # never-presented samples hold a CSL of 0, not NaN: they were drawn as the easiest,
    # with curves of NaN only
    shown = np.isfinite(csl) & (count > 0)
    by = "CSL"
    if tracker.sequences and not eval_only:
        # per token, as the histogram and the ranking: summed, long clean sequences were
        # drawn as the hardest and short badly fitted ones as the easiest
        csl, by = np.where(shown, csl / np.maximum(count, 1), np.nan), "CSL per token"
    elif not eval_only and unequal_counts(tracker) is not None:
        # per presentation, as the default ranking then is: summed, the samples presented
        # most often were drawn as the hardest
        csl, by = np.where(shown, csl / np.maximum(count, 1), np.nan), "csl_mean"
    labels = samples.labels if samples is not None and samples.labels is not None else None
    members = np.flatnonzero(shown)
    who = "all samples (labels unknown)"
    if labels is not None and members.size:
        # the most common label among the samples with a curve: among all, it picked a class
        # never trained on and drew nothing beside 150 trained samples of the others
        classes, counts = np.unique(labels[members], return_counts=True)
        cls = int(classes[np.argmax(counts)])
        members = members[labels[members] == cls]
        who = f"class {samples.class_name(cls)}"  # type: ignore[union-attr]
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
    means = (
        (easy, "#1F3F7A", 2.2, "-", f"mean of the {k} lowest by {by} (easy)"),
        (hard, "#9E1B1B", 2.2, "-", f"mean of the {k} highest by {by} (hard)"),
        (members, "black", 1.6, "--", f"mean of {who} ({members.size})"),
    )
    for cols, colour, lw, ls, label in means:
        ax.plot(epochs, _row_means(h[:, cols]), color=colour, lw=lw, ls=ls, label=label)
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xlabel("epoch")
    # epochs are whole: 2 epochs were ticked 1.0, 1.2, ..., 2.0
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"per-sample {source}")
    ax.set_title(f"Loss curves of easy and hard samples, {who}")
    ax.legend(fontsize=7, frameon=False)
    return _png(fig, path), f"{who}; {k} easiest and {k} hardest by {by}"


def _row_means(a: np.ndarray) -> np.ndarray:
    """Each row's mean over its values that are not NaN (inf: a mean past float16's range
    in the history), NaN for a row of none (np.nanmean warned 'Mean of empty slice' to
    stderr for each epoch of a run that diverged)."""
    held = ~np.isnan(a)
    count = held.sum(1)
    total = np.where(held, a, 0.0).sum(1)
    return np.divide(total, count, out=np.full(len(a), np.nan), where=count > 0)


#: The most characters of a class name a grid panel's title line holds (7 pt in 1.35 in).
_NAME_WIDTH = 12


def _short(name: str) -> str:
    """``name`` cut to :data:`_NAME_WIDTH` characters, an ellipsis marking the cut."""
    return name if len(name) <= _NAME_WIDTH else name[: _NAME_WIDTH - 1] + "\u2026"


def _fig_top_grid(
    ranking: np.ndarray,
    samples: RunSamples,
    score: np.ndarray,
    path: str,
    k: int,
    score_name: str = "csl",
) -> str | tuple[None, str] | None:
    import matplotlib.pyplot as plt

    if samples.images is None:
        return None
    if k == 0:  # a grid of no columns divided by zero
        return None, "top = 0: no sample to show."
    top = ranking[:k]
    cols = min(8, len(top))
    rows = math.ceil(len(top) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.35 * cols, 1.85 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, (ax, i) in enumerate(zip(axes.ravel(), top, strict=False)):
        img = samples.images[i]
        ax.imshow(img, cmap="gray_r" if img.ndim == 2 else None, interpolation="nearest")
        given = samples.class_name(int(samples.labels[i])) if samples.labels is not None else "?"
        colour = "black"
        if samples.mislabeled is not None and samples.mislabeled[i]:
            colour = _MIS
        elif samples.duplicate is not None and samples.duplicate[i]:
            colour = _DUP
        # on one line, class names past a few characters ran into the neighbouring panels
        title = f"#{r + 1} idx {int(i)}\ngiven {_short(given)}"
        if samples.predicted is not None:  # (no line of "pred ?" where none was saved)
            title += f"\npred {_short(samples.class_name(int(samples.predicted[i])))}"
        ax.set_title(title, fontsize=7, color=colour)
    fig.suptitle(
        # the grid follows --score; its title said "by CSL" whatever the ranking was
        f"Most suspicious samples by {score_name}"
        + (" (red: mislabeled, amber: duplicate)" if samples.has_truth else ""),
        fontsize=9,
    )
    return _png(fig, path)
