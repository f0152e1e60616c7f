r"""The report's section on groups of identical inputs, for
:func:`csl_fast.report.write_report` when the run's inputs are given
(``write_report(..., inputs=)``, ``csl-fast report RUN --inputs FILE``, or the ``inputs``
of ``samples.npz``).

``Duplicate groups``
    how many groups of identical inputs the training set holds and how many samples are
    in them, how many groups carry conflicting labels (with the labels), what
    :func:`csl_fast.detect.duplicates` flags and, with the ground truth of
    ``samples.npz``, how many of the flagged samples are injected duplicates (precision
    and recall); then what :func:`csl_fast.clean` does with the conflicting groups (the
    member whose label the network preferred kept, :mod:`csl_fast.cleaning_groups`), and
    the first flagged groups with their labels.
"""

from __future__ import annotations

import html
import math
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["section"]

#: Flagged groups listed in the section's table.
SHOWN_GROUPS = 12


def _rows(det: Any, samples: Any, ids: torch.Tensor) -> list[tuple[str, str]]:
    from . import duplicate_groups as dg

    members = int((ids >= 0).sum())
    rows = [
        ("groups of identical inputs", str(dg.num_groups(ids))),
        ("samples in them", str(members)),
    ]
    if "conflicting_groups" in det.diagnostics:
        rows.append(("groups with conflicting labels", str(det.diagnostics["conflicting_groups"])))
    flagged = det.flagged.cpu().numpy()
    rows.append(
        (f"flagged (rule {det.rule})", f"{int(flagged.sum())} samples in {len(det.groups)} groups")
    )
    dup = None if samples is None else samples.duplicate
    if dup is not None and len(dup) == flagged.size:
        k, total = int(flagged.sum()), int(dup.sum())
        hit = int((flagged & dup).sum())
        rows.append(("injected duplicates among them (ground truth)", f"{hit} of {total}"))
        rows.append(("precision", f"{hit / k:.3f}" if k else "n/a"))
        rows.append(("recall", f"{hit / total:.3f}" if total else "n/a"))
    return rows


def _groups_table(det: Any, labels: Any, plan: Any, samples: Any) -> str:
    from .duplicate_groups import label_text

    e = html.escape
    action = {}
    if plan is not None:
        for i, a, lab, conf, grouped in zip(
            plan.index.tolist(),
            plan.actions,
            plan.suggested_label.tolist(),
            plan.confidence.tolist(),
            plan.grouped.tolist(),
            strict=True,
        ):
            # (a group with one label measured decides nothing: its rows are its members'
            # own, no group label)
            if grouped:
                action[i] = (a, lab, conf)
    head = "<tr><th>members</th><th>given labels</th><th>clean: group label (share)</th>"
    truth = samples is not None and samples.true_labels is not None
    head += "<th>true labels</th></tr>" if truth else "</tr>"
    body = []
    for g in det.groups[:SHOWN_GROUPS]:
        given = "-"
        if labels is not None:
            given = ", ".join(label_text(labels[i]) for i in g)
        decided = [action[i] for i in g if i in action]
        if decided and decided[0][1] >= 0:
            _, lab, conf = decided[0]
            verdict = f"{lab} ({conf:.2f})" if math.isfinite(conf) else str(lab)
            verdict += ": " + ", ".join(f"{i} {action[i][0]}" for i in g if i in action)
        else:
            verdict = "-"
        row = f"<tr><td>{e(', '.join(map(str, g)))}</td><td>{e(given)}</td><td>{e(verdict)}</td>"
        if truth:
            row += f"<td>{e(', '.join(str(int(samples.true_labels[i])) for i in g))}</td>"
        body.append(row + "</tr>")
    more = len(det.groups) - SHOWN_GROUPS
    tail = f"<p class=cap>... and {more} more flagged groups.</p>" if more > 0 else ""
    return f"<table>{head}{''.join(body)}</table>{tail}"


def section(
    tracker: Any, samples: Any, inputs: torch.Tensor, labels: torch.Tensor | None, score: str
) -> str:
    """The HTML of the ``Duplicate groups`` section (module doc)."""
    from . import duplicate_groups as dg
    from .cleaning import RelabelWarning, clean, no_suggestions
    from .detect import DetectionWarning, duplicates
    from .report_cleaning import _table

    e = html.escape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DetectionWarning)  # the flagged-set section shows it
        det = duplicates(tracker, score, inputs=inputs, labels=labels)
        plan = None
        # (a run without suggested labels, of sequences, takes no relabelling policy)
        why_drop = no_suggestions(tracker)
        if labels is not None and det.groups:
            # (None: clean's default; on two classes in use it drops the flagged samples
            # but still resolves the groups, as the note says)
            policy = "drop" if why_drop is not None else None
            warnings.simplefilter("ignore", RelabelWarning)
            plan = clean(
                tracker, detection=det, policy=policy, score=score, inputs=inputs, labels=labels
            )
    ids = dg.group_ids(inputs)
    rows = _rows(det, samples, ids)
    if plan is not None:
        kept = plan.kept.numpy()
        lab = plan.suggested_label.numpy()
        truth = None if samples is None else samples.true_labels
        keep_text = str(int(kept.sum()))
        if truth is not None:
            right = int((lab[kept] == np.asarray(truth)[plan.index.numpy()[kept]]).sum())
            keep_text += f" ({right} hold the true label)"
        if not plan.groups_resolved:
            # (the rows below said "kept ... preferred: 0" and "dropped (the group has no
            # label)" of members dropped because no member can be relabelled)
            rows.append(("csl_fast.clean: dropped (policy drop)", str(plan.num_dropped)))
        else:
            rows.append(("csl_fast.clean: kept (the label the network preferred)", keep_text))
            by_group = int((plan.relabel & plan.grouped).sum())
            rows.append(("csl_fast.clean: relabelled to the group label", str(by_group)))
            own = int((~plan.grouped).sum())
            if own:
                rows.append(
                    (
                        "csl_fast.clean: left to the per-sample plan (a group with one "
                        "label measured)",
                        str(own),
                    )
                )
            # (every drop was said to have no group label, though most had one)
            why = {k: int(v.sum()) for k, v in plan.drop_reasons().items()}
            rows.append(
                (
                    "csl_fast.clean: dropped (the group has no label)",
                    str(why["group without label"]),
                )
            )
            rows.append(
                (
                    f"csl_fast.clean: dropped (the group label's share is under "
                    f"{plan.min_confidence:g})",
                    str(why["group share"]),
                )
            )
            for key, said in (("suggestion", "no confident suggestion"), ("unseen", plan.unseen)):
                if why[key]:
                    rows.append((f"csl_fast.clean: dropped ({said})", str(why[key])))
    parts = ["<h2>Duplicate groups (identical inputs)</h2>", _table(rows)]
    if labels is None:
        note = (
            "No labels given: a group is flagged whole when the score rule flags one of its "
            "members; give the labels (samples.npz or --labels; a run of sequences or a "
            "multi-label run's targets with --labels) to flag every conflict exactly."
        )
    elif why_drop is not None:
        note = (
            "A group whose members carry different labels is flagged whole: at most one of its "
            f"labels is right. Here csl_fast.clean drops every member of such a group: {why_drop}"
            ", so it has no suggested labels to relabel by (policy drop; under --policy review "
            "the members whose targets agree with the best-fitted member's are kept). Groups "
            "whose members share a label are never flagged for being duplicated."
        )
    else:
        note = (
            "A group whose members carry different labels is flagged whole: at most one of its "
            "labels is right. csl_fast.clean keeps the member whose label the network gave the "
            "most probability to on average (the lowest mean loss) and relabels the others to "
            "it (--policy drop: drops them all), also where two classes are in use and the "
            "flagged samples' relabels are dropped: each such group surely holds a wrong "
            "label; groups "
            "whose members share a label are never flagged for being duplicated."
        )
    parts.append(f"<p class=cap>{e(note)}</p>")
    if det.groups:
        parts.append(_groups_table(det, labels, plan, samples))
    return "".join(parts)
