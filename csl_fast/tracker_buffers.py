"""The buffer table of :class:`csl_fast.CSLTracker`: every per-sample buffer by name and
kind, and the groups the recording ops update, in their schemas' order.

Every buffer is ``[N]`` but those of :data:`_LABEL_BUFFERS`, which are ``[N, L]`` (one
entry per sample and label, for trackers created with ``num_labels=L``).
"""

from __future__ import annotations

# Buffer name -> kind. "float" buffers use the tracker's dtype.
_TRAIN_BUFFERS = {
    "csl_sum": "float",
    "csl_count": "float",
    "last_loss": "float",
    "last_max_prob": "float",
    "grad_norm_sum": "float",
    "margin_sum": "float",
    "p_true_sum": "float",
    "p_true_sq_sum": "float",
    "last_correct": "bool",
    "forgetting": "int",
    "learned_epoch": "int",
    "suggest_label": "int",
    "suggest_votes": "int",
    "suggest_hits": "int",
}
_INPUT_GRAD_BUFFERS = {
    "input_grad_sq_sum": "float",
    "input_grad_norm_sum": "float",
    "input_grad_count": "float",
    "epoch_input_grad_sq_sum": "float",
    "epoch_input_grad_count": "float",
}
_EVAL_BUFFERS = {
    "eval_csl_sum": "float",
    "eval_count": "float",
    "eval_last_loss": "float",
    "eval_last_max_prob": "float",
    "eval_last_correct": "bool",
}
_HISTORY_BUFFERS = {
    "epoch_loss_sum": "float",
    "epoch_count": "float",
    "eval_pass_loss_sum": "float",
    "eval_pass_count": "float",
}
# Per-(sample, label) buffers, [N, L], kept when the tracker has num_labels (multi-label
# losses: csl_fast.accumulate_bce). The name ends in "_sum" so that merge and the
# distributed sync add it like every other sum.
_LABEL_BUFFERS = {
    "label_csl_sum": "float",
    "label_prob_sum": "float",
}
_HISTORIES = ("loss_history", "eval_loss_history", "input_grad_history")
# What record_input_grad updates, in its schema's order (csrc/csl_fast.cpp).
_INPUT_GRAD_STEP = (
    "input_grad_sq_sum", "input_grad_norm_sum", "input_grad_count", "epoch_input_grad_sq_sum",
    "epoch_input_grad_count",
)  # fmt: skip
# What record_last updates in a training step, in its schema's order (csrc/csl_fast.cpp).
_STEP_STATE = (
    "last_loss", "last_max_prob", "last_correct", "forgetting", "learned_epoch",
    "grad_norm_sum", "margin_sum", "p_true_sum", "p_true_sq_sum",
    "suggest_label", "suggest_votes", "suggest_hits",
)  # fmt: skip
# Buffers that start at -1 ("none yet"); every other buffer starts at 0.
_MINUS_ONE = ("learned_epoch", "suggest_label")


def initial_value(name: str) -> int:
    """What buffer ``name`` starts at in a new tracker: -1 for those of
    :data:`_MINUS_ONE`, else 0."""
    return -1 if name in _MINUS_ONE else 0


def buffer_kinds(history: bool, labels: bool) -> dict[str, str]:
    """Buffer name -> kind of a tracker with these flags, in the tracker's order."""
    kinds = {**_TRAIN_BUFFERS, **_INPUT_GRAD_BUFFERS, **_EVAL_BUFFERS}
    if history:
        kinds.update(_HISTORY_BUFFERS)
    if labels:
        kinds.update(_LABEL_BUFFERS)
    return kinds


def buffer_shape(name: str, num_samples: int, num_labels: int | None) -> tuple[int, ...]:
    """The shape of buffer ``name``: ``(N,)``, or ``(N, L)`` for a per-label buffer."""
    if name in _LABEL_BUFFERS:
        if num_labels is None:
            raise ValueError(f"buffer {name!r} exists only in a tracker with num_labels")
        return (num_samples, num_labels)
    return (num_samples,)
