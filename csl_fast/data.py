"""Datasets that also yield each sample's dataset index, which CSL tracking needs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset, IterableDataset

from ._args import integer

# The wrapper's own attributes; every other one is the base dataset's.
_OWN = ("dataset", "index_key", "_len")


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that every sample also carries its dataset index.

    ``IndexedDataset(base)[i]`` is

    - ``(*base[i], i)`` when ``base[i]`` is a tuple or list, e.g. ``(x, y, i)``;
    - ``{**base[i], index_key: i}`` when it is a mapping (dict samples, e.g. Hugging Face);
    - ``(base[i], i)`` otherwise.

    ``i`` is a Python int, so the default collate turns it into an int64 tensor. Because
    the index is the one the sampler asked for, it is right with DataLoader workers,
    shuffling, ``DistributedSampler`` (padding repeats some samples: the tracker counts
    presentations, so mean statistics stay right) and ``Subset`` of the wrapper. Wrap the
    *training set you track*, with ``N = len(IndexedDataset(base))``.

    Attribute access not found on the wrapper is forwarded to ``base`` (``.targets``,
    ``.classes``, ...), and so is setting an attribute (``ds.targets = noisy`` or
    ``ds.transform = augment`` changes what ``base`` returns), but for the wrapper's own
    ``dataset`` and ``index_key``.

    Raises:
        TypeError: ``base`` is an ``IterableDataset`` or has no ``__len__`` (a tracker needs
            the dataset size ``N`` and indexable samples).
    """

    def __init__(self, dataset: Any, index_key: str = "index") -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                "IndexedDataset: an IterableDataset has no stable sample indices; wrap a "
                "map-style dataset (one with __getitem__ and __len__)"
            )
        try:
            length = len(dataset)
        except TypeError:
            raise TypeError(
                f"IndexedDataset: {type(dataset).__name__} has no __len__; csl_fast needs the "
                "dataset size N to size its per-sample buffers. Give the dataset a __len__ "
                "(or wrap it in a map-style Dataset)"
            ) from None
        if not hasattr(dataset, "__getitem__"):
            raise TypeError(f"IndexedDataset: {type(dataset).__name__} has no __getitem__")
        if not isinstance(index_key, str):
            # (3 made samples like {'a': 1, 3: 0}, which a collate would not name)
            raise TypeError(
                f"IndexedDataset: index_key must be a str, got {type(index_key).__name__}"
            )
        self.dataset = dataset
        self.index_key = index_key
        self._len = int(length)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: Any) -> Any:
        i = integer("IndexedDataset", "the index", index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"IndexedDataset: index {index} out of range for {self._len} samples")
        sample = self.dataset[i]
        if isinstance(sample, tuple | list):
            return (*sample, i)
        if isinstance(sample, Mapping):
            if self.index_key in sample:
                raise KeyError(
                    f"IndexedDataset: samples already have a {self.index_key!r} key; pass "
                    "another index_key"
                )
            return {**sample, self.index_key: i}
        return (sample, i)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails; guard the attributes set in __init__ so
        # unpickling (DataLoader workers with spawn) does not recurse.
        if name in _OWN or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Set on the wrapper, ds.targets = noisy read back noisy while ds[i] kept the
        # base's labels: training ran on the clean ones.
        if name in _OWN or name.startswith("__"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.dataset, name, value)

    def __repr__(self) -> str:
        return f"IndexedDataset({self.dataset!r}, index_key={self.index_key!r})"
