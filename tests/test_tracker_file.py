"""The tracker file format under attack: truncation, bit flips, wrong types, huge sizes,
foreign and old files, and what save() does with temp files, symlinks, umask and errors.

Every refused load must raise TrackerFileError naming the file and leave the tracker it
was loading into bit-identical."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import random
import sys
import time
import warnings
import zipfile

import pytest
import torch
from cli_calls import user_error

import csl_fast
from csl_fast import CSLTracker, TrackerFileError, TrackerStateError, atomic_file, tracker_file
from csl_fast.atomic_file import STALE_TEMP_SECONDS
from csl_fast.tracker_buffers import _MINUS_ONE
from csl_fast.tracker_file import (
    FORMAT_VERSION,
    MAGIC,
    VERSION_BUFFERS,
    TrackerFileNotFoundError,
    UnverifiedTrackerFileWarning,
)

N = 7


def _filled(n: int = N, history: bool = True, seed: int = 0) -> CSLTracker:
    """A tracker whose every buffer and history holds distinct values (counts integral,
    integers from their floor up, and the relations between buffers every tracker keeps,
    csl_fast.tracker_invariants: what a tracker can hold)."""
    g = torch.Generator().manual_seed(seed)
    t = CSLTracker(n, 3, history=history)
    for name, buf in t.buffers().items():
        if buf.dtype == torch.bool:
            buf.copy_(torch.rand(n, generator=g) > 0.5)
        elif name.endswith("_count"):  # from 1: every sample presented, scored, recorded
            buf.copy_(torch.randint(1, 9, (n,), generator=g))
        elif buf.is_floating_point():
            buf.copy_(torch.rand(n, generator=g) * 10)
        else:  # learned epochs up to the epoch (2 after the end_epoch calls below), classes < 3
            high = 3 if name in ("learned_epoch", "suggest_label") else 9
            buf.copy_(torch.randint(-1 if name in _MINUS_ONE else 0, high, (n,), generator=g))
    b = t.buffers()
    b["learned_epoch"].copy_(torch.where(t.last_correct, t.learned_epoch.clamp(min=0), -1))
    b["forgetting"].copy_(torch.minimum(t.forgetting, t.csl_count.int() - t.last_correct.int()))
    b["suggest_hits"].copy_(torch.minimum(t.suggest_hits, t.csl_count.int()))
    b["suggest_votes"].copy_(torch.minimum(t.suggest_votes, t.suggest_hits))
    b["suggest_label"].copy_(torch.where(t.suggest_hits > 0, t.suggest_label.clamp(min=0), -1))
    t.input_grad_first_epoch = 0
    t.end_epoch()
    t.end_epoch()
    t.end_eval_pass()
    t.csl_sum[0] = float("nan")  # data, not corruption
    return t


def _snapshot(t: CSLTracker) -> tuple:
    state = t.state_dict()
    tensors = {k: v.clone() for k, v in state.pop("buffers").items()}
    tensors.update({"h/" + k: v.clone() for k, v in state.pop("histories").items()})
    return state, tensors


def _assert_same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        x, y = a[1][k], b[1][k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), k  # bitwise, NaN too


def _write_v2(path, state: dict, empty_entries: list | None = None) -> None:
    """The documented version 2 layout, written independently of csl_fast's writer (so
    any field can hold anything); ``empty_entries``: more table entries, of no bytes."""
    state = dict(state)
    tensors = [(f"buffers/{k}", v) for k, v in state.pop("buffers").items()]
    tensors += [(f"histories/{k}", v) for k, v in state.pop("histories").items()]
    state["byteorder"] = sys.byteorder
    state["tensors"] = [[k, str(v.dtype)[6:], list(v.shape)] for k, v in tensors]
    state["tensors"] += empty_entries or []
    header = json.dumps(state).encode()
    prefix = MAGIC + len(header).to_bytes(8, "little") + header
    payload = b"".join(v.contiguous().numpy().tobytes() for _, v in tensors)
    with open(path, "wb") as f:
        f.write(prefix + payload + _checksum(prefix, payload))


def _checksum(prefix: bytes, payload: bytes, chunk: int = 16 << 20) -> bytes:
    """SHA-256 of SHA-256(prefix) and of each 16 MiB chunk of the payload."""
    parts = [hashlib.sha256(prefix).digest()]
    parts += [
        hashlib.sha256(payload[i : i + chunk]).digest() for i in range(0, len(payload), chunk)
    ]
    return hashlib.sha256(b"".join(parts)).digest()


def _refused(path, target: CSLTracker, match: str | None = None) -> TrackerFileError:
    before = _snapshot(target)
    with pytest.raises(TrackerFileError) as info:
        target.load(path)
    _assert_same(before, _snapshot(target))
    assert str(path) in str(info.value)
    assert "weights_only" not in str(info.value)
    if match is not None:
        assert match in str(info.value), str(info.value)
    with pytest.raises(TrackerFileError):
        CSLTracker.from_file(path)
    return info.value


@pytest.fixture
def saved(tmp_path):
    t = _filled()
    path = tmp_path / "run.csl"
    t.save(path)
    return t, path


def test_from_file_names_the_arguments_the_file_sets(saved):
    """history= or dtype= met the constructor's "got multiple values for keyword argument"."""
    _, path = saved
    with pytest.raises(TypeError, match=r"^history is set by the saved state.*drop history="):
        CSLTracker.from_file(path, history=False)
    with pytest.raises(TypeError, match=r"^dtype, num_classes are set by the saved state"):
        csl_fast.load(path, dtype=torch.float64, num_classes=3)
    assert CSLTracker.from_file(path, backend="cpu").num_samples == N


def test_roundtrip_bitwise(saved, tmp_path):
    t, path = saved
    u = CSLTracker.from_file(path)
    _assert_same(_snapshot(t), _snapshot(u))
    v = _filled(seed=1)
    v.load(path)
    _assert_same(_snapshot(t), _snapshot(v))
    assert path.read_bytes().startswith(MAGIC)
    data = path.read_bytes()
    header = json.loads(data[16 : 16 + int.from_bytes(data[8:16], "little")])
    assert header["version"] == FORMAT_VERSION == 3
    # a bytes path, as load takes it (save raised a TypeError)
    t.save(os.fsencode(tmp_path / "b.csl"))
    _assert_same(_snapshot(t), _snapshot(CSLTracker.from_file(os.fsencode(tmp_path / "b.csl"))))


def test_a_path_that_is_no_path_is_named_by_the_function_given_it():
    # os.fspath's "expected str, bytes or os.PathLike object, not NoneType" named neither
    t = _filled()
    calls = (
        ("CSLTracker.save", t.save),
        ("CSLTracker.load", t.load),
        (r"csl_fast.load \(CSLTracker.from_file\)", csl_fast.load),
    )
    for name, fn in calls:
        for bad in (None, 3):
            with pytest.raises(TypeError, match=rf"^{name}: path must be a file path .*pathlib"):
                fn(bad)


def _read_into(monkeypatch) -> list[int]:
    """The addresses the next file reads fill (spied on the payload reader)."""
    import numpy as np

    filled: list[int] = []
    real = tracker_file._read_hashing

    def spy(f, views):
        filled.extend(np.frombuffer(v, dtype=np.uint8).ctypes.data for v in views if len(v))
        return real(f, views)

    monkeypatch.setattr(tracker_file, "_read_hashing", spy)
    return filled


def test_from_file_reads_straight_into_the_new_trackers_buffers(saved, monkeypatch):
    """A new tracker's buffers receive the payload (no second copy of the file in memory);
    an existing tracker's do not (it changes only after the whole file is verified)."""
    t, path = saved
    filled = _read_into(monkeypatch)
    u = CSLTracker.from_file(path)
    _assert_same(_snapshot(t), _snapshot(u))
    live = {b.data_ptr() for b in u.buffers().values() if b.numel()}
    assert live and live <= set(filled)
    filled.clear()
    v = _filled(seed=1)
    before = {b.data_ptr() for b in v.buffers().values()}
    v.load(path)
    _assert_same(_snapshot(t), _snapshot(v))
    assert filled and not before & set(filled)


def test_a_file_refused_after_its_payload_was_read_leaves_no_tracker(saved, monkeypatch):
    """The payload went into a new tracker's buffers; the checksum then fails: from_file
    raises, and what it had built is not returned half-read."""
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x01  # the last payload byte
    path.write_bytes(bytes(data))
    filled = _read_into(monkeypatch)
    with pytest.raises(TrackerFileError, match="checksum"):
        CSLTracker.from_file(path)
    assert filled


def test_checksum_chunks_across_16_mib(tmp_path):
    """A payload of two 16 MiB chunks and a bit: the format's definition (written by the
    independent helper above) and csl_fast's writer agree, and a flip in any chunk fails."""
    t = CSLTracker(200_000, 3)
    t.csl_sum.copy_(torch.arange(200_000.0))
    t.csl_count.fill_(5)
    t.forgetting.fill_(3)
    ours, theirs = tmp_path / "ours.csl", tmp_path / "theirs.csl"
    t.save(ours)
    _write_v2(theirs, t.state_dict())
    assert len(ours.read_bytes()) > (16 << 20) + 1000
    for path in (ours, theirs):
        u = CSLTracker.from_file(path)
        assert torch.equal(u.csl_sum, t.csl_sum) and torch.equal(u.forgetting, t.forgetting)
    data = ours.read_bytes()
    hlen = int.from_bytes(data[8:16], "little")
    assert data[-32:] == _checksum(data[: 16 + hlen], data[16 + hlen : -32])
    target = CSLTracker(200_000, 3)
    for pos in (16 + hlen + (16 << 20) - 1, 16 + hlen + (16 << 20), len(data) - 33):
        bad = bytearray(data)
        bad[pos] ^= 0x80
        theirs.write_bytes(bytes(bad))
        _refused(theirs, target, "checksum")


def test_small_chunks_every_flip(tmp_path, monkeypatch):
    """With 64-byte chunks (the reader's and the writer's), a small tracker spans many
    chunks: it round-trips, and a flip of any byte is still refused."""
    monkeypatch.setattr(tracker_file, "_CHUNK", 64)
    t = _filled()
    path = tmp_path / "run.csl"
    t.save(path)
    _assert_same(_snapshot(t), _snapshot(CSLTracker.from_file(path)))
    data = path.read_bytes()
    target = _filled(seed=11)
    for pos in range(0, len(data), 3):
        bad = bytearray(data)
        bad[pos] ^= 0x04
        path.write_bytes(bytes(bad))
        _refused(path, target)


def test_every_truncation_is_refused(saved):
    _, path = saved
    data = path.read_bytes()
    target = _filled(seed=2)
    cut = path.with_name("cut.csl")
    offsets = sorted(
        {*range(0, len(data), max(1, len(data) // 150)), *range(len(data) - 40, len(data))}
    )
    for k in offsets:
        cut.write_bytes(data[:k])
        _refused(cut, target)
    cut.write_bytes(data + b"\0")  # extended by one byte
    _refused(cut, target, "truncated or corrupted")


def test_every_flipped_bit_is_refused(saved):
    _, path = saved
    data = path.read_bytes()
    target = _filled(seed=3)
    rng = random.Random(0)
    flipped = path.with_name("flip.csl")
    for pos in range(len(data)):  # one random bit of every byte
        bad = bytearray(data)
        bad[pos] ^= 1 << rng.randrange(8)
        flipped.write_bytes(bytes(bad))
        _refused(flipped, target)


def test_payload_flip_names_the_checksum(saved):
    _, path = saved
    bad = bytearray(path.read_bytes())
    bad[-40] ^= 0x10  # inside the last tensor
    path.write_bytes(bytes(bad))
    _refused(path, _filled(seed=4), "checksum")


_WRONG = {
    "num_samples": ["7", 7.0, True, None, -1, 2**70],
    "num_classes": ["3", 0, 3.5, True],
    "dtype": ["float16", 32, None, "int32"],
    "history": [1, "true", None],
    "epoch": ["2", 2.0, -1, None, 2**40, True],
    "eval_passes": ["1", -3, 1.5, None],
    "input_grad_first_epoch": ["0", -2, 99, 0.0],
    "format": ["csl_fast.Other", None, 1],
    "version": ["2", 0, None, 2.0],
}


@pytest.mark.parametrize("field", list(_WRONG))
def test_wrong_type_in_every_field(tmp_path, field):
    t = _filled()
    target = _filled(seed=5)
    for value in [*_WRONG[field], "<missing>"]:
        state = t.state_dict()
        if value == "<missing>":
            del state[field]
        else:
            state[field] = value
        path = tmp_path / f"{field}.csl"
        _write_v2(path, state)
        exc = _refused(path, target)
        if field == "num_samples" and value == "7":
            assert "must be an int" in str(exc) and "got str '7'" in str(exc)
        before = _snapshot(target)
        with pytest.raises(TrackerStateError):
            target.load_state_dict(state)
        _assert_same(before, _snapshot(target))


def test_wrong_tensors(tmp_path):
    t = _filled()
    target = _filled(seed=6)
    cases = {
        "short buffer": lambda s: s["buffers"].update(csl_sum=torch.zeros(N - 1)),
        "2-D buffer": lambda s: s["buffers"].update(csl_sum=torch.zeros(N, 1)),
        "int csl": lambda s: s["buffers"].update(csl_sum=torch.zeros(N, dtype=torch.int32)),
        "float bool": lambda s: s["buffers"].update(last_correct=torch.zeros(N)),
        "float int": lambda s: s["buffers"].update(forgetting=torch.zeros(N)),
        "missing buffer": lambda s: s["buffers"].pop("forgetting"),
        "unknown buffer": lambda s: s["buffers"].update(extra=torch.zeros(N)),
        "history columns": lambda s: s["histories"].update(loss_history=torch.zeros(2, N + 1)),
        "history 1-D": lambda s: s["histories"].update(loss_history=torch.zeros(N)),
        "missing history": lambda s: s["histories"].pop("eval_loss_history"),
    }
    for mutate in cases.values():
        state = t.state_dict()
        state["buffers"] = dict(state["buffers"])
        state["histories"] = dict(state["histories"])
        mutate(state)
        path = tmp_path / "bad.csl"
        _write_v2(path, state)
        _refused(path, target)
        before = _snapshot(target)
        with pytest.raises(TrackerStateError):
            target.load_state_dict(state)
        _assert_same(before, _snapshot(target))


def test_a_header_dtype_other_than_its_buffers_is_refused(tmp_path):
    """A header that said float32 over float64 buffers (or the reverse) loaded as a tracker
    of the header's dtype, the values rounded into it without a word (audit helper-110)."""
    target = _filled(seed=7)
    for declared, actual in (("float32", torch.float64), ("float64", torch.float32)):
        state = _filled().state_dict()
        state["dtype"] = declared
        state["buffers"] = {
            k: v.to(actual) if v.is_floating_point() else v for k, v in state["buffers"].items()
        }
        path = tmp_path / f"{declared}.csl"
        _write_v2(path, state)
        _refused(path, target, match=f"header says dtype '{declared}'")
    one = _filled().state_dict()  # and one float buffer of the other dtype among the rest
    one["buffers"] = {**one["buffers"], "csl_sum": one["buffers"]["csl_sum"].double()}
    _write_v2(tmp_path / "one.csl", one)
    _refused(tmp_path / "one.csl", target, match="torch.float32, torch.float64")


def test_loading_onto_the_meta_device_is_refused(tmp_path):
    """It returned a tracker holding none of the file's values (audit helper-110); scores
    and detection then failed with torch's "cannot be called on meta tensors"."""
    path = tmp_path / "t.csl"
    _filled().save(path)
    for load in (
        lambda: CSLTracker.from_file(path, device="meta"),
        lambda: csl_fast.load(path, device=torch.device("meta")),
    ):
        with pytest.raises(ValueError, match="meta tensor holds no data"):
            load()
    meta = CSLTracker(N, 3, history=True, device="meta")
    with pytest.raises(TrackerFileError, match="meta device, which holds no data"):
        meta.load(path)
    with pytest.raises(TrackerStateError, match="meta device, which holds no data"):
        meta.load_state_dict(_filled().state_dict())


def test_huge_sizes_allocate_nothing(tmp_path, monkeypatch):
    t = _filled()
    made = []
    real_init = CSLTracker.__init__

    def counting_init(self, *a, **k):
        made.append(a)
        real_init(self, *a, **k)

    monkeypatch.setattr(CSLTracker, "__init__", counting_init)
    path = tmp_path / "huge.csl"
    for n in (30_000_000, 10**11, 2**62):
        state = t.state_dict()
        state["num_samples"] = n  # the buffers in the file stay [7]
        _write_v2(path, state)
        with pytest.raises(TrackerFileError, match=str(path)):
            CSLTracker.from_file(path)
    assert made == []
    # a tensor table that claims more bytes than the file holds
    t.save(path)
    data = path.read_bytes()
    hlen = int.from_bytes(data[8:16], "little")
    header = json.loads(data[16 : 16 + hlen])
    header["tensors"][0][2] = [10**11]
    raw = json.dumps(header).encode()
    path.write_bytes(data[:8] + len(raw).to_bytes(8, "little") + raw + data[16 + hlen :])
    with pytest.raises(TrackerFileError, match="describes"):
        CSLTracker.from_file(path)
    path.write_bytes(data[:8] + (2**63).to_bytes(8, "little") + data[16:])
    with pytest.raises(TrackerFileError, match="header"):
        CSLTracker.from_file(path)
    assert made == []


def test_hostile_headers(tmp_path):
    """Headers that parse badly or deeply: refused as corrupted, never another exception."""
    target = _filled()
    for i, raw in enumerate(
        [b"[" * 200_000 + b"]" * 200_000, b"\xff\xfe", b"[]", b'{"tensors": [[1, 2]]}', b"NaN"]
    ):
        body = MAGIC + len(raw).to_bytes(8, "little") + raw
        path = tmp_path / f"h{i}.csl"
        path.write_bytes(body + _checksum(body, b""))
        _refused(path, target, "corrupted")


def test_foreign_empty_and_missing(tmp_path):
    target = _filled()
    for name, content in {
        "empty.csl": b"",
        "text.csl": b"hello world\n",
        "random.csl": os.urandom(3000),
        "magic-only.csl": MAGIC,
    }.items():
        (tmp_path / name).write_bytes(content)
        _refused(tmp_path / name, target)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.csl")
    _refused(tmp_path / "foreign.csl", target, "format tag")
    # torch.save of a state_dict: the message said "only version 1 files are zip archives"
    torch.save(_filled(seed=1).state_dict(), tmp_path / "state.pt")
    before = _snapshot(target)
    advice = r"a torch.save archive .*load_state_dict\(torch.load\(path, weights_only=True\)\)"
    for load in (target.load, CSLTracker.from_file):
        with pytest.raises(TrackerFileError, match=advice):
            load(tmp_path / "state.pt")
    _assert_same(before, _snapshot(target))
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # what the message advises
    target.load_state_dict(state)
    _assert_same(_snapshot(_filled(seed=1)), _snapshot(target))
    with pytest.raises(TrackerFileNotFoundError) as info:
        target.load(tmp_path / "missing.csl")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, TrackerFileError)
    _refused(tmp_path, target, "folder")


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_no_pickle_is_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    buf = io.BytesIO()
    torch.save({"format": "csl_fast.CSLTracker", "version": 1, "x": _Boom()}, buf)
    (tmp_path / "evil.csl").write_bytes(buf.getvalue())
    _refused(tmp_path / "evil.csl", _filled())
    (tmp_path / "raw.csl").write_bytes(pickle.dumps(_Boom()))
    _refused(tmp_path / "raw.csl", _filled())
    assert not (tmp_path / "pwned").exists()


def _v1_state(t: CSLTracker) -> dict:
    state = t.state_dict()
    state["version"] = 1
    state["buffers"] = {k: v for k, v in state["buffers"].items() if k in VERSION_BUFFERS[1]}
    return state


def test_version1_file_loads_with_warning_and_fills_new_buffers(tmp_path):
    t = _filled()
    path = tmp_path / "v1.csl"
    torch.save(_v1_state(t), path)
    with pytest.warns(UnverifiedTrackerFileWarning, match="version 1"):
        u = CSLTracker.from_file(path)
    fresh = CSLTracker(N, 3, history=True)
    for name, buf in u.buffers().items():
        want = t.buffers()[name] if name in VERSION_BUFFERS[1] else fresh.buffers()[name]
        assert torch.equal(buf.view(torch.uint8), want.view(torch.uint8)), name
    assert u.epoch == t.epoch
    torch.testing.assert_close(u.input_grad_history, t.input_grad_history, equal_nan=True)
    # resaving upgrades it: no warning any more
    u.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CSLTracker.from_file(path)


def test_version1_warning_as_error_leaves_the_tracker_unchanged(tmp_path):
    """Under -W error the warning was raised after the tracker had been overwritten: a
    load that raised had changed it."""
    path = tmp_path / "v1.csl"
    torch.save(_v1_state(_filled()), path)
    target = _filled(seed=8)
    before = _snapshot(target)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedTrackerFileWarning)
        with pytest.raises(UnverifiedTrackerFileWarning):
            target.load(path)
    _assert_same(before, _snapshot(target))


def test_version1_file_half_load_and_zip_bomb(tmp_path):
    t = _filled()
    target = _filled(seed=7)
    for mutate in (lambda s: s.pop("epoch"), lambda s: s.update(epoch="2")):
        state = _v1_state(t)
        mutate(state)
        torch.save(state, tmp_path / "v1.csl")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnverifiedTrackerFileWarning)
            _refused(tmp_path / "v1.csl", target, "epoch")
    # a deflated archive (torch.save never writes one) could inflate without bound
    torch.save(_v1_state(t), tmp_path / "v1.csl")
    with (
        zipfile.ZipFile(tmp_path / "v1.csl") as src,
        zipfile.ZipFile(tmp_path / "deflated.csl", "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    _refused(tmp_path / "deflated.csl", target)


def test_a_file_of_many_labels_and_no_samples_builds_one_empty_tracker(
    tmp_path, monkeypatch, capsys
):
    # A version 2 file lacks label_prob_sum, whose initial value was read from a new
    # one-sample tracker of the file's num_labels: a 1.5 KB file of N = 0 claiming
    # num_labels = 2**36 (no payload) asked for 256 GiB, and csl-fast rank printed an
    # "internal error" traceback. The guard below stands for that allocation.
    labels = 2**36
    state = CSLTracker(0, 3, num_labels=2).state_dict()
    state.update(version=2, num_labels=labels)
    state["buffers"] = {
        k: torch.empty(0, labels) if k == "label_csl_sum" else v
        for k, v in state["buffers"].items()
        if k != "label_prob_sum"
    }
    path = tmp_path / "labels.csl"
    _write_v2(path, state)
    built = []
    init = CSLTracker.__init__

    def guarded(self, num_samples, *args, **kwargs):
        built.append(num_samples)
        assert num_samples * (kwargs.get("num_labels") or 1) < 2**20, "a multi-GiB tracker"
        init(self, num_samples, *args, **kwargs)

    monkeypatch.setattr(CSLTracker, "__init__", guarded)
    t = csl_fast.load(path)
    assert built == [0] and t.num_labels == labels
    assert t.buffers()["label_prob_sum"].shape == (0, labels)
    line = user_error(capsys, 3, "rank", str(path))
    assert "the run recorded nothing" in line


def _v1_views(case: str) -> tuple[dict, CSLTracker]:
    """A version 1 state whose tensors describe more than they store, and a tracker of its
    kind to load it into."""
    n = 4096
    t = CSLTracker(n, 3, history=case == "expanded history rows")
    state = _v1_state(t)
    buffers = state["buffers"]
    if case == "expanded buffers":  # each a stride-0 view of one stored value
        state["buffers"] = {k: v[:1].clone().expand(n) for k, v in buffers.items()}
    elif case == "expanded history rows":  # E rows, one stored
        rows = 64
        state.update(epoch=rows, eval_passes=rows)
        row = torch.full((1, n), float("nan"), dtype=torch.float16)
        state["histories"] = {
            **state["histories"],
            "loss_history": row.expand(rows, n),
            "eval_loss_history": row.expand(rows, n),
        }
    elif case == "buffers sharing one storage":  # contiguous views, each stored whole
        zeros = torch.zeros(n)
        state["buffers"] = {k: zeros if v.dtype == zeros.dtype else v for k, v in buffers.items()}
    else:  # sparse: no values stored
        state["buffers"] = {k: v.to_sparse() for k, v in buffers.items()}
    return state, CSLTracker(n, 3, history=t.history)


@pytest.mark.parametrize(
    "case",
    ["expanded buffers", "expanded history rows", "buffers sharing one storage", "sparse"],
)
def test_a_version1_file_describing_more_than_it_stores_is_refused_before_allocating(
    tmp_path, request, case
):
    # The zip-bomb guard counted the bytes stored only, while the tracker is allocated for
    # the shapes the tensors claim: a 7.9 KB file of stride-0 buffers (expand) described a
    # tracker of 2**33 samples (32 GiB a buffer), a 104 KB file of stride-0 history rows
    # loaded as 712 MiB of rows, views of one storage count it once per view, and a sparse
    # tensor holds no values. torch.save of a tracker writes dense contiguous tensors, each
    # stored whole (the version 1 files of the tests above still load). Here
    # N = 4096: the file loaded (sparse: after a tracker was built for it).
    state, target = _v1_views(case)
    path = tmp_path / "views.csl"
    torch.save(state, path)
    if case != "sparse":  # in memory the same state is the caller's own: it loads
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (sparse invariant checks)
            target.load_state_dict(state)
        target = CSLTracker(target.num_samples, 3, history=target.history)
    match = "sparse" if case == "sparse" else "describe" if "sharing" in case else "strides"
    _refused(path, target, match)
    built = request.getfixturevalue("trackers_built")  # (the loads above build them)
    with pytest.raises(TrackerFileError, match=match):
        csl_fast.load(path)
    assert built == []


def test_newer_version(tmp_path):
    t = _filled()
    state = t.state_dict()
    state["version"] = FORMAT_VERSION + 1
    _write_v2(tmp_path / "new.csl", state)
    _refused(tmp_path / "new.csl", _filled(seed=8), "newer csl_fast")


_MADE: list[int] = []  # the num_samples of each _Counted constructed


class _Counted(CSLTracker):
    """Records the size of every tracker constructed (the allocation to bound)."""

    def __init__(self, num_samples, *args, **kwargs):
        _MADE.append(num_samples)
        super().__init__(num_samples, *args, **kwargs)


def _state_of(n: int) -> dict:
    state = CSLTracker(n, 3).state_dict()
    state["buffers"] = dict(state["buffers"])
    return state


_FEW_BUFFERS = {
    # a small file claiming a large N: one buffer of the many a tracker allocates (2e6
    # samples in a 1.9 MiB file grew the process by 170 MiB before the refusal)
    "one buffer": lambda s: {"last_correct": s["buffers"]["last_correct"]},
    "one buffer missing": lambda s: {k: v for k, v in s["buffers"].items() if k != "csl_sum"},
    # a float64 buffer of the tracker stored in a byte per sample
    "a float buffer stored as bool": lambda s: {
        **s["buffers"],
        "csl_sum": torch.zeros(len(s["buffers"]["csl_sum"]), dtype=torch.bool),
    },
}


@pytest.mark.parametrize("case", list(_FEW_BUFFERS))
def test_a_file_lacking_buffers_is_refused_before_a_tracker_is_allocated(tmp_path, case):
    n = 5000
    state = _state_of(n)
    state["buffers"] = {
        k: v.double() if v.is_floating_point() else v for k, v in _FEW_BUFFERS[case](state).items()
    }
    state["dtype"] = "float64"
    _write_v2(tmp_path / "few.csl", state)
    _MADE.clear()
    with pytest.raises(TrackerFileError, match=r"few\.csl.*(lacks entries|not a float)"):
        _Counted.from_file(tmp_path / "few.csl")
    assert n not in _MADE  # refused before the allocation, not after it
    _MADE.clear()
    tracker_file.save(_filled(), tmp_path / "whole.csl")
    _Counted.from_file(tmp_path / "whole.csl")
    assert _MADE == [N]  # a whole file: one tracker, read into directly


@pytest.mark.parametrize("dim", [2**63, 2**64, 2**70])
def test_a_zero_size_entry_with_a_dimension_past_int64_is_refused(tmp_path, dim):
    """A valid checksum and a table that accounts for every byte; the entry's size is 0,
    but torch takes no dimension past int64: a TypeError escaped."""
    path = tmp_path / "huge.csl"
    t = _filled()
    _write_v2(path, t.state_dict(), [["buffers/extra", "float32", [dim, 0]]])
    _refused(path, t, "corrupted tracker file")
    with pytest.raises(TrackerFileError, match=r"huge\.csl"):
        csl_fast.load(path)
    with pytest.raises(TrackerFileError, match=r"huge\.csl"):
        csl_fast.merge([path])


def test_a_torch_checkpoint_holding_a_tracker_state_names_its_key_and_the_fix(tmp_path):
    t = _filled()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "csl": t.state_dict(), "step": 3}, path)
    fix = r"holds a tracker state at ckpt\['csl'\].*load_state_dict\(ckpt\['csl'\]\)"
    with pytest.raises(TrackerFileError, match=fix):
        csl_fast.load(path)
    _refused(path, CSLTracker(N, 3, history=True), "at ckpt['csl']")
    restored = CSLTracker(N, 3, history=True)
    restored.load_state_dict(torch.load(path)["csl"])  # the fix the message gives works
    _assert_same(_snapshot(t), _snapshot(restored))
    # a Lightning checkpoint keeps CSLCallback's state a level down
    torch.save({"callbacks": {"CSLCallback[csl_tracker]": t.state_dict()}}, path)
    lightning = r"load_state_dict\(ckpt\['callbacks'\]\['CSLCallback\[csl_tracker\]'\]\)"
    with pytest.raises(TrackerFileError, match=lightning):
        csl_fast.load(path)
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    with pytest.raises(TrackerFileError, match=r"keys \['model'\]\) without a tracker state"):
        csl_fast.load(path)


# --------------------------------------------------------------------------- save
def _temp_names(folder) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.endswith(".tmp"))


def test_save_removes_only_stale_temps_of_its_target(tmp_path):
    t = _filled()
    host = atomic_file._host_tag()
    old = time.time() - STALE_TEMP_SECONDS - 60
    dead = f".run.csl.{host}-999999999-0123abcd.tmp"  # no such pid
    huge = f".run.csl.{host}-{2**80}-0123abcd.tmp"  # not even a pid
    live = f".run.csl.{host}-{os.getpid()}-0123abcd.tmp"  # a save in progress
    other_target = f".other.csl.{host}-999999999-0123abcd.tmp"
    # A user's files, however old. The first two also have the names of tempfile.mkstemp,
    # which saves before file version 2 used: they were removed on age alone.
    user_files = [".run.csl.backup01.tmp", ".run.csl.ab_cd123.tmp", ".run.csl.notes.tmp"]
    for name in (dead, huge, live, other_target, *user_files):
        (tmp_path / name).write_bytes(b"x")
    for name in user_files:
        os.utime(tmp_path / name, (old, old))
    t.save(tmp_path / "run.csl")
    assert _temp_names(tmp_path) == sorted([live, other_target, *user_files])
    os.utime(tmp_path / live, (old, old))  # stale whoever wrote it
    t.save(tmp_path / "run.csl")
    assert _temp_names(tmp_path) == sorted([other_target, *user_files])
    assert all((tmp_path / name).read_bytes() == b"x" for name in user_files)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_save_refuses_a_fifo_and_keeps_it(tmp_path):
    """The temporary file was renamed over whatever was at the path: a FIFO or a device
    (as root, /dev/null) became a regular file."""
    import stat

    t = _filled()
    fifo = tmp_path / "pipe.csl"
    os.mkfifo(fifo)
    link = tmp_path / "run.csl"
    link.symlink_to(fifo)  # a symlink is followed: to the FIFO, refused alike
    for path in (fifo, link):
        with pytest.raises(FileExistsError, match=r"is a FIFO.*not a regular file.*give") as info:
            t.save(path)
        assert str(path) in str(info.value)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["pipe.csl", "run.csl"]


def test_save_to_a_long_legal_name(tmp_path):
    """A 240-byte name is legal (NAME_MAX is 255), but its temporary name was not: the
    save failed with 'File name too long'."""
    t = _filled()
    path = tmp_path / ("r" * 236 + ".csl")
    path.write_bytes(b"old")  # the name itself is fine
    t.save(path)
    _assert_same(_snapshot(t), _snapshot(CSLTracker.from_file(path)))
    stem = atomic_file._temp_stem(path.name)
    dead = f".{stem}.{atomic_file._host_tag()}-999999999-0123abcd.tmp"  # a killed save's
    (tmp_path / dead).write_bytes(b"x")
    t.save(path)
    assert os.listdir(tmp_path) == [path.name]


def test_save_follows_symlink_and_umask(tmp_path):
    t = _filled()
    real = tmp_path / "store" / "real.csl"
    real.parent.mkdir()
    link = tmp_path / "run.csl"
    link.symlink_to(real)
    old = os.umask(0o077)
    try:
        t.save(link)
    finally:
        os.umask(old)
    assert link.is_symlink() and real.is_file()
    assert (real.stat().st_mode & 0o777) == 0o600
    _assert_same(_snapshot(t), _snapshot(CSLTracker.from_file(link)))
    old = os.umask(0o022)
    try:
        t.save(tmp_path / "plain.csl")
    finally:
        os.umask(old)
    assert ((tmp_path / "plain.csl").stat().st_mode & 0o777) == 0o644


def test_save_errors_name_the_path_and_the_fix(tmp_path, monkeypatch):
    t = _filled()
    missing = tmp_path / "no" / "such" / "run.csl"
    with pytest.raises(FileNotFoundError, match=r"run\.csl.*does not exist: create it"):
        t.save(missing)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        t.save(tmp_path)
    # A trailing separator names a folder: "out/" was written as a file named "out".
    for name in ("out/", "run.csl/"):
        with pytest.raises(IsADirectoryError, match=r"ends with a separator.*give a file name"):
            t.save(f"{tmp_path}/{name}")
    assert sorted(os.listdir(tmp_path)) == []
    path = tmp_path / "run.csl"
    t.save(path)
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tracker_file.os, "fsync", full)
    with pytest.raises(OSError, match="disk is full") as info:
        _filled(seed=9).save(path)
    assert info.value.errno == errno.ENOSPC and str(path) in str(info.value)
    assert ".tmp" not in str(info.value)
    monkeypatch.undo()
    assert path.read_bytes() == before and _temp_names(tmp_path) == []

    real_open = os.open

    def denied(p, *a, **k):
        if str(p).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", p)
        return real_open(p, *a, **k)

    monkeypatch.setattr(tracker_file.os, "open", denied)
    with pytest.raises(PermissionError, match="permission denied: choose a file and") as info:
        t.save(path)
    assert str(path) in str(info.value) and ".tmp" not in str(info.value)
    monkeypatch.undo()
    if os.path.isdir("/proc/self"):  # a folder that exists but takes no new file
        with pytest.raises(FileNotFoundError, match=r"refuses new files.*/proc"):
            t.save("/proc/self/run.csl")


class _Interrupt(Exception):
    """Raised inside a save, as a crash or a signal handler's exception would be."""


def _raise_at(calls: int, error: BaseException, real):
    """A stand-in for ``real`` that raises ``error`` at its call number ``calls``."""
    seen = [0]

    def fake(*args, **kwargs):
        seen[0] += 1
        if seen[0] == calls:
            raise error
        return real(*args, **kwargs)

    return fake


_INTERRUPTS = {
    "opening the temporary file": ("os.fdopen", 1, _Interrupt()),
    "writing the first tensor": ("_tensor_bytes", 1, _Interrupt()),
    "writing a middle tensor": ("_tensor_bytes", 9, KeyboardInterrupt()),
    "writing the checksum": ("_Checksum.digest", 1, _Interrupt()),
    "fsync": ("os.fsync", 1, KeyboardInterrupt()),
    "renaming": ("os.replace", 1, OSError(errno.EIO, "Input/output error")),
}


@pytest.mark.parametrize("case", list(_INTERRUPTS))
def test_an_interrupted_save_keeps_the_previous_file_and_leaves_nothing(tmp_path, case):
    """A save that fails at any point (an exception, Ctrl-C, an I/O error) leaves the
    previous file byte-identical, no temporary file and no open file descriptor."""
    where, calls, error = _INTERRUPTS[case]
    path = tmp_path / "run.csl"
    _filled().save(path)
    before = path.read_bytes()
    owner, name = where.rsplit(".", 1) if "." in where else ("", where)
    target = {"os": tracker_file.os, "_Checksum": tracker_file._Checksum, "": tracker_file}[owner]
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(target, name, _raise_at(calls, error, getattr(target, name)))
        with pytest.raises(type(error)):
            _filled(seed=3).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["run.csl"]
    assert len(os.listdir("/proc/self/fd")) == fds
    _filled(seed=3).save(path)  # and the next save works
    _assert_same(_snapshot(_filled(seed=3)), _snapshot(CSLTracker.from_file(path)))


def test_save_refuses_a_state_load_would_refuse_and_keeps_the_previous_file(tmp_path):
    # record() alone fills the per-sample statistics but not the CSL sums and counts
    # (accumulate adds those first): such a file could never be loaded again.
    from csl_fast.stats import NUM_STATS, Stat

    tracker = CSLTracker(10, 3)
    path = tmp_path / "run.csl"
    tracker.save(path)
    before = path.read_bytes()
    stats = torch.rand(NUM_STATS, 4)
    stats[Stat.OTHER_ARGMAX] = torch.tensor([0.0, 1.0, 2.0, -1.0])
    tracker.record(torch.arange(4), stats)
    with pytest.raises(TrackerStateError, match=r"not written.*update\(\)") as exc:
        tracker.save(path)
    assert "restore it from a copy" not in str(exc.value)  # nothing was restored
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.csl"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and /proc (Linux)")
def test_a_pipe_or_fifo_is_refused_as_not_a_regular_file(tmp_path):
    """A pipe (csl-fast rank /dev/stdin, <(cat run.csl)) was called truncated or corrupted
    (its size reads 0), and a FIFO nobody wrote to blocked the load forever."""
    import threading

    fifo = tmp_path / "run.csl"
    os.mkfifo(fifo)
    read, write = os.pipe()
    try:
        for path in (fifo, f"/proc/self/fd/{read}"):
            errors: list[Exception] = []

            def load(path=path, errors=errors) -> None:
                try:
                    csl_fast.load(path)
                except Exception as exc:
                    errors.append(exc)

            th = threading.Thread(target=load, daemon=True)
            th.start()
            th.join(10)
            assert not th.is_alive(), f"loading {path} blocked"
            assert isinstance(errors[0], TrackerFileError)
            assert "(named pipe), not a regular file" in str(errors[0])
    finally:
        os.close(read)
        os.close(write)


def test_a_file_loads_whatever_the_default_device(tmp_path):
    # torch.set_default_device("cuda"), common in LLM code, sent the reader's tensors
    # there: "can't convert cuda:0 device type tensor to numpy" (meta stands in for it)
    t = CSLTracker(4, 3, history=True)
    csl_fast.accumulate(torch.randn(3, 3), torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3]), t)
    t.end_epoch()
    path = str(tmp_path / "t.csl")
    t.save(path)
    with torch.device("meta"):
        loaded = csl_fast.load(path)
        again = CSLTracker(4, 3, history=True, device="cpu")
        again.load(path)
    for got in (loaded, again):
        for name, buf in t.buffers().items():
            assert torch.equal(got.buffers()[name], buf), name


def test_a_save_refusal_gives_the_advice_of_its_cause(tmp_path):
    # each ended with the advice about record() called alone, and the meta one with "load
    # it into a tracker on 'cpu'"
    path = str(tmp_path / "t.csl")
    with pytest.raises(TrackerStateError, match=r"meta device, which holds no values to save$"):
        CSLTracker(4, 2, device="meta").save(path)
    t = CSLTracker(4, 2, history=True)
    t.end_epoch()
    t.epoch = 5
    with pytest.raises(TrackerStateError, match=r"set by hand.*end_epoch\(\) instead$") as err:
        t.save(path)
    assert "record()" not in str(err.value)
    assert not os.path.exists(path)
    # history=False with input-gradient rows, an epoch set past the rows a state keeps
    t = CSLTracker(4, 2)
    t.watch(torch.randn(4, 3), torch.arange(4)).sum().backward()
    t.epoch = 2**22
    with pytest.raises(TrackerStateError, match=r"input_grad_first_epoch.*set by hand") as err:
        t.save(path)
    assert "record()" not in str(err.value) and not os.path.exists(path)
