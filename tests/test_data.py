"""csl_fast.data.IndexedDataset: tuple/dict samples, workers, shuffling, DistributedSampler."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Subset

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    from csl_fast.data import IndexedDataset


class Pairs(Dataset):
    """Sample i is (x = [i, 2i] float, y = i % 3)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.classes = ["a", "b", "c"]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return torch.tensor([float(i), 2.0 * i]), i % 3


class Dicts(Pairs):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return {"input": x, "target": y}


class NoLen(Dataset):
    def __getitem__(self, i):
        return i


class Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


def _check(x, y, idx):
    assert idx.dtype == torch.int64
    assert torch.equal(x[:, 0], idx.float())
    assert torch.equal(y, idx % 3)


def test_tuple_dict_and_plain_samples():
    ds = IndexedDataset(Pairs(5))
    x, y, i = ds[3]
    assert i == 3 and y == 0 and x[0] == 3
    assert ds[-1][-1] == 4
    d = IndexedDataset(Dicts(5))[2]
    assert d["index"] == 2 and d["target"] == 2
    assert IndexedDataset([10, 11, 12])[1] == (11, 1)
    assert IndexedDataset([(1, 2)], index_key="k")[0] == (1, 2, 0)
    assert IndexedDataset(Dicts(3), index_key="idx")[1]["idx"] == 1
    assert len(ds) == 5
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(KeyError, match="index_key"):
        IndexedDataset([{"index": 0}])[0]
    with pytest.raises(TypeError, match="index_key must be a str, got int"):
        IndexedDataset(Dicts(3), index_key=3)


def test_forwards_attributes_and_pickles():
    ds = IndexedDataset(Pairs(4))
    assert ds.classes == ["a", "b", "c"]
    with pytest.raises(AttributeError):
        ds.nothing_here  # noqa: B018
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[2][-1] == 2 and len(clone) == 4
    # a write reaches the base too: ds.classes = ... on the wrapper alone left the base's
    # samples as they were (ds.targets = noisy read back noisy, ds[i] kept the clean labels)
    ds.classes = ["x", "y", "z"]
    assert ds.dataset.classes == ["x", "y", "z"] and "classes" not in vars(ds)
    ds.index_key = "idx"  # the wrapper's own
    assert ds.index_key == "idx" and not hasattr(ds.dataset, "index_key")


def test_clear_errors():
    with pytest.raises(TypeError, match="__len__"):
        IndexedDataset(NoLen())
    with pytest.raises(TypeError, match="IterableDataset"):
        IndexedDataset(Stream())
    ds = IndexedDataset(Pairs(3))
    # ds[True] was ds[1]: a bool is an int to Python, not a dataset index
    for bad in (True, torch.tensor(False), 1.0):
        with pytest.raises(TypeError, match="the index must be an int"):
            ds[bad]
    assert ds[np.int64(2)][2] == 2 and ds[torch.tensor(-1)][2] == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_workers_shuffle(workers):
    ds = IndexedDataset(Pairs(23))
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=workers)
    seen = []
    for x, y, idx in loader:
        _check(x, y, idx)
        seen += idx.tolist()
    assert sorted(seen) == list(range(23))


def test_dict_batches_collate():
    loader = DataLoader(IndexedDataset(Dicts(7)), batch_size=3, shuffle=True)
    for b in loader:
        _check(b["input"], b["target"], b["index"])


def test_distributed_sampler_pads_with_real_indices():
    ds = IndexedDataset(Pairs(11))
    seen = []
    for rank in range(3):
        sampler = DistributedSampler(ds, num_replicas=3, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(1)
        for x, y, idx in DataLoader(ds, batch_size=2, sampler=sampler):
            _check(x, y, idx)
            seen += idx.tolist()
    assert len(seen) == 12  # padded to a multiple of 3: one sample repeats
    assert set(seen) == set(range(11))


def test_subset_of_wrapper_keeps_dataset_indices():
    ds = Subset(IndexedDataset(Pairs(10)), [7, 2, 9])
    assert [ds[k][-1] for k in range(3)] == [7, 2, 9]
