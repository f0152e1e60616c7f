"""The relations between a tracker state's buffers that every tracker keeps, checked on
load (:func:`csl_fast.tracker_state.validate_state`): a hand-edited or damaged state whose
buffers disagree (or a :meth:`~csl_fast.CSLTracker.state_dict` saved while another thread
recorded into its live tensors, where the step it caught half written breaks one) is
refused by field and sample instead of giving wrong scores.

Only relations that hold by construction are checked, for every way a tracker is fed
(:func:`csl_fast.accumulate` with class indices, soft targets, label smoothing, weights,
``ignore_index`` and sequences; :func:`csl_fast.record_loss`; :func:`csl_fast.accumulate_bce`;
:func:`csl_fast.score_epoch`; input-gradient records) and combined
(:func:`csl_fast.merge`; :func:`csl_fast.distributed.sync`):

- A buffer is written only at a *valid* presentation, which adds 1 (a sequence: its
  number of valid tokens, at least 1) to its count, and invalid rows hold zeros; so where
  a count is 0 the buffers it counts for are still at their initial value.
- ``learned_epoch`` is set (>= 0) exactly when ``last_correct`` is, and a merge or sync
  sets both from the same presentation (or run).
- Each forgetting event needs a correct presentation before an incorrect one, and
  ``last_correct`` a final correct one: ``forgetting + last_correct <= csl_count`` (the
  tight single-run bound ``2 * forgetting + last_correct`` is not kept by a sync that
  cannot place a rank's first presentation; it is off by at most one event per rank, each
  with two presentations of its own).
- The suggested-label vote (:func:`csl_fast.reference.vote_step`, merged by
  :func:`csl_fast.merge`): no candidate (-1) exactly when no hit, ``votes <= hits`` and
  every hit a presentation.
- A per-epoch (per-eval-pass) count is part of its total; a history row is finite only
  for a sample presented (scored, input-gradient recorded) in that epoch, so a sample has
  no more finite rows than presentations in closed epochs.

Sums are not compared with each other: their float rounding (and a sync's
``base + sum of deltas``, where a sum that reached inf becomes NaN) does not keep such
inequalities. Counts are compared only below ``2**24``, where every count a float32
tracker adds is exact (past it a float32 count stops growing by 1). Every check is a
few vectorised passes over ``[N]`` (one over each history), taken in chunks on the CPU
so that their temporaries stay small, and again in smaller chunks only where one fails,
to name the first bad sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

# Exact integers in float32: below this, a tracker's counts are its true counts.
_EXACT = 2.0**24

# count -> the buffers that stay at their initial value while it is 0.
_COUNTED = {
    "csl_count": (
        "csl_sum", "grad_norm_sum", "margin_sum", "p_true_sum", "p_true_sq_sum", "last_loss",
        "last_max_prob",
    ),
    "epoch_count": ("epoch_loss_sum",),
    "eval_count": ("eval_csl_sum", "eval_last_loss", "eval_last_max_prob", "eval_last_correct"),
    "eval_pass_count": ("eval_pass_loss_sum",),
    "input_grad_count": ("input_grad_sq_sum", "input_grad_norm_sum"),
    "epoch_input_grad_count": ("epoch_input_grad_sq_sum",),
}  # fmt: skip
# per-epoch (per-eval-pass) count -> its total; history -> (its total, per-epoch count).
_PARTS = {
    "epoch_count": "csl_count",
    "eval_pass_count": "eval_count",
    "epoch_input_grad_count": "input_grad_count",
}
HISTORY_ROWS = {
    "loss_history": ("csl_count", "epoch_count"),
    "eval_loss_history": ("eval_count", "eval_pass_count"),
    "input_grad_history": ("input_grad_count", "epoch_input_grad_count"),
}
# Samples a CPU pass takes at a time: the temporaries of a chunk (a few 256 KiB) stay in
# cache, where whole-[N] ones would be allocated, faulted in and written back per check.
_CHUNK = 1 << 16
# check_invariants' first pass takes up to this many chunks at a time, fewer where the
# histories' [rows, chunk] masks would pass this many cells (bounding its temporaries:
# ~16 MiB of masks, a few 4 MiB [chunk] ones).
_CHUNKS_PER_PASS = 16
_PASS_HISTORY_CELLS = 1 << 24
# What is compared: every [N] buffer (not the [N, L] per-label CSL).
_ONE_PER_SAMPLE = frozenset(
    {*_COUNTED, *(n for names in _COUNTED.values() for n in names), "last_correct",
     "learned_epoch", "forgetting", "suggest_label", "suggest_votes", "suggest_hits"}
)  # fmt: skip
# A torch.save of state_dict()'s live tensors while another thread records catches a step
# half written; save() holds the tracker's lock.
_DAMAGED = (
    "no tracker holds that: the state was edited or damaged (restore it from a copy), or "
    "taken with state_dict() while another thread was recording into the tracker (its "
    "tensors are live: use tracker.save(), which holds the tracker's lock, for a consistent "
    "copy)"
)


def _any(mask: torch.Tensor) -> bool:
    # As bytes: torch's any() of a bool tensor is an order of magnitude slower on the CPU.
    return bool(mask.contiguous().view(torch.uint8).any())


def _refuse(bad: torch.Tensor, what: Callable[[int], str]) -> None:
    """Raise naming the first sample where ``bad`` (``[n]`` bool) holds: ``what(i)``
    describes local sample ``i``."""
    if _any(bad):
        from .tracker_state import TrackerStateError

        raise TrackerStateError(f"{what(int(bad.nonzero()[0, 0]))}; {_DAMAGED}")


def sample_chunks(t: torch.Tensor, chunk: int | None = None) -> Iterator[tuple[int, slice]]:
    """``(first sample, slice)`` of the chunks a check of the ``[N, ...]`` tensor ``t``
    takes at a time: ``chunk`` (default :data:`_CHUNK`) samples on the CPU, all at once
    elsewhere."""
    n = t.shape[0]
    step = (chunk or _CHUNK) if t.device.type == "cpu" else max(n, 1)
    for start in range(0, n, step):
        yield start, slice(start, start + step)


def check_invariants(
    buffers: Mapping[str, torch.Tensor],
    histories: Mapping[str, torch.Tensor],
    input_grad_first_epoch: int,
) -> None:
    """Refuse a state (its ``[N]`` buffers by name, each already checked alone, some
    absent in older format versions, and its ``[rows, N]`` histories) whose buffers
    disagree. Raises :class:`~csl_fast.tracker_state.TrackerStateError` naming the
    field and the sample."""
    from .tracker_state import TrackerStateError

    dev = buffers["csl_count"].device  # (a state may mix devices; no copy when it does not)
    b = {k: v.to(dev) for k, v in buffers.items() if k in _ONE_PER_SAMPLE}
    histories = {k: h.to(dev) for k, h in histories.items()}
    if b["csl_count"].shape[0] == 0:
        return
    # Whole-buffer reductions first (no temporaries): a count that is nowhere 0 needs no
    # per-sample test of what it counts, one that is 0 everywhere (a record never made)
    # only a test of each buffer, and counts below 2**24 no inf substitute.
    masked = []
    for count, names in _COUNTED.items():
        if count not in b or bool(b[count].min() > 0):
            continue
        if b[count].any():
            masked.append(count)
            continue
        for n in names:
            if n in b and b[n].any():
                _refuse(b[n] != 0, lambda i, n=n, count=count: _unseen(b, n, count, i))
    if input_grad_first_epoch < 0 and b["input_grad_count"].any():
        _refuse(
            b["input_grad_count"] != 0,
            lambda i: (
                f"state buffer 'input_grad_count' holds {b['input_grad_count'][i].item()!r} at "
                f"sample {i} but input_grad_first_epoch is -1 (no record yet)"
            ),
        )
    inexact = {k for k in _PARTS.values() if k in b and bool(b[k].max() >= _EXACT)}
    parts = [k for k in _PARTS if k in b and b[k].any()]  # (0 after end_epoch: nothing to do)
    # Passes over large chunks first (few parallel regions: on busy CPUs each costs far
    # more than its work); only a large chunk that fails is walked again a chunk of
    # samples at a time, which names the sample (and field) the walk always named: the
    # first failing check of the first failing chunk of _CHUNK samples.
    rows = sum(h.shape[0] for h in histories.values())
    big = _CHUNK * max(1, min(_CHUNKS_PER_PASS, _PASS_HISTORY_CELLS // (_CHUNK * max(rows, 1))))
    for first, whole in sample_chunks(b["csl_count"], big):
        pass_b = {k: v[whole] for k, v in b.items()}
        pass_h = {k: h[:, whole] for k, h in histories.items()}
        try:
            _check_chunk(pass_b, pass_h, masked, parts, inexact, first)
        except TrackerStateError:
            for start, part in sample_chunks(pass_b["csl_count"]):
                _check_chunk(
                    {k: v[part] for k, v in pass_b.items()},
                    {k: h[:, part] for k, h in pass_h.items()},
                    masked,
                    parts,
                    inexact,
                    first + start,
                )
            raise  # (unreached: a sample the pass refused is in one of its chunks)


def _unseen(b: Mapping[str, torch.Tensor], name: str, count: str, i: int, start: int = 0) -> str:
    return (
        f"state buffer {name!r} holds {b[name][i].item()!r} at sample {start + i}, whose "
        f"{count} is 0; a tracker writes {name} only with what it counts"
    )


def _check_chunk(
    b: Mapping[str, torch.Tensor],
    histories: Mapping[str, torch.Tensor],
    masked: list[str],
    parts: list[str],
    inexact: set[str],
    start: int,
) -> None:
    """:func:`check_invariants` on samples ``start, start + 1, ...``: the zero tests of
    the ``masked`` counts, the comparisons of the per-epoch counts ``parts`` with their
    totals (``inexact``: totals with a count of 2**24 or more somewhere), and the rest."""

    def v(t: torch.Tensor, i: int) -> object:
        return t[i].item()

    def limit(name: str) -> torch.Tensor:
        # The count as float32 where it is exact (integral counts were checked), else inf:
        # an integer compared with it in float32 is then exact too (one of 2**24 or more
        # rounds to 2**24 or more).
        c = b[name].to(torch.float32)
        return torch.where(c < _EXACT, c, torch.inf) if name in inexact else c

    for count in masked:
        unseen = b[count] == 0
        if not _any(unseen):
            continue
        for n in _COUNTED[count]:
            if n in b:
                _refuse(
                    (b[n] != 0) & unseen,
                    lambda i, n=n, count=count: _unseen(b, n, count, i, start),
                )
    for part in parts:
        total = _PARTS[part]
        _refuse(
            b[part] > limit(total),
            lambda i, part=part, total=total: (
                f"state buffer {part!r} holds {v(b[part], i)!r} at sample {start + i}, more "
                f"than its {total} {v(b[total], i)!r}, which includes it"
            ),
        )

    correct, forgetting = b["last_correct"], b["forgetting"]
    _refuse(
        (b["learned_epoch"] >= 0) != correct,
        lambda i: (
            f"state buffer 'learned_epoch' holds {v(b['learned_epoch'], i)} at sample "
            f"{start + i} where 'last_correct' is {v(correct, i)}; a tracker sets the learned "
            "epoch (>= 0) exactly while the last presentation is correct (-1 otherwise)"
        ),
    )
    lim = limit("csl_count")
    _refuse(
        torch.where(correct, forgetting >= lim, forgetting > lim),  # forgetting + correct > lim
        lambda i: (
            f"state buffer 'forgetting' holds {v(forgetting, i)} at sample {start + i} with "
            f"last_correct={v(correct, i)} and csl_count {v(b['csl_count'], i)!r}; each "
            "forgetting event, and a correct last presentation, needs a presentation of its "
            "own (forgetting + last_correct <= csl_count)"
        ),
    )
    if "suggest_label" in b:  # (version 1 states have no vote)
        label, votes, hits = b["suggest_label"], b["suggest_votes"], b["suggest_hits"]
        _refuse(
            (label < 0) != (hits == 0),
            lambda i: (
                f"state buffer 'suggest_hits' holds {v(hits, i)} at sample {start + i} where "
                f"'suggest_label' is {v(label, i)}; the vote has hits exactly when it has a "
                "candidate (label >= 0)"
            ),
        )
        _refuse(
            votes > hits,
            lambda i: (
                f"state buffer 'suggest_votes' holds {v(votes, i)} at sample {start + i}, more "
                f"than its suggest_hits {v(hits, i)} (every vote is a hit)"
            ),
        )
        _refuse(
            hits > lim,
            lambda i: (
                f"state buffer 'suggest_hits' holds {v(hits, i)} at sample {start + i}, more "
                f"than its csl_count {v(b['csl_count'], i)!r} (every hit is a presentation)"
            ),
        )
    for name, (total, part) in HISTORY_ROWS.items():
        h = histories[name]
        if h.shape[0] == 0 or part not in b:
            continue
        rows = (~h.isnan()).sum(0, dtype=torch.int32)
        _refuse(
            rows > limit(total) - b[part],
            lambda i, name=name, total=total, part=part, rows=rows: (
                f"state history {name!r} has {int(rows[i])} rows holding a value (not NaN) at "
                f"sample {start + i}, more than the {v(b[total], i)!r} {total} less "
                f"{v(b[part], i)!r} {part} of the epochs in it; a row holds a value only for "
                "a sample recorded in its epoch"
            ),
        )
