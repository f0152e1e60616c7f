r"""Groups of identical training inputs, for :func:`csl_fast.detect.duplicates`.

A duplicate is a property of a *group*: two identical inputs with conflicting labels
cannot both be fitted by generalisation, the network fights over them and both members
keep a high loss (the paper's duplicate experiment ranks both). A per-sample rule does
not see that: the mislabeled rule flags the member whose label disagrees with the class
the network learns and leaves its partner, whose label is right but is still half of the
conflict (on the paper benchmark, digits with 9 conflicting pairs, it flagged 9-11 of the
18 members). So the flagged set of :func:`~csl_fast.detect.duplicates` is made of whole
groups, and this module holds the group bookkeeping, vectorised (one ``torch.unique``
over the rows, no Python loop over samples):

* :func:`group_ids`: the group of every sample (``-1``: no identical partner);
* :func:`conflicting`: which groups hold two different labels;
* :func:`flagged_groups`: which groups hold a flagged sample;
* :func:`whole_groups`: every member of each group that has a flagged member;
* :func:`count_through_groups`: how many samples the top ``m`` of a ranking reaches
  through their groups (maps a per-sample count and its interval to groups).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ._args import integer_labels, label_range
from .bits import as_bits

__all__ = [
    "LABEL_VALUES_SHOWN",
    "agree",
    "as_rows",
    "carry_count",
    "check_class_labels",
    "check_rows",
    "conflicting",
    "count_through_groups",
    "exact_duplicate_groups",
    "flagged_groups",
    "group_ids",
    "group_lists",
    "label_text",
    "num_groups",
    "whole_groups",
]


def _rows(x: torch.Tensor) -> torch.Tensor:
    # flatten, not reshape(N, -1): with N = 0 the -1 is ambiguous and reshape refuses
    flat = (x.detach().flatten(1) if x.dim() > 1 else x.detach().reshape(-1, 1)).cpu()
    if flat.is_complex():
        flat = torch.view_as_real(flat).flatten(1)
    return as_bits(flat)  # -0.0 and 0.0 differ, a NaN equals the same NaN


#: The most values of one label row a table shows (a sequence's token labels run to
#: thousands: one cell of the report's groups table was several KB)
LABEL_VALUES_SHOWN = 8


def label_text(value: Any, limit: int | None = LABEL_VALUES_SHOWN) -> str:
    """A label as text: a class index as it is, a regression target to 4 significant
    digits, a row (a multi-label target, a sequence's token labels) as its values,
    space-separated, the first ``limit`` of them (``None``: all) and how many there are;
    ``-`` for a missing value (None). ``int()`` of a regression's 0.73 printed 0."""
    v = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(v, list):
        flat = np.asarray(v, dtype=object).reshape(-1).tolist()
        shown = flat if limit is None or len(flat) <= limit else flat[:limit]
        text = " ".join(label_text(x) for x in shown)
        return text if len(shown) == len(flat) else f"{text} ... ({len(flat)} values)"
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(int(v))
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def num_groups(ids: torch.Tensor) -> int:
    """The number of groups in :func:`group_ids`' answer."""
    return int(ids.max()) + 1 if ids.numel() else 0


#: The groups already found within :func:`computed_once`: (a weak reference to the
#: inputs, what must be unchanged since, the ids); None outside it.
_FOUND: contextvars.ContextVar[list[tuple[Any, Any, torch.Tensor]] | None] = contextvars.ContextVar(
    "csl_fast_group_ids_found", default=None
)


@contextlib.contextmanager
def computed_once() -> Iterator[None]:
    """Within it, :func:`group_ids` of the same inputs tensor (the same object, on the
    same storage, not changed in place since: its version counter) is computed once. A
    command of the CLI (``rank``, ``report``, ``clean``) asks for the groups of its one
    inputs tensor in several places (the detection, the plan, the report's section):
    ``torch.unique(dim=0)`` took seconds each at a million rows. Writes that bypass the
    version counter (through ``.data`` or a NumPy view of the tensor) are not seen; the
    CLI, its one user, makes none."""
    token = _FOUND.set([])
    try:
        yield
    finally:
        _FOUND.reset(token)


def _unchanged_key(inputs: torch.Tensor) -> Any:
    try:
        version = inputs._version  # (an inference-mode tensor has none)
    except RuntimeError:
        return None
    return (
        version,
        inputs.untyped_storage().data_ptr(),  # (x.data = other: a new storage, version 0)
        inputs.device,
        inputs.dtype,
        tuple(inputs.shape),
        inputs.stride(),
        inputs.storage_offset(),
    )


def group_ids(inputs: torch.Tensor) -> torch.Tensor:
    """int64 ``[N]``: the group of each sample among bitwise-identical rows of
    ``inputs`` (``[N, ...]``), numbered ``0, 1, ...`` by the group's smallest index;
    ``-1`` for a sample with no identical partner."""
    found = _FOUND.get()
    key = None if found is None else _unchanged_key(inputs)
    if found is None or key is None:
        return _group_ids(inputs)
    for ref, k, ids in found:
        if ref() is inputs and k == key:
            return ids.clone()
    ids = _group_ids(inputs)
    found.append((weakref.ref(inputs), key, ids))
    return ids.clone()


def _group_ids(inputs: torch.Tensor) -> torch.Tensor:
    n = inputs.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long)
    inverse, counts = _partition(_rows(inputs))
    first = _first_of_class(inverse, counts.numel())
    shared = counts > 1
    # renumber the shared rows by their first index; singletons get -1
    order = torch.argsort(torch.where(shared, first, n + torch.arange(counts.numel())))
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return torch.where(shared[inverse], rank[inverse], -1)


#: Elements of the ``[N, k]`` int64 temporaries :func:`_partition` makes at a time.
_BLOCK = 1 << 22


def _hash_weights(d: int) -> torch.Tensor:
    """int64 ``[d]``: fixed odd weights of the row hash."""
    gen = torch.Generator().manual_seed(0x51C)
    return torch.randint(1, 2**62, (d,), dtype=torch.int64, generator=gen) | 1


def _partition(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inverse, counts)`` of ``torch.unique(rows, dim=0)`` up to the numbering of the
    classes (which :func:`_group_ids` does not read): the rows of a 2-D integer tensor
    classed by equality. Rows are hashed to one int64 each and classed by a 1-D unique;
    the rows sharing a hash are then compared with their class's first row, and the exact
    ``unique(dim=0)`` (3x slower at 1M x 64) answers when any differ (a collision)."""
    n, d = rows.shape
    if d == 0:  # (refused by unique as it was)
        return _unique_rows(rows)
    weights = _hash_weights(d)
    h = torch.zeros(n, dtype=torch.int64)
    step = max(1, _BLOCK // max(n, 1))
    for j in range(0, d, step):  # (an int64 sum wraps around: a hash all the same)
        h += (rows[:, j : j + step].to(torch.int64) * weights[j : j + step]).sum(1)
    _, inverse, counts = torch.unique(h, return_inverse=True, return_counts=True)
    first = _first_of_class(inverse, counts.numel())
    members = torch.nonzero(counts[inverse] > 1).flatten()
    step = max(1, _BLOCK // max(d, 1))
    for k in range(0, members.numel(), step):
        m = members[k : k + step]
        if not torch.equal(rows[m], rows[first[inverse[m]]]):
            return _unique_rows(rows)
    return inverse, counts


def _unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inverse, counts)`` of the rows classed exactly, by ``torch.unique(dim=0)``."""
    _, inverse, counts = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    return inverse, counts


def _first_of_class(inverse: torch.Tensor, classes: int) -> torch.Tensor:
    """int64 ``[classes]``: the smallest row index in each class of ``inverse``."""
    n = inverse.numel()
    first = torch.full((classes,), n, dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(n), reduce="amin")
    return first


def group_lists(ids: torch.Tensor, which: torch.Tensor | None = None) -> list[list[int]]:
    """The groups of :func:`group_ids` as lists of dataset indices, in group order;
    only the groups where the bool ``[G]`` ``which`` is True when it is given."""
    num = num_groups(ids)
    if num == 0:
        return []
    keep = torch.ones(num, dtype=torch.bool) if which is None else which.cpu()
    members = torch.nonzero((ids >= 0) & keep[ids.clamp(min=0)]).flatten()
    # a stable sort by group keeps each group's indices ascending
    members = members[torch.sort(ids[members], stable=True).indices]
    sizes = torch.bincount(ids[members], minlength=num)[keep]
    return [g.tolist() for g in torch.split(members, sizes.tolist())]


def exact_duplicate_groups(inputs: torch.Tensor | np.ndarray | list[Any]) -> list[list[int]]:
    """Groups (of size >= 2) of dataset indices whose inputs are bitwise identical.

    ``inputs`` is ``[N, ...]``: a tensor, a NumPy array or a list, as
    :func:`csl_fast.detect.duplicates` takes them; rows are compared by their bits (floats
    included, so ``-0.0`` and ``0.0`` differ). Groups are sorted by their smallest index,
    each group's indices ascending.
    """
    # (a list or an array, which duplicates takes, raised "'list' object has no attribute
    # 'shape'", and None "'NoneType' object has no attribute 'shape'")
    where = "csl_fast.detect.exact_duplicate_groups"
    rows = as_rows(where, "inputs", inputs)
    if rows is None:
        raise TypeError(
            f"{where}: inputs must be a tensor, a NumPy array or a list with one row per "
            "sample, got None"
        )
    if rows.dim() == 0:
        raise ValueError(f"{where}: inputs must be [N, ...], one row per sample, got a 0-d value")
    return group_lists(group_ids(rows))


def conflicting(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """bool ``[G]``: the groups of ``ids`` whose members do not all carry the same label.

    ``labels``: ``[N]`` class indices, or ``[N, ...]`` (a sequence's token labels, or a
    multi-label target row, compared by their bits, as inputs are, ``-0.0`` read as
    ``0.0``). A negative class index
    (an unlabelled sample or position, such as ``F.cross_entropy``'s ``ignore_index=-100``)
    takes no part: an unlabelled copy of a labelled sample is no conflict, and neither is
    a copy whose prompt tokens are masked. Two members conflict where both label a
    position and the labels differ.
    """
    num = num_groups(ids)
    if labels.is_signed() and integer_labels(labels.dtype):
        return _conflicting_classes(ids, labels, num)
    rows = _label_rows(labels)
    member = ids >= 0
    g = ids[member]
    if g.numel() == 0:
        return torch.zeros(num, dtype=torch.bool)
    first = torch.full((num,), ids.numel(), dtype=torch.long)
    first.scatter_reduce_(0, g, torch.nonzero(member).flatten(), reduce="amin")
    differs = (rows[member] != rows[first[g]]).reshape(g.numel(), -1).any(dim=1)
    return torch.zeros(num, dtype=torch.long).index_add_(0, g, differs.long()) > 0


def agree(labels: torch.Tensor, rows: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """bool ``[M]``: whether sample ``rows[m]``'s label agrees with sample ``others[m]``'s,
    by :func:`conflicting`'s rule: signed integer labels agree where every position both
    label (non-negative) carries the same class; others where their bits are equal (after
    ``-0.0`` is read as ``0.0``)."""
    a, b = _label_rows(labels[rows]), _label_rows(labels[others])
    if labels.is_signed() and integer_labels(labels.dtype):
        return ((a < 0) | (b < 0) | (a == b)).all(dim=1)
    return (a == b).all(dim=1)


def _label_rows(labels: torch.Tensor) -> torch.Tensor:
    # a regression target of -0.0 is the target 0.0 (the same loss and gradient): as
    # bits they differed, and clean dropped a member of a group that agreed
    if labels.is_floating_point() or labels.is_complex():
        labels = labels + 0.0
    return _rows(labels)


def _conflicting_classes(ids: torch.Tensor, labels: torch.Tensor, num: int) -> torch.Tensor:
    # Per group and position, the smallest and largest label over the members that label
    # it: they differ exactly where two members conflict (a comparison with the first
    # member alone missed [-100, 5] / [3, 5] / [4, -100]).
    if num == 0:
        return torch.zeros(0, dtype=torch.bool)
    lab = _rows(labels).long()
    labelled = (ids >= 0)[:, None] & (lab >= 0)
    where = ids.clamp(min=0)[:, None].expand_as(lab)
    top = torch.iinfo(torch.int64).max
    low = torch.full((num, lab.shape[1]), top).scatter_reduce_(
        0, where, torch.where(labelled, lab, top), reduce="amin"
    )
    high = torch.full((num, lab.shape[1]), -1, dtype=torch.long).scatter_reduce_(
        0, where, torch.where(labelled, lab, -1), reduce="amax"
    )
    return ((high >= 0) & (low != high)).any(dim=1)


def flagged_groups(flagged: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """bool ``[G]``: the groups of ``ids`` that hold a ``flagged`` (bool ``[N]``) sample."""
    member = ids >= 0
    hit = torch.zeros(num_groups(ids), dtype=torch.long)
    return hit.index_add_(0, ids[member], flagged.cpu()[member].long()) > 0


def whole_groups(
    flagged: torch.Tensor, ids: torch.Tensor, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """bool ``[N]``: every member of each group that holds a ``flagged`` sample (and,
    with the bool ``[G]`` ``allowed``, is allowed); samples outside groups drop out."""
    member = ids >= 0
    hit = flagged_groups(flagged, ids)
    if hit.numel() == 0:
        return member
    if allowed is not None:
        hit &= allowed.cpu()
    return member & hit[ids.clamp(min=0)]


def count_through_groups(
    ranking: torch.Tensor, ids: torch.Tensor, m: int, allowed: torch.Tensor | None = None
) -> int:
    """How many samples :func:`whole_groups` flags when the top ``m`` of ``ranking``
    (dataset indices, most suspicious first) are flagged."""
    top = torch.zeros(ids.numel(), dtype=torch.bool)
    top[ranking.cpu()[: max(m, 0)]] = True
    return int(whole_groups(top, ids, allowed).sum())


def carry_count(
    ranking: torch.Tensor,
    ids: torch.Tensor,
    count: int,
    interval: tuple[int, int],
    allowed: torch.Tensor | None = None,
) -> tuple[int, tuple[int, int]]:
    """A per-sample count of bad samples and its interval, carried through the groups:
    :func:`count_through_groups` of each."""
    low, high = (count_through_groups(ranking, ids, m, allowed) for m in interval)
    return count_through_groups(ranking, ids, count, allowed), (low, high)


def as_rows(where: str, name: str, value: Any) -> torch.Tensor | None:
    """``value``, one row per sample as a tensor, a NumPy array or a (nested) list (of
    numbers, or of per-sample tensors or arrays of one shape, as a Dataset yields them), as
    a tensor (``None`` stays ``None``), or a ``TypeError`` naming ``where`` and ``name``."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    try:
        if (
            isinstance(value, (list, tuple))
            and value
            and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in value)
        ):
            rows = [torch.as_tensor(v) for v in value]
            if all(r.numel() == 1 for r in rows):  # tensor([c]) per sample: [N], not [N, 1]
                rows = [r.reshape(()) for r in rows]
            return torch.stack(rows)
        # (through NumPy: torch.as_tensor made Python floats float32, and rows that differ
        # in float64, 0.1 and 0.1 + 1e-12, compared equal bit for bit)
        return torch.as_tensor(np.asarray(value) if isinstance(value, list | tuple) else value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"{where}: {name} must be a tensor, a NumPy array or a list with one row per "
            f"sample, got {type(value).__name__} ({exc}); for a Dataset, stack its rows "
            "(torch.stack([x for x, _ in dataset]))"
        ) from None


def check_class_labels(where: str, labels: torch.Tensor, classes: int | None) -> None:
    """Raise a ``ValueError`` unless ``labels`` are integer class indices below
    ``classes`` (when known), negative ones allowed (ignore_index: unlabelled). The check
    ``csl_fast.clean`` and ``csl_fast.detect.duplicates`` share: duplicates flagged float
    labels (0.2 vs 0.7) and labels past the tracker's classes as conflicts that clean then
    refused."""
    if not integer_labels(labels.dtype):
        raise ValueError(
            f"{where}: labels must be integer class indices, got {labels.dtype} of shape "
            f"{tuple(labels.shape)}; pass the labels the run trained on"
        )
    low, high = label_range(labels) if labels.numel() else (0, 0)
    if classes and high >= classes:
        # a group is relabelled to one of these labels: 99 would enter the plan. A
        # negative one (ignore_index: unlabelled) conflicts with none and never wins
        raise ValueError(
            f"{where}: labels must be class indices in [0, {classes}) (or negative for an "
            f"unlabelled sample, ignore_index), got values in [{low}, {high}]; pass the "
            "labels the run trained on"
        )


def check_rows(n: int, inputs: torch.Tensor | None, labels: torch.Tensor | None) -> None:
    """Raise a ``ValueError`` unless ``inputs`` and ``labels`` (tensors, when given:
    :func:`as_rows`) have one row per sample and ``labels`` comes with ``inputs``."""
    for arg, given in (("inputs", inputs), ("labels", labels)):
        if given is None:
            continue
        if given.layout != torch.strided or given.is_meta:
            kind = "meta" if given.is_meta else str(given.layout)
            raise ValueError(
                f"csl_fast.detect.duplicates: {arg} must be a dense tensor with data, got a "
                f"{kind} tensor (use .to_dense(), or the tensor the run trained on)"
            )
        if given.dim() == 0 or given.shape[0] != n:
            raise ValueError(
                f"csl_fast.detect.duplicates: {arg} must have one row per sample ({n}), got "
                f"shape {tuple(given.shape)}"
            )
        if given.numel() == 0 and n > 0:
            raise ValueError(
                f"csl_fast.detect.duplicates: the rows of {arg} are empty (shape "
                f"{tuple(given.shape)}): there is nothing to compare"
            )
    if labels is not None and inputs is None:
        raise ValueError(
            "csl_fast.detect.duplicates: labels= needs inputs= (the identical-input groups "
            "whose labels are compared)"
        )
