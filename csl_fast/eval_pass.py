"""Eval-pass CSL: score every training sample with the model in eval mode, without gradients."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

import torch

from ._args import check_flags, integer
from ._args import device as device_arg
from .accumulate_checks import (
    _LOGIT_DTYPES,
    _check_values,
    adopt_classes,
    copy_to,
    match_tracker_classes,
    signed_index,
    validate_by_default,
)
from .distributed import is_distributed
from .model_modes import eval_mode
from .tracker import CSLTracker
from .tracker_buffers import buffer_kinds

Batch = Any
# What to do instead of an eval pass over sequences (said where one is refused).
_SEQUENCES_BY_HAND = (
    "score sequences yourself (F.cross_entropy(..., reduction='none') summed per sequence) "
    "and record them with csl_fast.record_loss into a tracker of their own"
)
Unpack = Callable[[Batch], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def score_epoch(
    model: torch.nn.Module,
    loader: Iterable[Batch],
    tracker: CSLTracker,
    *,
    ignore_index: int = -100,
    unpack: Unpack | None = None,
    forward: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    validate: bool | None = None,
) -> None:
    """Add one eval-mode loss per sample into the tracker's eval-pass buffers.

    This is the CSL the authors' released code computes: after each training epoch, every
    training sample is scored with the current weights in eval mode (dropout off,
    BatchNorm running statistics) and its loss is added into ``tracker.eval_csl_sum``
    (count in ``tracker.eval_count``; last values in ``eval_last_*``), kept apart from the
    in-training buffers. The same fused kernel as training computes the per-row statistics
    (``csl_fast.ops.cross_entropy_fwd``, ``tracker.backend``), under ``torch.no_grad()``.
    Ends with :meth:`CSLTracker.end_eval_pass` (not when the loader yielded no batch, with
    a warning, but under ``torch.distributed``, whose ranks must count the same passes).
    Every submodule's training mode is restored as it was (a backbone frozen with
    ``.eval()`` stays in eval mode), even when an exception interrupts the pass; the
    eval-pass buffers are then restored too, so that running the pass again counts each
    sample once. For that the pass holds a CPU copy of those
    buffers (17 bytes per sample in float32, 33 in float64, 8 or 16 more with ``history``).

    Using a loader without augmentation (and any order) is the caller's business: pass a
    loader over ``csl_fast.data.IndexedDataset`` of the training set with eval transforms.
    One pass costs one forward over the data.

    Args:
        model: maps an input batch to ``[B, C]`` logits.
        loader: yields batches ``(x, y, index)`` (tuple/list, index last) or mappings with
            keys ``"input"``, ``"target"`` and ``"index"``; other layouts need ``unpack``.
        tracker: where to record; a tracker of sequences (``tracker.sequences``) is
            refused, as :meth:`CSLTracker.update` refuses rows: the pass scores rows.
        ignore_index: rows with this target are not recorded.
        unpack: ``batch -> (x, y, index)`` for other batch layouts.
        forward: ``(model, x) -> logits`` for models that do not return logits directly
            (e.g. ``lambda m, x: m(**x).logits``); default ``model(x)``.
        device: where to move ``x`` (default: the device of the model's first parameter,
            else the tracker's); targets and indices go to the tracker's device.
        progress: show a tqdm progress bar (needs ``tqdm``).
        validate: check on the host that targets and indices are in range, as
            :func:`csl_fast.accumulate` does (``None``, the default: where that costs no
            device synchronisation or the kernel does not check itself; a bad target
            raises ``IndexError`` before anything is recorded). Unchecked on a GPU, a row
            with a target outside ``[0, C)`` is skipped, as in training.
    """
    unpack = unpack or _default_unpack
    if not isinstance(model, torch.nn.Module):
        # (a plain function raised "'function' object has no attribute 'parameters'")
        raise TypeError(
            f"csl_fast.score_epoch: model must be a torch.nn.Module (it is put in eval mode "
            f"for the pass), got {type(model).__name__}; wrap a function in a Module"
        )
    # (as accumulate checks them: None gave "'NoneType' object has no attribute 'history'",
    # ignore_index=None a comparison error, validate="no" counted as True)
    if not isinstance(tracker, CSLTracker):
        raise TypeError(
            "csl_fast.score_epoch: tracker must be a csl_fast.CSLTracker (the pass fills its "
            f"eval buffers), got {type(tracker).__name__}"
        )
    # before the model runs or num_classes is adopted: taken, the rows' eval losses became
    # the sequences' final_loss and their class count the tracker's num_classes. No batch is
    # read yet, so this says what a pass scores rather than what the batch is (a loader of
    # sequences was called "classification rows" and told to record them elsewhere)
    if tracker.sequences:
        raise ValueError(
            "csl_fast.score_epoch: this tracker recorded sequences (samples of several "
            "positions: tracker.sequences is True), and an eval pass scores one class per "
            f"sample ([B, C] logits) into its eval_* buffers and final_loss; {_SEQUENCES_BY_HAND}"
        )
    if tracker.num_labels is not None:
        # a pass scores softmax cross entropy: class indices into a multi-label tracker
        # made it a softmax one (num_classes adopted, eval_csl of a model it never trained)
        raise ValueError(
            f"csl_fast.score_epoch: the tracker records {tracker.num_labels} labels per "
            "sample (num_labels, csl_fast.accumulate_bce), and an eval pass scores softmax "
            "cross entropy over classes; score a multi-label model's eval pass with "
            "accumulate_bce into a tracker of its own"
        )
    ignore_index = integer("csl_fast.score_epoch", "ignore_index", ignore_index)
    check_flags("csl_fast.score_epoch", validate=validate)
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else tracker.device
    # (torch's "Expected one of cpu, cuda, ..." or "Torch not compiled with CUDA enabled")
    device = device_arg("csl_fast.score_epoch", device, "run the pass")
    # (None: "'NoneType' object is not iterable"; iter() also takes __getitem__ alone)
    if not hasattr(loader, "__iter__") and not hasattr(loader, "__getitem__"):
        raise TypeError(
            "csl_fast.score_epoch: loader must be an iterable of (x, y, index) batches (a "
            f"DataLoader, a list), got {type(loader).__name__}"
        )
    _warn_of_the_loader(loader, tracker)
    batches: Iterable[Batch] = loader
    if progress:
        tqdm = progress_bar("csl_fast.score_epoch")
        batches = tqdm(loader, desc=f"eval pass {tracker.eval_passes}", leave=False)
    from . import ops
    from ._ext import resolve_backend

    # On the CPU: a GPU tracker's pass keeps no second copy of its buffers on the device.
    before = {n: getattr(tracker, n).to("cpu", copy=True) for n in _eval_buffers(tracker)}
    scored, classes_before = False, tracker.num_classes
    try:
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                scored = True
                x, y, index = unpack(batch)
                x = _to(x, device)
                logits = model(x) if forward is None else forward(model, x)
                if not isinstance(logits, torch.Tensor):
                    raise TypeError(
                        f"csl_fast.score_epoch: the model returned a {type(logits).__name__}; "
                        "expected a [B, C] logits tensor: pass forward= to extract it, e.g. "
                        "forward=lambda m, x: m(x)['logits'] or m(x)[0]"
                    )
                if logits.dim() == 3:
                    raise ValueError(
                        f"csl_fast.score_epoch: the model returned shape {tuple(logits.shape)}; "
                        "an eval pass scores one class per sample ([B, C] logits), not the "
                        f"tokens of a sequence model: {_SEQUENCES_BY_HAND}"
                    )
                if logits.dim() != 2:
                    raise ValueError(
                        f"csl_fast.score_epoch: the model returned shape {tuple(logits.shape)}; "
                        "expected [B, C] logits (pass forward= to extract them)"
                    )
                if logits.dtype not in _LOGIT_DTYPES:  # (the kernel's "not implemented for 'Long'")
                    raise TypeError(
                        f"csl_fast.score_epoch: the model returned {logits.dtype} logits; "
                        "expected float32, float16, bfloat16 or float64"
                    )
                match_tracker_classes("score_epoch", tracker, logits.shape[1])
                logits = logits.to(tracker.device)
                # a custom collate_fn may give lists; torch.as_tensor keeps a tensor as is
                y = copy_to(torch.as_tensor(y), tracker.device)
                # (int16 passed here, and the kernel blamed class-probability targets)
                if y.dtype not in (torch.int64, torch.int32, torch.uint8):
                    # the reference's .long() truncated 1.7 to class 1
                    raise TypeError(
                        "csl_fast.score_epoch: targets must be class indices (int64, int32 or "
                        f"uint8, as in training), got {y.dtype}; an eval pass scores the given "
                        "labels, not class probabilities"
                    )
                if y.dtype == torch.uint8:  # taken in training (accumulate) too
                    y = y.long()
                index = torch.as_tensor(index)
                if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
                    # before the range check, which raised torch's own errors for them
                    # (torch.iinfo's, "lt_cpu" not implemented for 'ComplexFloat')
                    raise TypeError(
                        "csl_fast.score_epoch: index must hold integer dataset indices, got "
                        f"{index.dtype}"
                    )
                # uint16/32/64: the range check's comparisons are not implemented for them
                # ("lt_cpu" not implemented for 'UInt64', a raw NotImplementedError)
                index = signed_index(index, "score_epoch", tracker.num_samples, tracker.device)
                check = validate
                if check is None:
                    name = resolve_backend(tracker.backend, logits.device, logits.dtype)
                    check = validate_by_default(logits.device, name)
                if check:
                    # the Triton kernel made a bad target's row NaN and the pass skipped it
                    # without a word, where the C++ kernel and accumulate raise
                    _check_values(y, index, logits.shape[1], tracker.num_samples, ignore_index,
                                  "score_epoch", tracker=True)  # fmt: skip
                try:
                    _, stats = ops.cross_entropy_fwd(
                        logits, y, None, ignore_index, 0.0, 2, tracker.backend
                    )
                    tracker.record_eval(index, stats)
                except IndexError:
                    if check:
                        raise
                    # the kernel ("csl_fast: target[2] ...") and the tracker ("CSLTracker:
                    # index[2] ...") name themselves: say it of the call the user made
                    try:
                        _check_values(y, index, logits.shape[1], tracker.num_samples,
                                      ignore_index, "score_epoch", tracker=True)  # fmt: skip
                    except IndexError as exc:
                        raise exc from None
                    raise
                adopt_classes(tracker, logits.shape[1])
    except BaseException as exc:
        try:
            tracker.num_classes = classes_before
            for n, buf in before.items():
                getattr(tracker, n).copy_(buf)
        except Exception as failed:  # (a broken device) the pass's own error comes first
            exc.add_note(
                f"csl_fast.score_epoch: the eval buffers could not be restored ({failed!r}): "
                "they hold part of this pass"
            )
        raise
    # Counted, a pass that scored nothing made final_loss and in_confidence NaN everywhere
    # (they are read from the eval buffers once a pass exists). Under torch.distributed a
    # rank with an empty shard still closes the pass: the ranks' pass counts must agree.
    if not is_distributed() and (
        not scored or not bool((tracker.eval_count.cpu() != before["eval_count"]).any())
    ):
        what = (
            "the loader yielded no batch"
            if not scored
            else "no row of its batches was scored (every target ignore_index, the batches "
            "empty, or every loss not finite)"
        )
        warnings.warn(
            f"csl_fast.score_epoch: {what}, so the pass is not counted (tracker.eval_passes "
            f"stays {tracker.eval_passes})",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    passes, at = tracker.eval_passes, tracker.eval_pass_presentations
    tracker.end_eval_pass()
    if not is_distributed():  # (each rank scores a shard: the others' samples are left out)
        from .scores import note_eval_pass

        note_eval_pass(tracker, tracker.eval_count.cpu() != before["eval_count"], passes, at)


def _eval_buffers(tracker: CSLTracker) -> list[str]:
    """The buffers an eval pass writes: ``eval_*`` (with ``history``, the pass's sums)."""
    return [n for n in buffer_kinds(tracker.history, False) if n.startswith("eval_")]


def progress_bar(fn: str) -> Any:
    """``tqdm.auto.tqdm``, or an ImportError that says how to get it (not the bare
    ModuleNotFoundError of an optional dependency)."""
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError(f"{fn}(progress=True) needs tqdm: pip install tqdm") from exc
    return tqdm


def _default_unpack(batch: Batch) -> tuple[Any, torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):
        try:
            return batch["input"], batch["target"], batch["index"]
        except KeyError as exc:
            raise KeyError(
                f"csl_fast.score_epoch: dict batches need keys 'input', 'target' and 'index' "
                f"(got {sorted(batch)}); pass unpack=lambda b: (x, y, index)"
            ) from exc
    if isinstance(batch, tuple | list) and len(batch) >= 3:
        return batch[0], batch[1], batch[-1]
    raise TypeError(
        "csl_fast.score_epoch: batches must be (x, y, index) tuples (csl_fast.data.IndexedDataset) "
        "or pass unpack=lambda batch: (x, y, index)"
    )


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return copy_to(x, device)
    if isinstance(x, MutableMapping):
        # a copy keeps the type: a transformers BatchEncoding (a UserDict) turned into a
        # plain dict lost the attribute access (enc.input_ids) its model reads
        out = copy.copy(x)
        for k, v in x.items():
            out[k] = _to(v, device)
        return out
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple, as collate keeps it
        return type(x)(*(_to(v, device) for v in x))
    if isinstance(x, tuple | list):
        return type(x)(_to(v, device) for v in x)
    return x


def _warn_of_the_loader(loader: Any, tracker: CSLTracker) -> None:
    """A warning for a DataLoader whose pass records what the caller did not mean: one that
    drops its last partial batch (the training loader, reused: each pass left other
    samples out, and eval_csl, a sum, grew with how often each was scored), and one over
    IndexedDatasets (:class:`~csl_fast.data.IndexedDataset`) whose indices do not name the tracker's
    samples (a validation set's 0..M-1 named training samples, whose eval buffers took
    its losses; two concatenated ones both start at 0)."""
    from torch.utils.data import BatchSampler, DataLoader

    if not isinstance(loader, DataLoader):
        return
    batches = loader.batch_sampler
    if isinstance(batches, BatchSampler) and batches.drop_last:
        try:  # what the sampler yields (a DistributedSampler: this rank's share)
            size = len(batches.sampler)  # type: ignore[arg-type]
        except TypeError:
            size = 0
        if size % batches.batch_size:
            warnings.warn(
                f"csl_fast.score_epoch: the loader drops its last partial batch "
                f"(drop_last=True): {size % batches.batch_size} of the {size} samples its "
                "sampler yields are not scored in this pass, so each sample's eval_csl sums "
                "a different number of passes; pass a loader without drop_last",
                RuntimeWarning,
                stacklevel=3,
            )
    indexed = _indexed_datasets(loader.dataset)
    if len(indexed) > 1:
        said = f"{len(indexed)} IndexedDatasets, whose indices all start at 0"
    elif indexed and len(indexed[0]) != tracker.num_samples:
        said = f"an IndexedDataset of {len(indexed[0])} samples (indices 0..{len(indexed[0]) - 1})"
    else:
        return
    warnings.warn(
        f"csl_fast.score_epoch: the loader's data set holds {said}, and the tracker tracks "
        f"{tracker.num_samples} samples: those indices name the tracker's samples, so "
        "another data set's losses (a validation set's) are recorded as theirs; score the "
        "data set the tracker tracks (wrap the whole of it in one IndexedDataset), or give "
        "another one a tracker of its own (CSLTracker(len(dataset), num_classes))",
        RuntimeWarning,
        stacklevel=3,
    )


def _indexed_datasets(dataset: Any) -> list[Any]:
    """The IndexedDatasets (:class:`~csl_fast.data.IndexedDataset`) whose indices
    ``dataset`` yields, through Subsets (which keep them) and ConcatDatasets (which do not
    renumber them)."""
    from torch.utils.data import ConcatDataset, Subset

    from .data import IndexedDataset

    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, IndexedDataset):
        return [dataset]
    if isinstance(dataset, ConcatDataset):
        return [d for part in dataset.datasets for d in _indexed_datasets(part)]
    return []
