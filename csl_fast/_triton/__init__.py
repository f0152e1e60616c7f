"""Triton kernels of csl_fast, the default GPU path.

Importing this package registers these ops (same semantics as :mod:`csl_fast.reference`):

* ``torch.ops.csl_fast.cross_entropy_fwd_triton(logits, target, weight, ignore_index,
  label_smoothing, reduction) -> (loss, grad, stats)``
* ``torch.ops.csl_fast.cross_entropy_fwd_inplace_triton(logits, ...) -> (loss, stats)``,
  the gradient written over the logits
* ``torch.ops.csl_fast.cross_entropy_fwd_stats_triton(logits, ...) -> (loss, stats)``: no
  gradient formed (the float16/bfloat16 forward, no-grad passes)
* ``torch.ops.csl_fast.mean_denominator_triton(target, weight, ignore_index, num_classes)
  -> Tensor``: the float16/bfloat16 mean's denominator (``csl_fast.ops``)
* ``torch.ops.csl_fast.cross_entropy_bwd_triton(logits, target, weight, stats, scale,
  ignore_index, label_smoothing) -> Tensor``: the float16/bfloat16 backward in one
  elementwise pass (``csl_fast.ops_backward``)
* ``torch.ops.csl_fast.cross_entropy_fwd_extra_triton(..., softcap, z_loss_scale) ->
  (loss, grad, stats, z_loss)``, ``cross_entropy_fwd_extra_inplace_triton`` and
  ``cross_entropy_fwd_extra_stats_triton``: with soft-capping and the z-loss
* ``torch.ops.csl_fast.scatter_stats_triton(stats, index, deterministic, csl, count) -> ()``
* ``torch.ops.csl_fast.input_grad_norms_triton(grad, scale) -> Tensor``
* ``torch.ops.csl_fast.bce_fwd_triton``, ``bce_bwd_triton``, ``bce_record_triton``: the
  binary cross entropy of ``csl_fast.accumulate_bce`` (``csl_fast/_triton/bce.py``)
* ``torch.ops.csl_fast.record_last_triton(stats, index, max_prob, epoch, last_loss, ...)``
  (the tracker's per-presentation state, as :func:`csl_fast.reference.record_last`)

They are :func:`torch.library.triton_op` on a GPU (traceable by ``torch.compile``) and
opaque custom ops with fake kernels under ``TRITON_INTERPRET=1`` (see ``_registry``).
Argument values are validated by the caller (``csl_fast.ops``).
"""

from .bce import bce_bwd_triton, bce_fwd_triton, bce_record_triton
from .cross_entropy import (
    cross_entropy_fwd_inplace_triton,
    cross_entropy_fwd_stats_triton,
    cross_entropy_fwd_triton,
    mean_denominator_triton,
)
from .cross_entropy_bwd import cross_entropy_bwd_triton
from .cross_entropy_extra import (
    cross_entropy_fwd_extra_inplace_triton,
    cross_entropy_fwd_extra_stats_triton,
    cross_entropy_fwd_extra_triton,
)
from .grad_norms import input_grad_norms_triton
from .record import record_last_triton
from .scatter import scatter_stats_triton

__all__ = [
    "bce_bwd_triton",
    "bce_fwd_triton",
    "bce_record_triton",
    "cross_entropy_bwd_triton",
    "cross_entropy_fwd_extra_inplace_triton",
    "cross_entropy_fwd_extra_stats_triton",
    "cross_entropy_fwd_extra_triton",
    "cross_entropy_fwd_inplace_triton",
    "cross_entropy_fwd_stats_triton",
    "cross_entropy_fwd_triton",
    "input_grad_norms_triton",
    "mean_denominator_triton",
    "record_last_triton",
    "scatter_stats_triton",
]
