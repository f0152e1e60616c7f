"""Forward code that autograd reruns inside a backward pass records nothing.

Activation checkpointing (``torch.utils.checkpoint``) frees a region's activations in the
forward and reruns the region during the backward to get them back. A csl_fast call in
that region then runs twice per training step; the rerun is not a new presentation of the
batch, so it computes its loss and gradient as before but writes no buffer. Reentrant
checkpointing reruns inside the backward's graph task; non-reentrant checkpointing runs
both passes under saved-tensor hooks and reruns inside the backward too.
"""

from __future__ import annotations

import torch

# Private but long-standing torch bindings, bound once: these run on every eager step.
# -1 outside a backward pass.
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)
_top_saved_tensor_hooks = getattr(
    torch._C._autograd, "_top_saved_tensors_default_hooks", lambda ignore_is_tracing: None
)


def in_backward() -> bool:
    """True while autograd runs a backward pass in this thread (a checkpointed forward
    being rerun, or any other code called from a backward)."""
    return _graph_task_id() != -1


# cudagraph_unsafe: a CUDA graph would bake in the value seen at capture.
_UNSAFE_FOR_CUDA_GRAPHS = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t)


@torch.library.custom_op(
    "csl_fast::outside_backward", mutates_args=(), tags=_UNSAFE_FOR_CUDA_GRAPHS
)
def outside_backward(like: torch.Tensor) -> torch.Tensor:
    """bool ``[]`` on ``like``'s device: True outside a backward pass, False inside one.

    :func:`in_backward` as a value a compiled graph computes each time it runs: a region
    compiled with ``torch.compile`` and checkpointed by eager ``torch.utils.checkpoint``
    reruns its whole graph, buffer writes included, inside the backward. The recording
    paths that run under compilation replace their statistics by invalid rows when this
    is False (:func:`recorded_rows`), so the rerun writes nothing. An opaque op: the graph
    cannot constant-fold it at trace time, and a fill, not a copy from the host, so it
    costs no device synchronisation."""
    return torch.full((), not in_backward(), dtype=torch.bool, device=like.device)


@outside_backward.register_fake
def _(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((), dtype=torch.bool)


def recorded_rows(stats: torch.Tensor, invalid: torch.Tensor | float) -> torch.Tensor:
    """``stats`` where a compiled graph runs outside a backward pass, else ``invalid``
    (broadcast: the statistics of rows that record nothing)."""
    return torch.where(outside_backward(stats), stats, invalid)


def saved_tensor_hooks_active() -> bool:
    """True under ``torch.autograd.graph.saved_tensors_hooks`` (non-reentrant
    checkpointing, ``save_on_cpu``): the tensors an autograd node saves go through the
    hooks, which only ops called through the dispatcher honour."""
    return _top_saved_tensor_hooks(False) is not None
