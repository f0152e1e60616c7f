r"""The report's sections on acting on the flagged set (issue 14), for
:func:`csl_fast.report.write_report`:

``Flagged set``
    ``flagging.png``: the histogram of the detection score with the rule's threshold, the
    number flagged and the rule's estimated count of bad samples with its interval (the
    warning of :func:`csl_fast.detect.mislabeled` instead when the rule does not apply or
    flags nothing).
``What the flagged set is made of``
    flipped labels, conflicting-label duplicates and clean samples among the flagged ones,
    with precision and recall (needs the ground truth in ``samples.npz``).
``Suggested labels``
    what :func:`csl_fast.clean` would do with the flagged set under its default policy
    (relabels and drops), and, with the true labels known, how many relabels are right and
    the fraction of all flipped samples whose suggestion is their true label.
``Clean and retrain``
    the clean-test accuracy table (noisy / cleaned and retrained / true-label ceiling),
    when the run measured one (``csl-fast demo`` does): :func:`format_retrain_table`.
"""

from __future__ import annotations

import html
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["format_retrain_table", "sections"]

#: Rows of :func:`format_retrain_table`: key of the accuracy mapping -> what was trained.
RETRAIN_ROWS = {
    "noisy": "trained on the given (noisy) labels",
    "cleaned": "retrained once on csl_fast's cleaned data",
    "ceiling": "trained on the true labels (ceiling)",
}


#: The fewest held-out samples between the noisy arm and the ceiling for the share of that
#: gap won back to be said (below, one sample either way swings it by 50% or more).
_MIN_GAP = 3


def format_retrain_table(accuracy: Mapping[str, float], test_size: int, extra: str = "") -> str:
    """The clean-and-retrain table as aligned text.

    Args:
        accuracy: clean-test accuracy per arm, keys of :data:`RETRAIN_ROWS` (``noisy``,
            ``cleaned``, ``ceiling``); missing arms are left out.
        test_size: the number of held-out test samples.
        extra: a line appended below the table (e.g. what the cleaning did).

    The gain line reads ``(cleaned - noisy) / (ceiling - noisy)``: the share of the
    accuracy lost to label noise that cleaning won back, said when that gap is at least
    3 held-out samples.
    """
    unknown = set(accuracy) - set(RETRAIN_ROWS)
    if unknown:  # a misspelt arm was left out of the table without a word
        raise ValueError(
            f"format_retrain_table: unknown arms {sorted(unknown)}; use {list(RETRAIN_ROWS)}"
        )
    lines = [f"clean-test accuracy on {test_size} held-out samples"]
    for key, label in RETRAIN_ROWS.items():
        if key in accuracy:
            lines.append(f"  {label:<44}{accuracy[key]:8.4f}")
    if all(k in accuracy for k in RETRAIN_ROWS):
        gap = accuracy["ceiling"] - accuracy["noisy"]
        gain = accuracy["cleaned"] - accuracy["noisy"]
        between = round(gap * test_size)  # held-out samples the noise cost
        if gap <= 0:
            share = "no gap to close"
        elif between < _MIN_GAP:  # a share of 1 sample read -4233% of the gap
            share = f"the gap to the ceiling is {between} held-out sample(s), too few to share"
        else:
            share = f"{gain / gap:.0%} of the gap to the ceiling"
        lines.append(f"  cleaning: {100 * gain:+.1f} points ({share})")
    if extra:
        lines.append(extra)
    return "\n".join(lines)


def _fig_flagging(det: Any, path: str) -> str:
    import matplotlib.pyplot as plt

    from .report import _png
    from .report_figures import _log_scale

    v = det.scores.detach().cpu().double().numpy()
    flagged = det.flagged.cpu().numpy()
    # the samples the rule ranked: held-out ones an eval pass scored were drawn as "not
    # flagged" beside them, though the rule never considered them
    ok = np.zeros(v.size, bool)
    ok[det.ranked.cpu().numpy()] = True
    ok &= np.isfinite(v)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if not ok.any():
        # min() of no value raised ValueError: the section still needs its figure
        ax.text(
            0.5,
            0.5,
            f"no sample has a finite {det.score_name}: nothing to draw",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_axis_off()
        ax.set_title(f"flagged {len(det)} of {int(ok.sum())} ranked", fontsize=10)
        return _png(fig, path)
    vals = v[ok]
    log = bool((vals > 0).all())
    # a bin across the lowest flagged score drew flagged bars left of the threshold line
    cut = v[flagged].min() if flagged.any() else None
    bins = _bins(vals.min(), vals.max(), log, cut)
    if log:
        _log_scale(ax, "x")
    ax.hist(v[ok & ~flagged], bins=bins, color="#4C72B0", alpha=0.7, label="not flagged")
    if flagged.any():
        ax.hist(v[ok & flagged], bins=bins, color="#DD4444", alpha=0.8, label="flagged")
    if math.isfinite(det.threshold):
        ax.axvline(det.threshold, color="black", ls="--", lw=1.2, label="threshold")
    _log_scale(ax, "y")
    # autoscaled, a bin of one sample (a few flagged ones) was a sliver at the bottom
    ax.set_ylim(bottom=0.3)
    ax.set_xlabel(f"{det.score_name}" + (" (log scale)" if log else ""))
    ax.set_ylabel("samples")
    from .detect import count_phrase

    title = f"flagged {len(det)} of {int(ok.sum())}"
    if ok.sum() < v.size:
        title += f" ranked ({v.size} samples)"
    estimate = count_phrase(det)
    if estimate is not None:
        title += f"; {estimate}"
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    return _png(fig, path)


def _bins(lo: float, hi: float, log: bool, cut: float | None) -> np.ndarray:
    """60 histogram bins over ``[lo, hi]`` (equal in log space on a log axis) with an edge
    at ``cut``, the lowest flagged score: an edge beside it was moved there, so that no bin
    is under half the others' width (with ``cut`` the largest score, as when a discrete
    score ties at its top, the flagged bar was a bin 1e-12 wide: invisible)."""
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi)) + 1e-12:
        # one value (N = 1, a constant score, negative too): a 1e-12 wide axis of unreadable
        # ticks
        lo, hi = (lo / 2, hi * 2) if log else (lo - 0.5, hi + 0.5)
    edges = np.geomspace(lo, hi * 1.0001, 60) if log else np.linspace(lo, hi + 1e-12, 60)
    if cut is None:
        return edges
    scale, unscale = (np.log, np.exp) if log else (np.asarray, np.asarray)
    width = (scale(edges[-1]) - scale(edges[0])) / (len(edges) - 1)
    near = np.abs(scale(edges) - scale(cut)) < width / 2
    edges = np.union1d(edges[~near], [cut])
    if near[0]:  # the axis still reaches the lowest score
        edges = np.concatenate([unscale([scale(cut) - width]), edges])
    if near[-1]:  # and the flagged bar at the top is a bin wide
        edges = np.concatenate([edges, unscale([scale(cut) + width])])
    return edges


def _composition(
    det: Any, samples: Any, trained: np.ndarray, never_said: str
) -> list[tuple[str, str]]:
    """The flagged set's make-up against the ground truth; ``trained``: bool ``[N]``, the
    samples the run trained on; ``never_said``: how the others were missed."""
    n = det.scores.numel()
    flagged = det.flagged.cpu().numpy()
    mis = samples.mislabeled if samples.mislabeled is not None else np.zeros(n, bool)
    dup = samples.duplicate if samples.duplicate is not None else np.zeros(n, bool)
    bad = mis | dup
    k = int(flagged.sum())
    rows = [("flagged", str(k))]
    if samples.mislabeled is not None:
        rows.append(("flipped labels among them", str(int((flagged & mis).sum()))))
    if samples.duplicate is not None:
        rows.append(("conflicting-label duplicates", str(int((flagged & dup).sum()))))
    rows.append(("clean samples", str(int((flagged & ~bad).sum()))))
    rows.append(
        ("precision (corrupted / flagged)", f"{(flagged & bad).sum() / k:.3f}" if k else "n/a")
    )
    # of the corrupted samples the detection ranks: the others cannot be flagged (recall
    # 0.455 of all 22 read as a miss of 12 the rule never saw; held-out samples an eval
    # pass scored have a finite final_loss, yet the rule leaves them out too)
    ranked = np.zeros(n, bool)
    ranked[det.ranked.cpu().numpy()] = True
    total = int((bad & ranked).sum())
    never_mask = bad & ~ranked & ~trained
    never = int(never_mask.sum())
    # trained on but without this score (an eval pass over a subset, --score eval_csl):
    # they were called never presented
    unscored = int((bad & ~ranked & trained).sum())
    if unscored:
        what = f"of the {total} corrupted that {det.score_name} scores"
    elif never:
        what = f"of the {total} corrupted the run trained on"
    else:
        what = f"of all {total} corrupted"
    rows.append(
        (
            f"recall ({what})",
            f"{(flagged & bad).sum() / total:.3f}" if total else "n/a",
        )
    )
    if unscored:
        rows.append(
            (
                f"corrupted samples trained on that {det.score_name} does not score (not flagged)",
                str(unscored),
            )
        )
    if never:
        rows.append((f"corrupted samples {never_said} ({_never_why(det, never_mask)})", str(never)))
    return rows


def _never_why(det: Any, never: np.ndarray) -> str:
    """Why the ``never`` presented corrupted samples are not flagged: an eval pass may have
    scored them (held out), but the rule ranks only the samples the run trained on."""
    scored = np.isfinite(det.scores.detach().cpu().double().numpy())[never]
    if not scored.any():
        return "no score, not flagged"
    if scored.all():
        return "held out, scored by an eval pass: not ranked, not flagged"
    return (
        f"{int(scored.sum())} held out, scored by an eval pass, the rest with no score: not flagged"
    )


def composition_section(tracker: Any, samples: Any, det: Any) -> str:
    """The HTML of what the flagged set of ``det`` is made of (any run, a loss-only one's
    tail rule too), against the ground truth in ``samples``."""
    from .cleaning import NO_SUPERVISED_TOKEN, presented

    heading = "<h2>What the flagged set is made of</h2>"
    if samples is None or not samples.has_truth:
        return heading + "<p class=cap>Needs the ground truth (mislabeled/duplicate masks).</p>"
    # a tracker of sequences counts supervised tokens: a sequence whose every token was
    # ignore_index is not told apart from one never presented
    never_said = NO_SUPERVISED_TOKEN if tracker.sequences else "never presented"
    return heading + _table(_composition(det, samples, presented(tracker).numpy(), never_said))


def _suggestion_rows(
    tracker: Any, det: Any, samples: Any, inputs: Any = None, labels: Any = None
) -> list[tuple[str, str]]:
    from .cleaning import (
        DEFAULT_MIN_CONFIDENCE,
        RelabelWarning,
        clean,
        evaluate_plan,
        presented,
    )

    # the policy csl-fast clean takes by default (drop when two classes are in use, the
    # conflicting groups resolved; the caption says why): clean's own default, which
    # reads the classes in use det recorded from the labels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RelabelWarning)
        plan = clean(
            tracker,
            detection=det,
            score=det.score_name,
            inputs=inputs,
            labels=labels,
        )
    # with duplicates the plan also holds the conflicting groups the score did not flag:
    # "flagged samples 142" sat under "flagged 123" with nothing to tell them apart
    what = (
        "flagged samples"
        if plan.duplicates is None
        else f"samples in the plan (flagged by {det.score_name}, or in a conflicting group)"
    )
    # a conflicting group's relabel is decided by the group label's share, not by the
    # member's suggestion: counted apart, the first row said what it means
    by_group = int((plan.relabel & plan.grouped).sum())
    rows = [
        (what, str(len(plan))),
        (
            f"relabel (suggestion confidence >= {DEFAULT_MIN_CONFIDENCE:g})",
            str(plan.num_relabeled - by_group),
        ),
    ]
    if plan.duplicates is not None:
        rows.append(("relabel to the label of its conflicting duplicate group", str(by_group)))
    # (every drop was put down to the suggestion: a conflicting group without a label or
    # with too small a share, or a member never trained on, is dropped for that)
    why = {k: int(v.sum()) for k, v in plan.drop_reasons().items()}
    drop_why = "policy drop" if plan.policy == "drop" else "no confident suggestion"
    rows.append((f"drop ({drop_why})", str(why["suggestion"])))
    if plan.duplicates is not None:
        rows.append(
            ("drop (its conflicting duplicate group has no label)", str(why["group without label"]))
        )
        rows.append(
            (
                f"drop (its group label's share is under {plan.min_confidence:g})",
                str(why["group share"]),
            )
        )
    if why["unseen"]:
        rows.append((f"drop ({plan.unseen}: nothing to relabel by)", str(why["unseen"])))
    if plan.duplicates is not None:
        rows.append(
            (
                "keep (the conflicting duplicate whose label the network preferred)",
                str(plan.num_kept),
            )
        )
    truth = samples.true_labels if samples is not None else None
    if truth is None:
        return rows
    ev = evaluate_plan(
        plan,
        truth,
        samples.mislabeled,
        samples.duplicate,
    )
    if plan.num_relabeled:
        rows.append(
            (
                "relabels that give the true label",
                f"{ev['relabel_correct']} ({ev['relabel_correct'] / plan.num_relabeled:.1%})",
            )
        )
    # (the flipped samples the run trained on: a never-presented one has no suggestion)
    seen = presented(tracker).numpy()
    mis = None if samples.mislabeled is None else samples.mislabeled & seen
    if mis is not None and mis.any():
        label = tracker._suggestions()[0].cpu().numpy()  # (labels only: no confidence warning)
        right = int((label[mis] == truth[mis]).sum())
        whose = "all" if mis.sum() == samples.mislabeled.sum() else "presented"
        rows.append(
            (
                f"flipped samples whose suggestion is the true label ({whose} {int(mis.sum())})",
                f"{right} ({right / mis.sum():.1%})",
            )
        )
    return rows


def _table(rows: list[tuple[str, str]]) -> str:
    e = html.escape
    body = "".join(f"<tr><td class=l>{e(a)}</td><td>{e(b)}</td></tr>" for a, b in rows)
    return f"<table>{body}</table>"


def sections(
    tracker: Any,
    samples: Any,
    score: str,
    out_dir: str,
    det: Any,
    inputs: Any = None,
    labels: Any = None,
) -> str:
    """The HTML of the flagged-set, composition and suggestion sections of ``det``
    (``csl_fast.detect.mislabeled(tracker, score)``, made with its warning silenced: it
    is shown in the section itself); writes ``flagging.png`` into ``out_dir``. With
    ``inputs`` (and ``labels``) the suggestion section's plan also covers the conflicting
    duplicates (:mod:`csl_fast.report_duplicates` has their own section)."""
    from .cleaning import no_suggestions
    from .detect import DetectionWarning, count_phrase

    e = html.escape
    if det.warning is not None:
        # said once outside the page too: `csl-fast report` printed only "wrote report.html"
        # for a run whose flagged set came back empty
        warnings.warn(det.warning, DetectionWarning, stacklevel=3)
    png = os.path.join(out_dir, "flagging.png")
    b64 = _fig_flagging(det, png)
    parts = [
        f"<h2>Flagged set: {e(score)} and the no-ground-truth rule</h2>",
        f"<img alt='flagged set' src='data:image/png;base64,{b64}'>",
    ]
    # "threshold inf" read as a number the rule computed; it is the rule declining to cut
    cut = f"threshold {det.threshold:.4g}" if math.isfinite(det.threshold) else "no threshold"
    cap = f"Rule: {det.rule}; {cut}; {len(det)} flagged."
    estimate = count_phrase(det)
    if estimate is not None:
        cap += f" {estimate[0].upper()}{estimate[1:]}."
    parts.append(f"<p class=cap>{e(cap)} (<code>flagging.png</code>)</p>")
    if det.warning:
        parts.append(f"<p class=cap><b>Warning:</b> {e(det.warning)}</p>")
        if det.diagnostics.get("held_out"):  # (the note, which the warning replaces, says it)
            parts.append(f"<p class=cap><b>Note:</b> {e(det.diagnostics['held_out'])}</p>")
    elif det.diagnostics.get("note"):
        parts.append(f"<p class=cap><b>Note:</b> {e(det.diagnostics['note'])}</p>")
    parts.append(composition_section(tracker, samples, det))
    parts.append("<h2>Suggested labels</h2>")
    missing = no_suggestions(tracker)
    if missing is not None:
        parts.append(
            f"<p class=cap>None: {e(missing)}. <code>csl_fast.clean(..., policy='drop')</code> "
            "(<code>csl-fast clean</code>) drops every flagged sample.</p>"
        )
        return "".join(parts)
    parts.append(_table(_suggestion_rows(tracker, det, samples, inputs, labels)))
    from .cleaning import binary_policy

    given = labels if labels is not None else getattr(samples, "labels", None)
    _, binary = binary_policy(tracker, None, given, det)
    if binary is not None:
        parts.append(
            "<p class=cap>What <code>csl_fast.clean</code> (<code>csl-fast clean</code>) does "
            "with the flagged set by default on this run: drop every flagged sample (a "
            "conflicting duplicate group is still resolved: its preferred member kept, the "
            "others relabelled to its label). Two "
            "classes are in use, so every flagged sample's suggestion is the other class, "
            "confidently: a relabel is right only as often as the flagged sample is really "
            "mislabeled, and a clean sample flagged by mistake would get a wrong label. "
            "<code>policy='relabel-confident'</code> (<code>--policy relabel-confident</code>) "
            "relabels anyway, with a warning.</p>"
        )
        return "".join(parts)
    parts.append(
        "<p class=cap>What <code>csl_fast.clean</code> (<code>csl-fast clean</code>) does with "
        "the flagged set by default: relabel a sample to its suggested label, the class the "
        "model predicted most often while it disagreed with the given label, when confident "
        "(<code>tracker.suggestions()</code>); drop it otherwise.</p>"
    )
    return "".join(parts)
