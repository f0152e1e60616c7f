r"""``CSLTracker``: every per-sample training dynamic csl_fast keeps, in dataset-sized buffers.

One tracker holds, for each of the ``N`` training samples, the statistics that the fused
cross-entropy pass yields for free (CSL and its siblings, defined in the table below) plus
the input-gradient norms recorded from a backward hook and the eval-pass CSL. Pass the
tracker to :func:`csl_fast.accumulate` instead of a plain CSL tensor::

    tracker = csl_fast.CSLTracker(len(train_set), num_classes=10, device="cuda")
    for epoch in range(epochs):
        for x, y, idx in loader:
            x = tracker.watch(x, idx)  # optional: input-gradient norms
            loss = csl_fast.accumulate(model(x), y, idx, tracker)
            loss.backward(); opt.step(); opt.zero_grad()
        tracker.end_epoch()
        csl_fast.score_epoch(model, eval_loader, tracker)  # optional: eval-pass CSL
    tracker.save("run.csl")

Only *valid* presentations count: rows whose target is ``ignore_index`` or whose loss is
not finite (``Stat.VALID == 0``) change no buffer at all.

Duplicate indices within one batch (samplers that repeat samples) follow one rule: the
presentations of a batch are processed **in batch order**. Sums add every presentation;
last-value buffers keep the last valid occurrence in the batch; forgetting counts
correct -> incorrect transitions across successive presentations in batch order; the
threshold learning time is the epoch in which the final correct streak began; the
suggested-label vote takes one step per presentation. The rule is applied without host
synchronisation per step and bitwise reproducibly: one sequential C++ pass on the CPU; on a
GPU a stable sort by index, then one Triton pass in which each sample's run of
presentations is walked in batch order (with ``backend="cuda"`` or ``"reference"``: the
same sort and segment operations in PyTorch, sums in row order by ``index_add_`` on the
CPU and by ``index_put_(accumulate=True)`` on a GPU, and the vote by a CUDA kernel that
walks the runs, or, in the reference, in rounds whose number is read on the host). The CSL
sum and count themselves are written by the fused ``scatter_stats`` op inside
:func:`csl_fast.accumulate` (see its ``deterministic`` flag).
"""

from __future__ import annotations

import copy
import functools
import numbers
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import _ext, huge_pages, ops, reference, tracker_file
from ._args import check_flags
from ._args import device as device_arg
from .accumulate_checks import (
    _check_values,
    refuse_rows_into_sequences,
    refuse_tracing,
    signed_index,
    too_many_classes,
    validate_by_default,
)
from .buffer_locks import locked
from .distributed import forget_global, note_global, warn_if_unsynced
from .stats import (
    EXACT_FLOAT32_COUNT,
    MAX_TRACKED_CLASSES,
    NUM_STATS,
    Stat,
    float64_sums,
    invalid_column,
)
from .tracker_buffers import (
    _HISTORIES,
    _INPUT_GRAD_STEP,
    _STEP_STATE,
    buffer_kinds,
    buffer_shape,
    initial_value,
)
from .tracker_file import (  # re-exported: csl_fast and its users import them from here
    FORMAT_VERSION,
    TrackerFileError,
    TrackerFileNotFoundError,
    TrackerStateError,
    UnverifiedTrackerFileWarning,
)
from .tracker_state import epoch_bound
from .tracker_statistics import TrackerStatistics, _mean_or_nan

#: How :meth:`CSLTracker.update`'s and :meth:`~CSLTracker.record`'s refusal of rows into a
#: tracker of sequences says one-token sequences are recorded instead.
_ONE_TOKEN_STATS = "to record_sequences, as [NUM_STATS, B, 1] token statistics"

__all__ = [
    "FORMAT_VERSION",
    "CSLTracker",
    "TrackerFileError",
    "TrackerFileNotFoundError",
    "TrackerStateError",
    "UnverifiedTrackerFileWarning",
]


def _normal_tensors(method: Callable[..., Any]) -> Callable[..., Any]:
    """A method that allocates the tracker's state, run with inference mode off: tensors
    made under ``torch.inference_mode()`` are inference tensors, which PyTorch lets be
    updated in place only inside it, so a tracker made there (or an epoch closed, a state
    loaded there) failed at the next step outside with PyTorch's bare error."""

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_inference_mode_enabled():
            return method(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            return method(*args, **kwargs)

    return run


class CSLTracker(TrackerStatistics):
    r"""Dataset-sized buffers of per-sample training dynamics, updated without host syncs.

    Args:
        num_samples: ``N``, the number of training samples; indices are in ``[0, N)``.
        num_classes: ``C``, the logits' class count. ``None`` takes ``C`` from the first
            ``[B, C]`` logits (one row per sample) :func:`csl_fast.accumulate` or
            :func:`csl_fast.score_epoch` records; give it for a tracker fed through
            :meth:`update` only (a tracker of sequences may stay without it). Detection
            needs it: its doubt view and firm-loss test compare the label's probability
            with chance, ``1 / C``. Checked against the logits recorded and on
            :meth:`load_state_dict`.
        device: where the buffers live; the logits, targets and indices passed to
            :func:`csl_fast.accumulate` must be on this device.
        dtype: float32 (default) or float64, for every floating-point buffer.
        history: also keep per-epoch loss curves (:attr:`loss_history`,
            :attr:`eval_loss_history`), float16 ``[epochs, N]`` (a mean loss above 65504
            is stored as inf, with a warning).
        backend: kernel backend for the eval pass and input-gradient norms (see
            :func:`csl_fast.available_backends`).
        deterministic: passed to the eval pass's ``scatter_stats``; default
            ``torch.are_deterministic_algorithms_enabled()``. The tracker's own updates are
            always deterministic.
        num_labels: ``L`` for multi-label training: also keep :attr:`label_csl`, the CSL
            of every (sample, label) entry, and :attr:`label_prob`, the summed probability
            of each entry's target, both ``[N, L]`` (:func:`csl_fast.accumulate_bce`
            records into them). ``None`` (default): no per-label buffer.

    Buffers (all ``[N]``, on ``device``; "float" means ``dtype``). A *presentation* is one
    valid row of a training batch (eval-pass rows are kept apart):

    ==========================  =======  ===========================================================
    ``csl_sum``                 float    CSL: sum of the per-presentation loss :math:`\ell_i`
    ``csl_count``               float    number of presentations (``csl_sum / csl_count``: mean)
    ``last_loss``               float    loss at the last presentation (final sample loss)
    ``last_max_prob``           float    max softmax probability at the last presentation
    ``grad_norm_sum``           float    sum of :math:`\|\partial\ell_i/\partial z_i\|^2`
    ``margin_sum``              float    sum of margins :math:`\min(z_y - \max_{j\ne y} z_j, 1000)`
    ``p_true_sum``              float    sum of :math:`p_y` (data-map confidence numerator)
    ``p_true_sq_sum``           float    sum of :math:`p_y^2` (for the variability)
    ``last_correct``            bool     argmax was the label at the last presentation
    ``forgetting``              int32    correct -> incorrect transitions between successive
                                         presentations (Toneva et al.); the state before the
                                         first presentation is "incorrect"
    ``learned_epoch``           int32    epoch in which the final correct streak began
                                         (threshold learning time); -1 when the sample was
                                         incorrect at its last presentation or never presented
    ``suggest_label``           int32    candidate of a majority vote over the predicted class
                                         of misclassified presentations (:meth:`suggestions`);
                                         -1: none yet
    ``suggest_votes``           int32    the vote's counter (Boyer-Moore)
    ``suggest_hits``            int32    presentations that predicted the candidate, since it
                                         became the candidate
    ``input_grad_sq_sum``       float    sum of :math:`\|\partial\ell_i/\partial x_i\|^2`
    ``input_grad_norm_sum``     float    sum of :math:`\|\partial\ell_i/\partial x_i\|`
                                         (loss sensitivity numerator)
    ``input_grad_count``        float    number of input-gradient records
    ``epoch_input_grad_*``      float    the same sum of squares and count for the current
                                         epoch only (reset by :meth:`end_epoch`)
    ``eval_csl_sum``            float    eval-pass CSL (:func:`csl_fast.score_epoch`)
    ``eval_count``              float    number of eval-pass records
    ``eval_last_loss``          float    loss at the last eval pass
    ``eval_last_max_prob``      float    max softmax probability at the last eval pass
    ``eval_last_correct``       bool     correct at the last eval pass
    ``label_csl_sum``           float    ``[N, L]``, only with ``num_labels``: per-entry CSL,
                                         the sum of each label's plain loss (:attr:`label_csl`)
    ``label_prob_sum``          float    ``[N, L]``, only with ``num_labels``: the sum of
                                         :math:`e^{-\ell_{il}}`, the probability of each
                                         entry's target (:attr:`label_prob`)
    ==========================  =======  ===========================================================

    Histories (float, grown by :meth:`end_epoch` / :meth:`end_eval_pass`):

    - :attr:`input_grad_history` float32 ``[E', N]``: per-epoch mean of
      :math:`\|\partial\ell_i/\partial x_i\|^2` (NaN where not recorded), one row per epoch
      from :attr:`input_grad_first_epoch` (the first epoch with an input-gradient record)
      on. Needed for :meth:`learning_time`; 4 bytes per sample per epoch, only once input
      gradients are recorded.
    - with ``history=True``: :attr:`loss_history` float16 ``[epochs, N]`` (mean training
      loss of each epoch, NaN where not presented) and :attr:`eval_loss_history` float16
      ``[passes, N]`` (mean eval-pass loss per pass): 2 bytes per sample per epoch and per
      eval pass, plus four float scratch buffers (16 bytes per sample in float32).

    Memory: the default tracker (float32, ``history=False``) takes **90 bytes per sample**
    (17 float32 + 5 int32 + 2 bool buffers; 158 in float64), e.g. 4.5 MB for CIFAR's 50,000
    samples and 115 MB for ImageNet's 1.28M, plus 4 bytes per sample per epoch once input
    gradients are recorded. The suggested labels take 12 of those bytes (three int32).
    ``num_labels=L`` adds ``8 * L`` bytes per sample (``16 * L`` in float64): 40 MB for
    100,000 samples with 50 labels.
    :meth:`nbytes` reports the exact figure.

    Counters: :attr:`epoch` (completed epochs; presentations are stamped with it) and
    :attr:`eval_passes` (with :attr:`eval_pass_presentations`, the training presentations
    recorded when the last one ended).

    Indices: the recording methods take a ``validate`` flag, as :func:`csl_fast.accumulate`
    does. By default an index outside ``[0, N)`` raises an :class:`IndexError` before
    anything is written wherever that costs no device synchronisation (CPU tensors) or
    the backend would fault the device (``"reference"``). ``validate=False`` leaves it
    to the kernels: the C++ CPU kernels still refuse it, the others skip such rows and
    record the rest, as the GPU kernels do without a synchronisation; ``True`` checks on
    a GPU too (one synchronisation a call).
    """

    #: (the class's value: a tracker pickled before the flag existed reads as rows)
    sequences: bool = False
    # Set by watch() without a reduction_scale: the default B then undoes nothing of a loss
    # that Lightning divides by accumulate_grad_batches or a GradScaler multiplies.
    _watched_at_default_scale: bool = False
    # Whether the latest watch() took the default scale (input_grad.warn_if_default_scale).
    _last_watch_default: bool = False
    # Set when watch() warned of a second tensor watched in one step (input_grad.py).
    _warned_several_watched: bool = False

    @_normal_tensors
    def __init__(
        self,
        num_samples: int,
        num_classes: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        history: bool = False,
        *,
        backend: str = "auto",
        deterministic: bool | None = None,
        num_labels: int | None = None,
    ) -> None:
        # NumPy integers too (a size computed with NumPy is np.int64)
        if (
            isinstance(num_samples, bool)
            or not isinstance(num_samples, numbers.Integral)
            or num_samples < 0
        ):
            raise ValueError(f"CSLTracker: num_samples must be an int >= 0, got {num_samples!r}")
        num_samples = int(num_samples)
        if num_classes is not None and (
            isinstance(num_classes, bool)
            or not isinstance(num_classes, numbers.Integral)
            or num_classes < 1
        ):
            raise ValueError(
                f"CSLTracker: num_classes must be None or an int >= 1, got {num_classes!r}"
            )
        if num_classes is not None and num_classes > MAX_TRACKED_CLASSES:
            raise ValueError(too_many_classes("CSLTracker: num_classes gives", num_classes))
        if num_labels is not None and (
            isinstance(num_labels, bool)
            or not isinstance(num_labels, numbers.Integral)
            or num_labels < 1
        ):
            raise ValueError(
                f"CSLTracker: num_labels must be None or an int >= 1, got {num_labels!r}"
            )
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"CSLTracker: dtype must be torch.float32 or torch.float64, got {dtype}"
            )
        entries = int(num_samples) * int(num_labels or 1)
        if entries * 8 > _MAX_TENSOR_BYTES:
            # (torch's "Storage size calculation overflowed with sizes=[...]")
            per = f" x num_labels = {num_labels}" if num_labels is not None else ""
            raise ValueError(
                f"CSLTracker: num_samples = {num_samples}{per} gives buffers of {entries} "
                "entries, but a tensor holds at most 2**63 bytes (2**60 entries of 8 bytes); "
                "pass the number of samples (and labels) the dataset has"
            )
        self.num_samples = num_samples
        # (NumPy integers too: labels.max() + 1 computed with NumPy was refused)
        num_classes = None if num_classes is None else int(num_classes)
        num_labels = None if num_labels is None else int(num_labels)
        self.num_classes = num_classes
        #: ``L`` of a multi-label tracker (:attr:`label_csl`), or None.
        self.num_labels = num_labels
        # The device tensors land on: "cuda" becomes "cuda:0" (the current device), which is
        # what the statistics passed to update() report and are compared with.
        self.device = device_arg("CSLTracker", device, "create the tracker")
        check_flags("CSLTracker", False, history=history)
        check_flags("CSLTracker", deterministic=deterministic)
        self.dtype = dtype
        self.history = bool(history)
        if backend != "auto" and backend not in _ext.BACKENDS:  # else refused at the first step
            raise ValueError(
                f"CSLTracker: backend must be 'auto' or one of {_ext.BACKENDS}, got {backend!r}"
            )
        self.backend = backend
        self.deterministic = deterministic
        # The epoch as a 0-d tensor too (set with it, see the epoch property): a compiled
        # step reads it when it runs, so one graph serves every epoch.
        self._epoch_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self.epoch = 0
        #: Completed eval passes (:meth:`end_eval_pass` calls).
        self.eval_passes = 0
        #: The training presentations (``csl_count``'s total) the tracker held when its
        #: last eval pass ended, or None where that is unknown (no pass yet, a state saved
        #: before this was kept, a merged run): :func:`csl_fast.scores` reads
        #: ``final_loss`` and ``in_confidence`` from the last eval pass only while no
        #: training was recorded after it (that pass scored an older model otherwise).
        self.eval_pass_presentations: float | None = None
        #: First epoch with an input-gradient record (row 0 of :attr:`input_grad_history`),
        #: or -1 before any.
        self.input_grad_first_epoch = -1
        #: ``True`` once samples of several positions each (token sequences, K-dimensional
        #: logits) were recorded (:meth:`record_sequences`): ``csl_count`` then counts
        #: valid positions, ``csl`` sums over them (long samples score high whatever their
        #: quality), and :mod:`csl_fast.detect` ranks by ``csl_mean`` by default. Kept in
        #: the state and the file; a file saved before the flag existed loads as ``False``
        #: (set it by hand for a run of sequences).
        self.sequences = False
        #: How many training runs this tracker holds: 1, or for a :func:`csl_fast.merge`
        #: the sum over its inputs, which a later merge weighs it by. Kept in the state and
        #: the file (absent in files saved before it existed: 1).
        self.runs = 1
        self._histories: dict[str, list[torch.Tensor]] = {name: [] for name in _HISTORIES}
        self._buffers: dict[str, torch.Tensor] = {}
        for name, kind in self._buffer_kinds().items():
            shape = buffer_shape(name, num_samples, num_labels)
            buf = torch.empty(shape, dtype=self._kind_dtype(kind), device=self.device)
            huge_pages.advise(buf)  # before the fill below faults its pages in
            buf.fill_(initial_value(name))
            self._buffers[name] = buf
        # The state csl_fast.accumulate's one-call CPU step (csrc/module.cpp) updates; None
        # where that step does not apply.
        self._step_state = (
            tuple(self._buffers[name] for name in _STEP_STATE)
            if not self.history and self.device.type == "cpu" and _ext._C is not None
            else None
        )
        note_global(self)  # nothing recorded yet: nothing for a save to miss

    @property
    def epoch(self) -> int:
        """Completed epochs (:meth:`end_epoch` calls); the epoch stamp of new
        presentations."""
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        # -3 went into the epoch stamps of every later presentation; 2.5 was truncated;
        # 2**31 + 5 wrapped to a negative int32 stamp in the C++ kernels (learned_epoch),
        # the reference raised, and save() refused the state
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"CSLTracker: epoch must be an int >= 0, got {value!r}")
        bound = epoch_bound(self.history)
        if value >= bound:
            why = (
                "a tracker with history=True keeps a row per epoch"
                if self.history
                else "presentations are stamped with the epoch as an int32"
            )
            raise ValueError(
                f"CSLTracker: epoch must be an int >= 0 and below {bound} = "
                f"2**{bound.bit_length() - 1} ({why}; save() refuses a state with more), "
                f"got {value!r}"
            )
        self._epoch = int(value)
        self._epoch_t.fill_(self._epoch)

    # ------------------------------------------------------------------ buffers
    def _buffer_kinds(self) -> dict[str, str]:
        return buffer_kinds(self.history, self.num_labels is not None)

    def _kind_dtype(self, kind: str) -> torch.dtype:
        return {"float": self.dtype, "int": torch.int32, "bool": torch.bool}[kind]

    def __getattr__(self, name: str) -> torch.Tensor:
        buffers = self.__dict__.get("_buffers")
        if buffers is not None and name in buffers:
            return buffers[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        # An assignment bound a new attribute beside the buffer: reads went to it, while
        # the recorders, save and state_dict kept the buffer (t.csl_sum = ... "reset" CSL
        # for reads only; a buffer-by-buffer .double() split the tracker in two).
        buffers = self.__dict__.get("_buffers")
        if buffers is not None and name in buffers:
            raise AttributeError(
                f"CSLTracker.{name} is a live buffer that the recorders write into; change "
                f"it in place (tracker.{name}.zero_(), tracker.{name}.copy_(values)); for "
                "another dtype or device, create a CSLTracker with dtype= and device= and "
                "load_state_dict(tracker.state_dict()) into it"
            )
        super().__setattr__(name, value)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Through torch.multiprocessing (spawn, forkserver) the buffers arrive in shared
        # memory: a worker's writes reached the parent's buffers but not its epoch or
        # histories (2 presentations at epoch 0, then saved as such). A tracker passed to
        # another process is a copy there, as with fork.
        buffers = state.get("_buffers", {}).values()
        if any(b.is_shared() for b in buffers):
            state = copy.deepcopy(state)
        if any(b.is_inference() for b in buffers):
            # unpickled (pickle, deepcopy, torch.load) under inference_mode: copies outside
            # it, as _normal_tensors makes every tracker's tensors
            with torch.inference_mode(False):
                state = copy.deepcopy(state)
        # (pickled before it was kept: unknown, the last eval pass trusted as before)
        state.setdefault("eval_pass_presentations", None)
        forget_global(state)
        self.__dict__.update(state)

    def buffers(self) -> dict[str, torch.Tensor]:
        """The buffers by name (live tensors, not copies): ``[N]``, per-label ``[N, L]``."""
        return dict(self._buffers)

    @property
    def label_csl(self) -> torch.Tensor | None:
        """``[N, L]`` per-(sample, label) CSL (the live ``label_csl_sum`` buffer; recorders
        add into it), or ``None`` when the tracker has no ``num_labels``."""
        return self._buffers.get("label_csl_sum")

    @property
    def label_prob(self) -> torch.Tensor | None:
        """``[N, L]`` per-(sample, label) sum of the probability the model gave each entry's
        target (the live ``label_prob_sum`` buffer), or ``None`` without ``num_labels``."""
        return self._buffers.get("label_prob_sum")

    def nbytes(self) -> int:
        """Bytes held by the buffers and histories."""
        total = sum(b.numel() * b.element_size() for b in self._buffers.values())
        for rows in self._histories.values():
            total += sum(r.numel() * r.element_size() for r in rows)
        return total

    # ------------------------------------------------------------ recording
    def training_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(csl_sum, csl_count)``: what :func:`csl_fast.accumulate`'s fused op adds into."""
        return self._buffers["csl_sum"], self._buffers["csl_count"]

    def record(
        self, index: torch.Tensor, stats: torch.Tensor, *, validate: bool | None = None
    ) -> None:
        """Update every buffer but ``csl_sum``/``csl_count`` from one training batch.

        Args:
            index: ``[B]`` int dataset indices.
            stats: float32 ``[NUM_STATS, B]`` from the fused cross entropy
                (:class:`csl_fast.stats.Stat` rows), on the tracker's device.
            validate: check that every index is in ``[0, N)`` (class docstring, *Indices*).

        Called by :func:`csl_fast.accumulate` after it has added the losses and counts into
        :meth:`training_buffers`. To record a batch without ``accumulate``, call
        :meth:`update` instead. No host synchronisation.
        """
        refuse_tracing("csl_fast.CSLTracker.record")
        refuse_rows_into_sequences("CSLTracker.record", self, _ONE_TOKEN_STATS)
        stats = _plain(stats)
        _check_stats("record", stats, self.num_classes)
        self._record_fused(index, _recordable(stats), validate)

    @locked
    def _record_fused(
        self, index: torch.Tensor, stats: torch.Tensor, validate: bool | None = False
    ) -> None:
        """:meth:`record` of stats the fused op has just computed for this tracker (by
        :func:`csl_fast.accumulate`, which has checked the logits' class count): only their
        layout is checked (under 1 us; the class check adds ~5 us a call on the CPU)."""
        stats = _plain(stats)
        _check_stats("record", stats, None)
        idx = self._index(index, stats, validate)
        b = self._buffers  # not attribute access: __getattr__ costs ~1 us a name per step
        sums = (b["grad_norm_sum"], b["margin_sum"], b["p_true_sum"], b["p_true_sq_sum"])
        suggest = (b["suggest_label"], b["suggest_votes"], b["suggest_hits"])
        # First: on the CPU its op checks the indices before writing anything (see
        # record_sequences); the epoch sums are not among its buffers.
        self._record_last(idx, stats, "", transitions=True, sums=sums, suggest=suggest)
        if self.history:
            f = self.dtype
            _scatter_add(b["epoch_loss_sum"], idx, stats[Stat.LOSS].to(f))
            _scatter_add(b["epoch_count"], idx, stats[Stat.VALID].to(f))

    @locked
    def record_sequences(
        self, index: torch.Tensor, token_stats: torch.Tensor, *, validate: bool | None = None
    ) -> None:
        """Update every buffer but ``csl_sum``/``csl_count`` from a batch of sequences.

        Args:
            index: ``[B]`` int dataset indices, one per sequence.
            token_stats: float32 ``[NUM_STATS, B, T]`` per-token stats from the fused cross
                entropy (ignored tokens are all zero), on the tracker's device.
            validate: check that every index is in ``[0, N)`` (class docstring, *Indices*).

        Called by :func:`csl_fast.accumulate` for sequences (``[B*T, V]`` logits) after it has added
        each sequence's summed token loss and valid-token count into
        :meth:`training_buffers`, so a presentation of a sequence counts as its number of
        valid tokens. Aggregation per sequence (one presentation = one sequence in a batch):

        - token sums, so the means over ``csl_count`` are per-token means over all
          presentations: ``margin_sum`` (:attr:`aum`: mean token margin),
          ``grad_norm_sum``, ``p_true_sum`` and ``p_true_sq_sum`` (:attr:`confidence`,
          :attr:`variability`: mean and std of the token :math:`p_y`);
        - ``last_loss``: the sequence's summed token loss (its negative log-likelihood) at
          its last presentation, on CSL's scale;
        - ``last_max_prob``: the mean over its valid tokens of the max softmax probability;
        - correctness (``last_correct``, ``forgetting``, ``learned_epoch``): a sequence is
          correct when *every* valid token is the argmax (teacher-forced exact match, i.e.
          greedy decoding reproduces it given its prefix); a sequence without valid tokens
          is not a presentation and changes nothing;
        - no suggested label (``suggest_*`` stay as they are, :meth:`suggestions` gives -1):
          a sequence's label is its whole token string, and a replacement would be another
          string, not one class a vote over per-token runner-ups could name.

        A sequence split over several calls (the chunks of a long document, each call with
        its index) is one presentation per call: its sums add up over the chunks, but its
        last values and correctness are those of its last chunk, and ``forgetting`` counts
        transitions between chunks. Pass the whole sequence in one call to keep one
        presentation per epoch.

        No host synchronisation.
        """
        refuse_tracing("csl_fast.CSLTracker.record_sequences")
        token_stats = _plain(token_stats)
        if (
            not isinstance(token_stats, torch.Tensor)
            or token_stats.dim() != 3
            or token_stats.shape[0] != NUM_STATS
            or token_stats.dtype not in (torch.float32, torch.float64)
        ):
            got = (
                f"{token_stats.dtype} of shape {tuple(token_stats.shape)}"
                if isinstance(token_stats, torch.Tensor)
                else type(token_stats).__name__
            )
            raise ValueError(
                "CSLTracker.record_sequences: token_stats must be float32 (or float64) "
                f"[NUM_STATS, B, T] (the fused cross entropy's per-token statistics), got {got}"
            )
        f = self.dtype
        tok = _recordable(token_stats.to(f))  # (hand-made ones: as update reads its rows)
        # Per-sequence sums, not token 0: a batch of samples without positions (T == 0,
        # ``[N, C, 0]`` logits, which F.cross_entropy takes) has no token 0.
        sums = tok.sum(2)
        idx = self._index(index, sums, validate)
        n = sums[Stat.VALID]
        valid = tok[Stat.VALID] > 0
        max_prob = torch.where(valid, reference.max_prob(tok[Stat.LOSS], tok[Stat.MARGIN]), 0).sum(
            1
        )
        # float32, as record_last takes them, whatever the token statistics' dtype.
        seq = torch.zeros(token_stats.shape[:2], dtype=torch.float32, device=sums.device)
        seq[Stat.LOSS] = sums[Stat.LOSS].float()
        all_correct = sums[Stat.CORRECT] == n
        if tok.dtype == torch.float32 and tok.shape[2] > EXACT_FLOAT32_COUNT:
            # float32 sums round counts past 2**24 (a volume's positions): a sample with a
            # wrong position or two compared equal, as correct
            all_correct = float64_sums(tok[Stat.CORRECT]) == float64_sums(tok[Stat.VALID])
        seq[Stat.CORRECT] = (all_correct & (n > 0)).float()
        seq[Stat.VALID] = (n > 0).float()
        # First: on the CPU its op checks the indices before writing anything, so an index
        # outside [0, N) leaves the tracker as it was (the sums below would skip it but
        # write the others). The buffers written below are not among its.
        self._record_last(idx, seq, "", transitions=True, max_prob=max_prob / n.clamp(min=1))
        # one position per sample ([N, C, 1] logits) is a row: its count is presentations;
        # an empty batch ([0, C, d]) recorded no sample of several positions
        sequences = token_stats.shape[1] > 0 and token_stats.shape[2] > 1
        compiling = torch.compiler.is_compiling()
        if sequences and not self.sequences and not compiling:
            # a batch whose every token is ignore_index recorded nothing: it made the
            # tracker one of sequences, and a later batch of rows, its only records, was
            # refused. Read on each batch until the first supervised token (a compiled
            # step, which would break its graph to read it, goes by the shapes alone).
            sequences = bool(n.gt(0).any())
        if sequences and not self.sequences:  # (a compiled step guards on it)
            if not compiling:
                if bool(self.suggest_label.ge(0).any()):
                    # Rows voted before (only rows do): a classification head sharing the
                    # tracker, or one-token sequences a first [B, V, 1] batch recorded as rows.
                    warnings.warn(
                        "CSLTracker.record_sequences: this tracker recorded classification rows "
                        "before this first batch of sequences, and from now on counts as a "
                        "tracker of sequences (tracker.sequences): it ranks every sample by CSL "
                        "per position and suggests no labels, the rows' included. If those rows "
                        "were one-token sequences ([B, V, 1] logits), nothing is lost; if they "
                        "are another task's samples, record them into a second CSLTracker",
                        stacklevel=3,
                    )
                elif bool(self.eval_count.gt(0).any()):
                    # Rows an eval pass scored (it scores nothing else): said as the rows of
                    # training are (an eval pass of rows alone went on without a word)
                    warnings.warn(
                        "CSLTracker.record_sequences: this tracker recorded classification rows "
                        "in an eval pass (csl_fast.score_epoch) before this first batch of "
                        "sequences, and from now on counts as a tracker of sequences "
                        "(tracker.sequences): its eval_csl and final_loss stay those rows' losses, "
                        "and later eval passes are refused. Score the rows into a second "
                        "CSLTracker",
                        stacklevel=3,
                    )
            self.sequences = True
        _scatter_add(self.grad_norm_sum, idx, sums[Stat.GRAD_NORM_SQ])
        _scatter_add(self.margin_sum, idx, sums[Stat.MARGIN])
        _scatter_add(self.p_true_sum, idx, sums[Stat.P_TRUE])
        _scatter_add(self.p_true_sq_sum, idx, tok[Stat.P_TRUE].square().sum(1))
        if self.history:
            _scatter_add(self.epoch_loss_sum, idx, sums[Stat.LOSS])
            _scatter_add(self.epoch_count, idx, sums[Stat.VALID])

    @locked
    def update(
        self, index: torch.Tensor, stats: torch.Tensor, *, validate: bool | None = None
    ) -> None:
        """Record a training batch's stats into every buffer, ``csl_sum``/``csl_count``
        included (``accumulate`` does the same in its fused op, then calls :meth:`record`).
        ``validate``: check that every index is in ``[0, N)`` (class docstring, *Indices*)."""
        refuse_tracing("csl_fast.CSLTracker.update")
        refuse_rows_into_sequences("CSLTracker.update", self, _ONE_TOKEN_STATS)
        stats = _plain(stats)
        _check_stats("update", stats, self.num_classes)
        stats = _recordable(stats)
        idx = self._index(index, stats, validate)
        ops.scatter_stats(
            stats,
            idx,
            self._deterministic(),
            *self.training_buffers(),
            backend=self.backend,
        )
        self._record_fused(idx, stats)  # (its indices checked above)

    @locked
    def record_eval(
        self, index: torch.Tensor, stats: torch.Tensor, *, validate: bool | None = None
    ) -> None:
        """Record an eval-pass batch (see :func:`csl_fast.score_epoch`) into the ``eval_*``
        buffers, apart from the in-training ones. ``validate``: check that every index is in
        ``[0, N)`` (class docstring, *Indices*). A tracker of sequences refuses it (the
        stats are rows of one class each)."""
        refuse_tracing("csl_fast.CSLTracker.record_eval")
        # (taken, the rows' eval losses became the sequences' final_loss)
        refuse_rows_into_sequences("CSLTracker.record_eval", self, None)
        stats = _plain(stats)
        _check_stats("record_eval", stats, self.num_classes)
        stats = _recordable(stats)
        idx = self._index(index, stats, validate)
        ops.scatter_stats(
            stats,
            idx,
            self._deterministic(),
            self.eval_csl_sum,
            self.eval_count,
            backend=self.backend,
        )
        if self.history:
            _scatter_add(self.eval_pass_loss_sum, idx, stats[Stat.LOSS].to(self.dtype))
            _scatter_add(self.eval_pass_count, idx, stats[Stat.VALID].to(self.dtype))
        self._record_last(idx, stats, "eval_", transitions=False)

    @locked
    def record_input_grad(
        self,
        index: torch.Tensor,
        sq_norms: torch.Tensor,
        valid: torch.Tensor | None = None,
        *,
        validate: bool | None = None,
    ) -> None:
        r"""Add per-sample squared input-gradient norms :math:`\|\partial\ell_i/\partial x_i\|^2`.

        Args:
            index: ``[B]`` dataset indices.
            sq_norms: ``[B]`` squared norms, already scaled to one sample's loss (see
                :func:`csl_fast.input_grad_norms`).
            valid: optional ``[B]`` bool; rows that are False (e.g. ``ignore_index``
                targets) are not recorded. Non-finite norms are never recorded.
            validate: check that every index is in ``[0, N)`` (class docstring, *Indices*)
                and, for norms on a GPU, that none is negative (on the CPU always).
        """
        sq_norms = _plain(sq_norms)
        if not isinstance(sq_norms, torch.Tensor) or sq_norms.dim() != 1:
            # ([B, 1] norms read "index has B entries but the batch has 1 rows")
            got = (
                tuple(sq_norms.shape)
                if isinstance(sq_norms, torch.Tensor)
                else type(sq_norms).__name__
            )
            raise ValueError(
                "CSLTracker.record_input_grad: sq_norms must be a 1-D [B] tensor, one "
                f"squared norm per row, got {got}"
            )
        if not sq_norms.is_floating_point():
            # (a complex norm lost its imaginary part in the cast, bool and int ones were
            # recorded as their values without a word)
            raise TypeError(
                "CSLTracker.record_input_grad: sq_norms must be a real floating-point [B] "
                f"tensor, got {sq_norms.dtype}; pass the squared norms as floats "
                "(grad.flatten(1).pow(2).sum(1), or csl_fast.input_grad_norms)"
            )
        # The C++ op checks the indices and the norms itself before it writes: checking
        # them here as well made watch's per-step cost several times the op's.
        fused = (
            self.device.type == "cpu" and _ext.resolve_backend(self.backend, self.device) == "cpu"
        )
        if not fused and (sq_norms.device.type == "cpu" or validate):
            # sqrt of it made the sample's loss_sensitivity NaN for good (a GPU tensor is
            # checked with validate=True: the check waits for the device)
            negative = (sq_norms < 0).nonzero()
            if negative.numel():
                i = int(negative[0, 0])
                raise ValueError(
                    f"CSLTracker.record_input_grad: sq_norms[{i}] = {float(sq_norms[i]):g} is "
                    "negative; a squared norm is >= 0: pass the squares of the per-row "
                    "input-gradient norms"
                )
        idx = self._index(index, sq_norms[None], False if fused and validate is None else validate)
        if valid is not None and not isinstance(valid, torch.Tensor):
            raise TypeError(
                "CSLTracker.record_input_grad: valid must be a bool [B] tensor, got "
                f"{type(valid).__name__}; pass torch.as_tensor(valid)"
            )
        if valid is not None and valid.dtype != torch.bool:
            # (cast to bool, valid=target dropped every class-0 row without a word)
            raise TypeError(
                f"CSLTracker.record_input_grad: valid must be a bool [B] tensor, got "
                f"{valid.dtype}; pass a mask such as target != ignore_index"
            )
        if valid is not None and (valid.dim() != 1 or valid.shape[0] != idx.shape[0]):
            raise ValueError(
                f"CSLTracker.record_input_grad: valid must be a bool [B = {idx.shape[0]}] "
                f"tensor, one flag per row of sq_norms, got shape {tuple(valid.shape)}"
            )
        b = self._buffers
        ops.record_input_grad(
            sq_norms.to(self.device, self.dtype),
            idx,
            None if valid is None else valid.to(self.device, torch.bool),
            tuple(b[name] for name in _INPUT_GRAD_STEP),
            backend=self.backend,
        )
        if self.input_grad_first_epoch < 0 and idx.numel():
            # (an empty batch recorded nothing: marked, scores() listed learning_time and
            # loss_sensitivity, all NaN)
            self.input_grad_first_epoch = self.epoch

    def watch(
        self,
        x: torch.Tensor,
        index: torch.Tensor,
        reduction_scale: float | torch.Tensor | None = None,
        *,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Record per-sample input-gradient norms of ``x`` during backward; returns ``x``.

        Registers a hook on ``x`` (made to require grad if it is a leaf that does not)
        that reduces ``x``'s gradient to per-row squared norms times
        ``reduction_scale ** 2`` and adds them at ``index``. ``reduction_scale`` undoes the
        loss reduction: default ``None`` = ``reduction='mean'`` over ``B = x.shape[0]``
        rows (scale ``B``); ``1.0`` for ``'sum'``; ``(target != ignore_index).sum()`` (a
        tensor: no host sync) with ``valid=target != ignore_index`` for ``'mean'`` with
        ignored rows, the same for sequences (``target`` ``[B, T]``: the token count).
        Gradient accumulation's ``1 / k`` and AMP's ``GradScaler`` scale reach the
        gradient too: undo them here, ``B * k / scaler.get_scale()``. See
        :func:`csl_fast.input_grad.watch`.

        .. warning:: BatchNorm in train mode (and any other layer that mixes samples)
           couples the rows of ``x.grad``: the recorded values are then not per-sample
           input gradients.
        """
        from .input_grad import watch

        return watch(x, index, self, reduction_scale=reduction_scale, valid=valid)

    def _deterministic(self) -> bool:
        if self.deterministic is None:
            return torch.are_deterministic_algorithms_enabled()
        return bool(self.deterministic)

    def _index(
        self, index: torch.Tensor, stats: torch.Tensor, validate: bool | None
    ) -> torch.Tensor:
        if not isinstance(index, torch.Tensor) or index.dim() != 1:
            raise ValueError("CSLTracker: index must be a 1-D tensor of dataset indices")
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(
                f"CSLTracker: index must hold integer dataset indices, got {index.dtype}"
            )
        if index.shape[0] != stats.shape[-1]:
            raise ValueError(
                f"CSLTracker: index has {index.shape[0]} entries but the batch has "
                f"{stats.shape[-1]} rows"
            )
        if stats.device != self.device:
            raise ValueError(
                f"CSLTracker: got statistics on {stats.device} but the tracker lives on "
                f"{self.device}; create the tracker with device={str(stats.device)!r}"
            )
        if validate is None:
            # On the CPU always (no synchronisation to save): the C++ scatter's own check
            # names "the csl buffer", which a user who made a tracker never saw.
            validate = not torch.compiler.is_compiling() and (
                self.device.type == "cpu"
                or validate_by_default(self.device, _ext.resolve_backend(self.backend, self.device))
            )
        # int64 first: comparisons of uint16/32/64 are not implemented on the CPU
        index = signed_index(index, "CSLTracker", self.num_samples, device=self.device)
        if validate:
            _check_values(None, index, 0, self.num_samples, 0, "CSLTracker", tracker=True)
        return index

    def _record_last(
        self,
        idx: torch.Tensor,
        stats: torch.Tensor,
        prefix: str,
        transitions: bool,
        max_prob: torch.Tensor | None = None,
        sums: tuple[torch.Tensor | None, ...] = (None, None, None, None),
        suggest: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Last-value buffers (and forgetting / learned epoch, and the ``sums``) with the
        batch-order rule (:func:`csl_fast.reference.record_last`), in one pass on the CPU.
        ``max_prob`` overrides the max probability derived from the loss and margin."""
        b = self._buffers
        ops.record_last(
            stats,
            idx,
            max_prob,
            self._epoch_t if torch.compiler.is_compiling() else self.epoch,
            b[prefix + "last_loss"],
            b[prefix + "last_max_prob"],
            b[prefix + "last_correct"],
            b["forgetting"] if transitions else None,
            b["learned_epoch"] if transitions else None,
            sums,
            suggest,
            backend=self.backend,
        )

    # --------------------------------------------------------------- epochs
    @locked
    def sync(self, group: Any = None, *, timeout: float | None = None) -> bool:
        """Combine the ranks' trackers with ``torch.distributed`` collectives (every rank of
        ``group`` must call it, each collective waiting at most ``timeout`` seconds); a
        no-op returning False without an initialised process group of more than one
        process. Syncing twice does not double-count. Rules: :mod:`csl_fast.distributed`."""
        from .distributed import check_group, sync

        check_group("CSLTracker.sync", group)
        return sync(self, group, timeout=timeout)

    @locked
    @_normal_tensors
    def end_epoch(self, group: Any = None) -> None:
        """Close the current training epoch.

        Under an initialised ``torch.distributed`` process group, first combines the ranks
        of ``group`` (default: every rank), as :meth:`sync` does with the same ``group``: a
        collective, so call ``end_epoch`` on every rank of ``group``. A rank outside
        ``group``, or a ``group`` of one process, closes its epoch alone. Then appends this
        epoch's mean input-gradient norm (once any was recorded) and, with
        ``history=True``, its mean loss to the histories, resets the per-epoch
        accumulators and advances :attr:`epoch`. Not distributed, it reads nothing on the
        host but, with ``history=True``, one count per epoch (whether any sample was
        recorded in it).
        """
        from .distributed import check_group, sync_epoch

        try:  # (ignored outside torch.distributed: end_epoch(5) passed silently)
            check_group("CSLTracker.end_epoch", group)
        except TypeError as e:
            raise TypeError(f"{e}; the tracker counts its epochs itself (tracker.epoch)") from None
        bound = epoch_bound(self.history)
        if self.epoch + 1 >= bound:
            # refused by the epoch setter below, after the rows were appended and the
            # epoch's sums zeroed: refused here, before anything changes
            raise ValueError(
                f"CSLTracker.end_epoch: the tracker is at epoch {self.epoch}, the last one a "
                f"saved state keeps (epochs are below {bound} = 2**{bound.bit_length() - 1}); "
                "nothing was changed"
            )
        sync_epoch(self, group)  # a no-op returning False when not distributed
        if self.input_grad_first_epoch >= 0:
            self._histories["input_grad_history"].append(
                _mean_or_nan(self.epoch_input_grad_sq_sum, self.epoch_input_grad_count).float()
            )
            self.epoch_input_grad_sq_sum.zero_()
            self.epoch_input_grad_count.zero_()
        if self.history:
            self._histories["loss_history"].append(
                _half_row(_mean_or_nan(self.epoch_loss_sum, self.epoch_count), "loss_history")
            )
            self.epoch_loss_sum.zero_()
            self.epoch_count.zero_()
        self.epoch += 1

    @locked
    @_normal_tensors
    def end_eval_pass(self) -> None:
        """Close an eval pass (:func:`csl_fast.score_epoch` calls this): appends the pass's
        mean loss to :attr:`eval_loss_history` (``history=True``) and advances
        :attr:`eval_passes`."""
        if self.history:
            self._histories["eval_loss_history"].append(
                _half_row(
                    _mean_or_nan(self.eval_pass_loss_sum, self.eval_pass_count),
                    "eval_loss_history",
                )
            )
            self.eval_pass_loss_sum.zero_()
            self.eval_pass_count.zero_()
        # (one host read per pass, none per training step; a meta tracker holds no counts)
        meta = self.device.type == "meta"
        self.eval_pass_presentations = None if meta else self.presentations()
        self.eval_passes += 1

    def presentations(self) -> float:
        """The training presentations recorded so far, ``csl_count``'s total (exact: summed
        in float64; one host read): what :attr:`eval_pass_presentations` is compared
        with."""
        return float(self.csl_count.sum(dtype=torch.float64))

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """A versioned state: metadata, counters, buffers and histories.

        Restoring it with :meth:`load_state_dict` (mid-epoch too) and continuing gives
        bitwise the same buffers as an uninterrupted run. As ``nn.Module.state_dict``, the
        buffers are the tracker's live tensors, not copies: ``torch.save`` it (into a
        training checkpoint; ``torch.load``'s default ``weights_only=True`` reads it back)
        or ``copy.deepcopy`` it to keep it while training goes on. While another thread
        records into the tracker, a copy of the live tensors can catch a step half written
        (it then loads with that step partly counted, or is refused where buffers
        disagree): :meth:`save` holds the tracker's lock and is the consistent copy there.
        The tracker object itself is not a checkpoint entry (``weights_only`` loading
        refuses it): store its ``state_dict()``, or write it with :meth:`save`.

        Under an initialised process group of more than one rank, it warns
        (:class:`~csl_fast.distributed.UnsyncedStateWarning`) when this tracker recorded
        training or eval presentations since its last sync: the state then holds this
        rank's part of them only. Call :meth:`sync` on every rank first.
        """
        warn_if_unsynced(self, "CSLTracker.state_dict()")
        return tracker_file.state_dict(self)

    @locked
    @_normal_tensors
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (copied into this tracker's device and dtype).

        The whole state is checked first (every field's type and range, every tensor's
        layout, dtype and shape, the values of counts and integer buffers, and the
        relations between buffers every tracker keeps, :mod:`csl_fast.tracker_invariants`);
        on any error the tracker is left unchanged. States of an older format version lacking
        buffers introduced since get those buffers' initial values. Tensors that require
        grad are copied without it, as ``nn.Module.load_state_dict`` does.

        Raises :class:`TrackerStateError` for another format, a newer version, a different
        ``num_samples``, ``num_classes`` (``None`` on either side agrees with any: a tracker
        without it takes the state's) or ``history``, missing, mistyped or misshapen
        entries, sparse or meta tensors, or values no tracker holds (a negative,
        non-integral or non-finite count, a negative counter, an int past int32, NaN or
        inf in a sum of probabilities or gradient norms or the last top probability, history
        rows other than one per closed epoch or eval pass, a learned epoch past the
        epoch, a suggested label of no class), or buffers that disagree, named by field and
        sample (a sum or last value where the count is 0, forgetting events or suggested-
        label hits past the presentations, a learned epoch without a correct last
        presentation or the reverse, more votes than hits, a per-epoch count past its total,
        history rows holding values for samples not recorded in their epochs). Trailing
        input-gradient rows a merge of runs of different lengths lacks are filled with NaN
        (no record).
        """
        tracker_file.load_state_dict(self, state)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tracker to ``path`` atomically, with a checksum.

        The file (format: :mod:`csl_fast.tracker_file`) is written to a temporary file in
        the same folder, fsynced, then renamed over ``path``: a crash mid-save leaves the
        previous file intact, and the next save removes the temporary files that killed
        saves left. A symlink at ``path`` is followed (the file it points to is replaced).
        The file's mode follows the umask. Tensors are stored raw; no pickle. The tracker's
        lock is held while its buffers are read and written out (threads recording into
        it wait for that, and the file holds the state between two of their steps), not
        while the file is fsynced and renamed.

        Raises:
            OSError: the file cannot be written (full disk, missing folder, permission,
                a folder at ``path`` or a ``path`` ending with a separator, such as
                ``"out/"``, or a device, FIFO or socket at ``path``, which would be replaced
                by a file); the message names ``path`` and says what to do.
            TrackerStateError: the buffers hold a state :meth:`load` would refuse (such
                as one fed by :meth:`record` alone); nothing is written.

        Warns:
            csl_fast.distributed.UnsyncedStateWarning: under an initialised process group
                of more than one rank, this tracker recorded training or eval presentations
                since its last sync, so the file holds this rank's part of them only. Call
                :meth:`sync` on every rank (a collective) before saving on one.
        """
        warn_if_unsynced(self, "CSLTracker.save()")
        tracker_file.save(self, path)

    @locked
    @_normal_tensors
    def load(self, path: str | os.PathLike) -> None:
        """Load a file written by :meth:`save` into this tracker.

        The whole file is read, its checksum verified and its contents checked against
        this tracker before anything changes (so the file's size in memory sits beside
        the tracker until then; :meth:`from_file` needs only the tracker's). Files of
        format version 1 (no checksum) load with an :class:`UnverifiedTrackerFileWarning`.

        Raises:
            TrackerFileError: a truncated, corrupted, foreign or newer-format file, or
                one written for another ``num_samples``/``num_classes``/``history``; the
                tracker is then unchanged. :class:`TrackerFileNotFoundError` (also a
                ``FileNotFoundError``) when there is no file at ``path``.
        """
        tracker_file.load(self, path)

    @classmethod
    @_normal_tensors
    def from_file(
        cls, path: str | os.PathLike, device: torch.device | str = "cpu", **kwargs: Any
    ) -> CSLTracker:
        """A new tracker restored from ``path`` (sizes, dtype and history flag from the
        file). The file's metadata is checked before the tracker is allocated; the payload
        is then read straight into the new tracker's buffers (on the CPU) and verified
        before the tracker is returned. Raises as :meth:`load`."""
        return tracker_file.from_file(cls, path, device, **kwargs)

    def __repr__(self) -> str:
        return (
            f"CSLTracker(num_samples={self.num_samples}, num_classes={self.num_classes}, "
            f"device={str(self.device)!r}, dtype={self.dtype}, history={self.history}, "
            + (f"num_labels={self.num_labels}, " if self.num_labels is not None else "")
            + ("sequences=True, " if self.sequences else "")
            + (f"runs={self.runs}, " if self.runs != 1 else "")
            + f"epoch={self.epoch}, eval_passes={self.eval_passes})"
        )


# ------------------------------------------------------------------ helpers
def _plain(t: Any) -> Any:
    """A recorder's tensor input detached: statistics that require grad (norms from
    autograd.grad(create_graph=True), reference.row_statistics of live logits) pulled the
    buffers written with PyTorch ops into autograd, every step's graph kept alive."""
    return t.detach() if isinstance(t, torch.Tensor) else t


#: The most bytes torch lets one tensor's storage hold (its size is an int64)
_MAX_TENSOR_BYTES = 2**63 - 1

_HALF_MAX = torch.finfo(torch.float16).max


def _half_row(mean: torch.Tensor, name: str) -> torch.Tensor:
    """A history row in float16 (2 bytes per sample and epoch), with a warning when a
    finite mean loss is past float16's range and becomes inf there (one host read)."""
    half = mean.half()
    # counted on the rounded row: means in (65504, 65520) round to 65504, not inf
    over = int(half.isinf().logical_and_(mean.isfinite()).sum())
    if over:
        warnings.warn(
            f"CSLTracker.{name}: {over} sample(s) had a mean loss past float16's range "
            f"(largest value {_HALF_MAX:.0f}) this epoch; the row stores inf for them (the CSL "
            "sums and counts hold the exact values). Scale the losses you record, e.g. "
            "record_loss(loss / s, ...), to keep curves of such losses",
            RuntimeWarning,
            stacklevel=4,  # the caller of end_epoch (through its lock wrapper)
        )
    return half


def _recordable(stats: torch.Tensor) -> torch.Tensor:
    """``stats`` with every column that records nothing (``VALID`` 0, or a loss that is
    not finite) set to the kernels' invalid column, contiguous (the C++ scatter reads
    rows). The fused op writes its own that way; stats made by hand reached the sums with
    their values (a ``VALID = 0`` column's loss in ``csl_sum`` at a count of 0, which no
    load accepts; a NaN loss in CSL for good)."""
    ok = (stats[Stat.VALID] != 0) & torch.isfinite(stats[Stat.LOSS])
    invalid = invalid_column(stats).view(NUM_STATS, *[1] * (stats.dim() - 1))  # (tokens: 3-D)
    # (where keeps a transposed input's strides)
    return torch.where(ok, stats, invalid).contiguous()


def _check_stats(method: str, stats: object, num_classes: int | None) -> None:
    """``stats`` as the fused cross entropy gives them: float32 ``[NUM_STATS, B]``.
    Checked before anything is written: the kernels read row ``Stat.VALID`` of fewer rows
    past their end, and a later op's refusal would leave the tracker half-updated.

    On the CPU the ``OTHER_ARGMAX`` row (the runner-up class each vote counts) must also
    name a class of the tracker: stats of a model with more outputs than ``num_classes``
    would store a suggested label that no load accepts, so the tracker could no longer be
    saved. On CUDA that check would cost a host synchronisation per batch; the fused op's
    own stats always pass it (:func:`csl_fast.accumulate` checks the logits' class count).
    """
    if (
        not isinstance(stats, torch.Tensor)
        or stats.dim() != 2
        or stats.shape[0] != NUM_STATS
        or stats.dtype != torch.float32
    ):
        got = (
            f"{stats.dtype} of shape {tuple(stats.shape)}"
            if isinstance(stats, torch.Tensor)
            else type(stats).__name__
        )
        raise ValueError(
            f"CSLTracker.{method}: stats must be float32 [NUM_STATS, B] (NUM_STATS = "
            f"{NUM_STATS}), the statistics of the fused cross entropy "
            f"(csl_fast.ops.cross_entropy_fwd), got {got}"
        )
    if num_classes is None or stats.device.type != "cpu" or stats.shape[1] == 0:
        return
    other = stats[Stat.OTHER_ARGMAX]
    lo, hi = torch.aminmax(other)
    low, high = float(lo), float(hi)
    # not ``low < -1 or ...``: a NaN fails every comparison
    if not (low >= -1 and high < num_classes):
        bad = ~((other >= -1) & (other < num_classes))
        col = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"CSLTracker.{method}: stats row OTHER_ARGMAX holds {float(other[col])!r} at batch "
            f"column {col}, not a class of this tracker (in [0, {num_classes}), or -1 "
            "for a row without a runner-up): the stats come from a model with another number "
            f"of classes than num_classes={num_classes}; make the tracker with the model's "
            "class count, or compute the stats with csl_fast.ops.cross_entropy_fwd on logits "
            f"with {num_classes} columns"
        )


def _scatter_add(buf: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """``buf[idx] += values`` with duplicates added in a reproducible order (sequential on
    the CPU, PyTorch's sort-based kernel on CUDA). An index outside ``[0, N)`` adds nothing,
    as in the fused kernels (index_put_ would raise, or fault on CUDA), with no host sync."""
    if buf.shape[0] == 0:
        return
    idx, ok = ops._skip_out_of_range(idx, buf.shape[0])
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    reference.index_add(buf, idx, torch.where(ok, values, zero))
