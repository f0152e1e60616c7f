"""``csl_fast.merge``: one tracker from the trackers of several runs (seeds, folds, restarts).

Users rank samples over several seeds: merge the seeds' trackers, then score the merged one
exactly like a single run's.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import tracker_file
from ._args import device as device_arg
from .bits import as_bits
from .buffer_locks import buffer_lock
from .distributed import state_checksum
from .scores import has_logit_stats
from .tracker import CSLTracker, TrackerStateError
from .tracker_invariants import HISTORY_ROWS

__all__ = ["merge"]


def merge(
    trackers: Sequence[CSLTracker | str | os.PathLike | Mapping[str, Any]],
    *,
    device: torch.device | str | None = None,
) -> CSLTracker:
    r"""Combine the trackers of several runs over the **same** ``N`` samples.

    Args:
        trackers: :class:`CSLTracker` objects, tracker files (:meth:`CSLTracker.save`) or
            :meth:`CSLTracker.state_dict` outputs; at least one. They are not modified. A
            tracker is copied under its lock, one at a time, so that a run another thread
            is recording into is merged as it stood between two steps. Every input is
            held as such a copy (a file: loaded) until the merge returns: it takes the
            memory of its inputs, of the merged tracker and of about one to two trackers
            more of temporaries (peak growth merging two in-memory trackers of 1M
            samples: ~5 times one tracker; eight: ~12 times).
        device: where the merged tracker lives (default: the first tracker's device; CPU
            for files and state dicts).

    Returns:
        A new :class:`CSLTracker` (float64 if any input is float64; ``history=True`` only if
        every input has it) in which, per sample:

        - every sum and count (``csl_sum``, ``csl_count``, ``margin_sum``, ``p_true_sum``,
          the input-gradient and eval-pass sums, ...) is the **sum over runs**, so ``csl``
          is the CSL summed over runs and every mean (``csl_mean``, ``aum``,
          ``confidence``, ``variability``, ``loss_sensitivity``, ``eval_csl_mean``, ...) is
          the mean over all runs' presentations pooled;
        - the per-label sums (``label_csl`` and ``label_prob``, trackers with
          ``num_labels``) are sums over runs too;
        - ``forgetting`` is the total number of forgetting events over runs, plus one for
          each run that ended with the sample correct where the merged ``last_correct``
          (below) is False, so that a sample any run classified correctly stays one that
          was learned (:attr:`~CSLTracker.ever_correct`);
        - ``last_loss`` / ``last_max_prob`` (and the ``eval_last_*`` values) are the means
          over the runs that presented (scored) the sample; 0 where none did;
        - ``last_correct`` (``eval_last_correct``) is True when the sample was correct at its
          last presentation in **every** run that presented it, and ``learned_epoch`` is then
          the latest of the runs' learned epochs (the epoch by which every run had begun its
          final correct streak), else -1;
        - the suggested-label vote (``suggest_label``, ``suggest_votes``,
          ``suggest_hits``; :meth:`CSLTracker.suggestions`) merges the runs' Boyer-Moore
          states in run order, as a majority vote's summaries merge: equal candidates add
          votes and hits; else the one with more votes stays with the difference (the
          earlier run's on a tie), and a run without a candidate changes nothing. A class
          predicted at more than half of all runs' voting (misclassified) presentations is
          still the suggestion. Its confidence (hits over the presentations before the
          label was fitted) is approximate: that count is estimated from the pooled
          ``csl_count`` and the merged ``learned_epoch`` and ``epoch``;
        - ``runs`` is the sum of the inputs' :attr:`~CSLTracker.runs`, and an input that is
          itself a merge counts as that many runs in the means above and in ``forgetting``,
          so that merging a new seed into an earlier merge equals merging every seed at
          once. That holds where each of the merged input's runs presented the sample
          (seeds over the same data); for runs over different samples (the folds of a
          cross-validation), merge every run's own tracker in one call. The
          suggested-label vote is exact only where a class has the majority: with none
          (more than half of the voting presentations), the candidate left, and its
          votes and hits, depend on the order and grouping of the runs, as for any
          majority-vote summary (``merge([a, merge([b, c])])`` may suggest another label
          than ``merge([a, b, c])``);
        - ``epoch`` / ``eval_passes`` are the maxima over runs, ``input_grad_first_epoch``
          the earliest; history rows are averaged over the runs that have them, aligned by
          epoch (eval pass), ignoring NaN. A merge keeps no per-row count of its runs, so
          each row of a merged input is weighed by all its ``runs``: merging it again is
          exact only where each of its runs has the row's value. Where its runs had
          different lengths (or a run skipped a sample in an epoch) the rows some of them
          lack are over-weighted, and merge warns (``RuntimeWarning``) where the input's
          counts show it (fewer presentations, eval passes or input-gradient records of a
          sample than runs times its rows); merge every run's own tracker in one call for
          exact rows;
        - ``eval_pass_presentations`` is the runs' sum (a run's whole count total where
          it made no eval pass): the merge reads as trained after its last eval pass,
          and its ``final_loss`` comes from training, where any run was;
        - ``sequences`` is set when any run recorded sequences (runs that recorded one
          row per sample cannot be merged with them: the counts' units differ);
        - ``backend`` and ``deterministic`` are those of the :class:`CSLTracker` inputs
          where they all agree, else the defaults (files and state dicts do not hold them);
          the backend also falls back to ``"auto"`` when ``device`` is of another type
          than a tracker input's.

    Warns:
        RuntimeWarning: inputs that recorded anything hold identical states (every buffer
            bitwise equal, at the same epoch): the same file or tracker given twice, or the
            per-rank saves of a synced ``torch.distributed`` job, which each hold the
            whole job (load one of them). The merge goes ahead and counts that run once
            per copy. (It also warns of a merged input's history rows, above.)

    Raises:
        TrackerStateError: the trackers were built for different numbers of samples
            (or classes, or labels), some recorded sequences and others rows, some recorded
            losses only (:func:`csl_fast.record_loss`, :func:`csl_fast.accumulate_bce`) and
            others softmax statistics (:func:`~csl_fast.scores.has_logit_stats`; a run
            that presented nothing is of either kind), ``trackers`` is empty, or a merged
            int32 counter (``forgetting``, ``suggest_votes``, ``suggest_hits``) would pass
            2**31 - 1.
        TypeError: ``trackers`` is a single tracker, path or state dict instead of a
            sequence of them (``merge("run.csl")`` would otherwise read the string's
            characters as paths).
    """
    if isinstance(trackers, str | bytes | os.PathLike | Mapping | CSLTracker):
        raise TypeError(
            "csl_fast.merge: expected a list of trackers, tracker files or state dicts, got "
            f"a single {type(trackers).__name__} {trackers!r:.80}; pass a list, e.g. "
            "merge(['seed0.csl', 'seed1.csl'])"
        )
    try:
        trackers = list(trackers)
    except TypeError:  # (None: "'NoneType' object is not iterable")
        raise TypeError(
            "csl_fast.merge: expected a list of trackers, tracker files or state dicts, got "
            f"{type(trackers).__name__} {trackers!r:.80}; pass a list, e.g. "
            "merge(['seed0.csl', 'seed1.csl'])"
        ) from None
    if device is not None:  # (torch's "Expected one of cpu, cuda, ..." after the loads)
        device = device_arg("csl_fast.merge", device, "merge")
    on_meta = [
        i for i, t in enumerate(trackers) if isinstance(t, CSLTracker) and t.device.type == "meta"
    ]
    if on_meta:  # (the load's advice, "load it into a tracker on 'cpu'", named no merge)
        raise ValueError(
            f"csl_fast.merge: tracker {on_meta[0]} is on the meta device, which holds no "
            "values to merge"
        )
    runs = [_as_tracker(t) for t in trackers]
    if not runs:
        raise TrackerStateError("csl_fast.merge: got no trackers to merge")
    sizes = [t.num_samples for t in runs]
    if len(set(sizes)) != 1:
        raise TrackerStateError(
            f"csl_fast.merge: the trackers cover different numbers of samples N = {sizes}; "
            "only trackers of the same training set (same N, same index order) can be merged"
        )
    classes = {t.num_classes for t in runs} - {None}  # None: unknown, agrees with any
    labels = {t.num_labels for t in runs}
    for name, values in (("num_classes", classes), ("num_labels", labels)):
        if len(values) > 1:
            each = ", ".join(f"tracker {i}: {getattr(t, name)}" for i, t in enumerate(runs))
            raise TrackerStateError(f"csl_fast.merge: the trackers have different {name} ({each})")
    _refuse_mixed_kinds(runs)
    _warn_identical(runs)
    n = sizes[0]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in runs) else torch.float32
    history = all(t.history for t in runs)
    dev = torch.device(device) if device is not None else runs[0].device
    if dev.type == "meta":  # (Tensor.item() failed on it, from inside the merge)
        raise ValueError(
            "csl_fast.merge: cannot merge onto device 'meta': a meta tensor holds no data, so "
            "every merged value would be dropped; merge onto 'cpu' or a GPU"
        )
    out = CSLTracker(
        n,
        classes.pop() if classes else None,
        device=dev,
        dtype=dtype,
        history=history,
        num_labels=labels.pop(),
        **_settings([t for t in trackers if isinstance(t, CSLTracker)], dev),
    )

    def stack(name: str, dt: torch.dtype | None = None) -> torch.Tensor:
        return torch.stack([t.buffers()[name].to(dev, dt or dtype) for t in runs])

    # Each merged buffer goes into the new tracker's own as soon as it is made (one tracker
    # of memory, not two: the state loaded below holds those live buffers, and loading
    # copies each onto itself); one of another dtype or shape would stay as it is, for the
    # load to check and convert as before.
    live = out.buffers()
    buffers: dict[str, torch.Tensor] = {}

    def put(name: str, value: torch.Tensor) -> None:
        into = live[name]
        if (value.dtype, value.shape, value.device) == (into.dtype, into.shape, into.device):
            into.copy_(value)
            value = into
        buffers[name] = value

    for name in out.buffers():
        if name.endswith(("_sum", "_count")):
            put(name, stack(name).sum(0))
    # Integer sums, maxima and flags are exact in any order: folded run by run (no [R, N]
    # int64 temporaries). Float sums keep torch.stack(...).sum(0), one buffer at a time:
    # its accumulation order is torch's, which a left-to-right fold does not reproduce
    # bit for bit (from 5 runs on).
    forgetting = torch.zeros(n, dtype=torch.int64, device=dev)
    for t in runs:
        forgetting += t.buffers()["forgetting"].to(dev, torch.int64)
    # a merged input stands for its runs (each taken to have presented its samples): the
    # merge of a merge and a run equals the merge of all three runs
    weight = torch.tensor([t.runs for t in runs], device=dev)[:, None]  # [R, 1]
    for prefix, count in (("", "csl_count"), ("eval_", "eval_count")):
        seen = stack(count) > 0  # [R, N]
        runs_seen = torch.zeros(n, dtype=weight.dtype, device=dev)
        for i in range(len(runs)):
            runs_seen += torch.where(seen[i], weight[i], 0)
        alone = seen.sum(0) == 1  # one input saw it: its value as it is (x * 3 / 3 is
        # not always x, and merge([m]) of a merge m moved its last values by an ulp)
        for name in (prefix + "last_loss", prefix + "last_max_prob"):
            values = stack(name)
            total = torch.where(seen, values * weight, 0).sum(0)
            mean = torch.where(
                alone, torch.where(seen, values, 0).sum(0), total / runs_seen.clamp(min=1)
            )
            put(name, torch.where(runs_seen > 0, mean, 0))
        correct = stack(prefix + "last_correct", torch.bool)
        all_correct = (runs_seen > 0) & (correct | ~seen).all(0)
        put(prefix + "last_correct", all_correct)
        if not prefix:
            le = torch.full((n,), -1, dtype=torch.int32, device=dev)
            for i, t in enumerate(runs):
                run_le = t.buffers()["learned_epoch"].to(dev, torch.int32)
                le = torch.maximum(le, torch.where(seen[i], run_le, -1))
            put("learned_epoch", torch.where(all_correct, le, -1).to(torch.int32))
            # a run that ended correct, where the merged last state is not, forgot the
            # sample once more: without it a sample one run learned (and never forgot)
            # read as never learned (ever_correct False, the worst forgetting score)
            # (as many of a merged input's runs as its presentations leave room for: a
            # merge of 3 runs where one saw the sample added 3, which its count of 1
            # could not hold, and the result was refused as damaged)
            ended_correct = torch.zeros(n, dtype=torch.int64, device=dev)
            for i, t in enumerate(runs):
                b = t.buffers()
                room = b["csl_count"].to(dev, dtype) - b["forgetting"].to(dev, dtype)
                ended = torch.minimum(weight[i].to(room.dtype), room).to(torch.int64)
                ended_correct += torch.where(correct[i] & seen[i], ended, 0)
            forgetting += torch.where(all_correct, 0, ended_correct)
    put("forgetting", _int32("forgetting", forgetting))
    for name, value in _merge_votes(runs, dev).items():
        put(name, value)

    first = [t.input_grad_first_epoch for t in runs if t.input_grad_first_epoch >= 0]
    igfe = min(first) if first else -1
    # (offset of its row 0, input) for each history; loss rows only when all inputs keep them
    sources = {
        "loss_history": [(0, i) for i in range(len(runs)) if history],
        "eval_loss_history": [(0, i) for i in range(len(runs)) if history],
        "input_grad_history": [(t.input_grad_first_epoch - igfe, i) for i, t in enumerate(runs)],
    }
    _warn_rows_not_all_runs_had(runs, sources)
    histories = {
        name: _mean_rows([(o, runs[i].runs, getattr(runs[i], name)) for o, i in src], n, dev)
        for name, src in sources.items()
    }
    state = tracker_file.state_dict(out)
    state.update(
        buffers=buffers,
        histories=histories,
        epoch=max(t.epoch for t in runs),
        eval_passes=max(t.eval_passes for t in runs),
        eval_pass_presentations=_presentations_at_eval(runs),
        input_grad_first_epoch=igfe,
        sequences=any(t.sequences for t in runs),
        runs=sum(t.runs for t in runs),
    )
    out.load_state_dict(state)
    return out


def _presentations_at_eval(runs: list[CSLTracker]) -> float | None:
    """The merge's ``eval_pass_presentations``: the runs' summed as their counts are, a
    run's whole total standing in where it made no pass or its value is unknown, so that
    the merge reads as trained after its last eval pass where any run does (its
    final_loss then comes from training for every run: the eval values are one mean over
    the runs); None where no run knows."""
    if all(t.eval_pass_presentations is None for t in runs):
        return None
    return sum(
        t.presentations() if t.eval_pass_presentations is None else t.eval_pass_presentations
        for t in runs
    )


def _warn_identical(runs: list[CSLTracker]) -> None:
    """Warn where inputs that recorded anything hold the same state: one run merged twice
    doubles every sum and count, which no later check can tell from two runs."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(runs):
        if t.presentations() > 0 or bool(t.eval_count.any()):
            same = groups.setdefault((t.epoch, state_checksum(t)), [])
            # (a checksum match confirmed exactly)
            if not same or _same_buffers(runs[same[0]], t):
                same.append(i)
    repeats = [g for g in groups.values() if len(g) > 1]
    if repeats:
        each = "; ".join(
            f"inputs {', '.join(map(str, g[:-1]))} and {g[-1]} (one run, merged {len(g)} times)"
            for g in repeats
        )
        warnings.warn(
            f"csl_fast.merge: {each} hold identical states, so every sum, count and run "
            "of that run is counted once per copy. Probably the same file or tracker was "
            "given twice, or these are the per-rank saves of a synced torch.distributed job: "
            "after end_epoch() or sync() every rank holds the whole job, so load one of them "
            "(csl_fast.load(path)) instead of merging them. Merge distinct runs (seeds, "
            "folds) only",
            RuntimeWarning,
            stacklevel=3,
        )


def _same_buffers(a: CSLTracker, b: CSLTracker) -> bool:
    """Whether every buffer of ``a`` and ``b`` is bitwise equal (NaN included)."""
    mine, theirs = a.buffers(), b.buffers()
    return mine.keys() == theirs.keys() and all(
        v.dtype == theirs[k].dtype and torch.equal(as_bits(v), as_bits(theirs[k].to(v.device)))
        for k, v in mine.items()
    )


def _refuse_mixed_kinds(runs: list[CSLTracker]) -> None:
    """Refuse runs whose presentations are of different kinds: every merged mean divides
    by the pooled ``csl_count``, so each presentation must carry the same statistics."""
    # (rows an eval pass scored count too: a tracker of sequences refuses an eval pass)
    rows = [
        i
        for i, t in enumerate(runs)
        if not t.sequences and (bool(t.csl_count.any()) or bool(t.eval_count.any()))
    ]
    if rows and any(t.sequences for t in runs):
        # a sequence run counts tokens, a row run presentations: csl_mean and every other
        # mean would pool the two units, dominated by the tokens
        tokens = [i for i, t in enumerate(runs) if t.sequences]
        raise TrackerStateError(
            f"csl_fast.merge: trackers {tokens} recorded sequences (csl_count counts their "
            f"supervised tokens) and trackers {rows} one row per sample (it counts "
            "presentations): their means would pool tokens with presentations; merge runs "
            "of one kind"
        )
    softmax = [i for i, t in enumerate(runs) if has_logit_stats(t)]
    losses = [i for i, t in enumerate(runs) if bool(t.csl_count.any()) and i not in softmax]
    if softmax and losses:
        # a losses-only presentation has no margin, probability or correctness: it would
        # halve the softmax run's AUM and confidence, and its False last-correct would
        # read as the softmax run's samples forgotten
        raise TrackerStateError(
            f"csl_fast.merge: trackers {losses} recorded losses only (no softmax statistics: "
            f"csl_fast.record_loss, accumulate_bce or class-probability targets) and trackers "
            f"{softmax} recorded softmax statistics (csl_fast.accumulate with class indices): "
            "the margins, confidences, last-correct flags and forgetting would be pooled "
            "over presentations that have none; merge runs of one kind"
        )


def _settings(trackers: list[CSLTracker], dev: torch.device) -> dict[str, Any]:
    """The ``backend`` and ``deterministic`` settings the tracker inputs agree on; a
    setting they differ in is left at its default (files and state dicts hold neither).
    A backend chosen for another device type is dropped too: ``"cuda"`` cannot run on
    the CPU tracker of a merge onto ``device="cpu"``."""
    out = {}
    for name in ("backend", "deterministic"):
        values = {getattr(t, name) for t in trackers}
        if len(values) == 1:
            out[name] = values.pop()
    if any(t.device.type != dev.type for t in trackers):
        out.pop("backend", None)
    return out


def _as_tracker(t: CSLTracker | str | os.PathLike | Mapping[str, Any]) -> CSLTracker:
    if isinstance(t, CSLTracker):
        # a copy taken under its lock: read live while another thread recorded, the merge
        # held half a step (its sums ahead of its counts), or was refused as damaged
        with buffer_lock(t.csl_sum):
            return tracker_file.from_state(CSLTracker, tracker_file.state_dict(t), t.device)
    if isinstance(t, str | os.PathLike):
        return CSLTracker.from_file(t)
    if isinstance(t, Mapping):
        try:
            return tracker_file.from_state(CSLTracker, t)
        except TrackerStateError as exc:
            raise TrackerStateError(f"csl_fast.merge: {exc}") from None
    raise TypeError(
        "csl_fast.merge: expected CSLTrackers, tracker file paths or tracker state dicts, got "
        f"{type(t).__name__}"
    )


def _merge_votes(runs: list[CSLTracker], dev: torch.device) -> dict[str, torch.Tensor]:
    """The runs' suggested-label votes merged left to right (see :func:`merge`)."""
    names = ("suggest_label", "suggest_votes", "suggest_hits")
    # int64: sums of int32 counters past 2**31 - 1 would wrap (refused by _int32 below).
    label, votes, hits = (runs[0].buffers()[k].to(dev, torch.int64) for k in names)
    for t in runs[1:]:
        b_label, b_votes, b_hits = (t.buffers()[k].to(dev, torch.int64) for k in names)
        same = label == b_label
        take = (b_label >= 0) & ~same & ((label < 0) | (b_votes > votes))
        label = torch.where(take, b_label, label)
        # A run without a candidate has no votes: |votes - 0| keeps the other's.
        votes = torch.where(same, votes + b_votes, (votes - b_votes).abs())
        hits = torch.where(same, hits + b_hits, torch.where(take, b_hits, hits))
    return {k: _int32(k, v) for k, v in zip(names, (label, votes, hits), strict=True)}


def _int32(name: str, total: torch.Tensor) -> torch.Tensor:
    """The int64 merged counter ``total`` as the tracker's int32 buffer ``name``; refused
    where it does not fit (a cast would wrap it to a negative count)."""
    over = total > torch.iinfo(torch.int32).max
    if over.any():
        i = int(over.nonzero()[0, 0])
        raise TrackerStateError(
            f"csl_fast.merge: sample {i}'s merged {name} is {int(total[i])} (the sum over the "
            f"runs), past 2**31 - 1 = {torch.iinfo(torch.int32).max}, the most a tracker's "
            f"int32 {name} counter holds; merge fewer runs"
        )
    return total.to(torch.int32)


def _warn_rows_not_all_runs_had(
    runs: list[CSLTracker], sources: dict[str, list[tuple[int, int]]]
) -> None:
    """Warn where a merged input's history rows are weighed by more runs than had them.

    A merge keeps no per-row count of its runs, so :func:`_mean_rows` weighs each row of an
    input by all its ``runs``: exact only where every one of them had the row. Where a
    sample has fewer presentations (eval passes, input-gradient records) than ``runs``
    times its rows, some run lacked one of them, and beside another input's rows that row
    is over-weighted. (Counts that are high enough do not prove the opposite: a run may
    have presented a sample twice in one epoch and never in another.)"""
    short: dict[int, list[str]] = {}  # input -> its histories with rows some runs lack
    for name, (count, _) in HISTORY_ROWS.items():  # (its total count)
        with_rows = [i for _, i in sources[name] if getattr(runs[i], name).shape[0]]
        if len(with_rows) < 2:  # alone, its rows are its own values whatever their weight
            continue
        for i in with_rows:
            t = runs[i]
            rows = (~torch.isnan(getattr(t, name).float())).sum(0)  # [N] rows with a value
            if t.runs > 1 and bool((t.buffers()[count] < t.runs * rows).any()):
                short.setdefault(i, []).append(name)
    if short:
        each = "; ".join(
            f"tracker {i} ({runs[i].runs} runs: {', '.join(v)})" for i, v in short.items()
        )
        warnings.warn(
            f"csl_fast.merge: {each}: a merged input whose runs did not all "
            "have every history row (runs of different lengths, or samples a run skipped "
            "in an epoch; its counts hold fewer values than its runs times its rows). A "
            "merge keeps no per-row run count, so each of its rows is weighed by all its "
            "runs, over-weighting the rows some lacked; merge every run's own tracker in "
            "one call for exact history rows",
            RuntimeWarning,
            stacklevel=3,
        )


def _mean_rows(
    hists: list[tuple[int, int, torch.Tensor]], n: int, dev: torch.device
) -> torch.Tensor:
    """NaN-mean of ``[E_k, N]`` histories whose row 0 is row ``offset_k`` of the result,
    each weighed by its number of runs."""
    hists = [(o, w, h) for o, w, h in hists if h.shape[0]]
    if not hists:
        return torch.empty(0, n, dtype=torch.float32, device=dev)
    rows = max(o + h.shape[0] for o, _, h in hists)
    total = torch.zeros(rows, n, dtype=torch.float64, device=dev)
    count = torch.zeros(rows, n, dtype=torch.float64, device=dev)
    for o, w, h in hists:
        h = h.to(dev, torch.float64)
        ok = ~torch.isnan(h)
        total[o : o + h.shape[0]] += torch.where(ok, h * w, 0)
        count[o : o + h.shape[0]] += ok * w
    return torch.where(count > 0, total / count.clamp(min=1), float("nan")).float()
