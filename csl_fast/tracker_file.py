r"""The :class:`~csl_fast.CSLTracker` file format: save and load (the checks of the state
itself: :mod:`csl_fast.tracker_state`).

A tracker file (format version 3, written by :meth:`CSLTracker.save`; version 2 files
have the same layout and are read too) is::

    offset 0   8 bytes   magic b"\x93CSLFAST"
    offset 8   8 bytes   H, the header length (unsigned little-endian)
    offset 16  H bytes   header: UTF-8 JSON object (metadata, counters and the tensor table)
    then                 the payload: every tensor's raw bytes, in the table's order,
                         without gaps
    last       32 bytes  the checksum: SHA-256 of the concatenation of SHA-256(the first
                         16 + H bytes) and the SHA-256 of each 16 MiB chunk of the payload
                         (the last chunk shorter), so that chunks hash in parallel

The header holds ``format``, ``version``, ``num_samples``, ``num_classes``, ``num_labels``
(absent in files written before per-label buffers existed: read as ``None``), ``dtype``,
``history``, ``epoch``, ``eval_passes``, ``eval_pass_presentations`` (absent in files
written before it was kept: read as None, unknown), ``input_grad_first_epoch``, ``sequences``
(absent in files written before the flag existed: read as ``False``), ``runs`` (absent in
files written before merges counted their runs: read as 1), ``byteorder`` and
``tensors``: ``[name, dtype, shape]`` triples with names ``buffers/<name>`` and
``histories/<name>``. Nothing in it is executable (no pickle), and the reader checks, in
this order and before allocating more than the file's own size or touching a tracker: the
magic, that the header parses and its tensor table accounts for exactly the bytes the file
holds, the checksum (so a flipped bit anywhere is refused), then every field's type and
range and every tensor's dtype and shape against the metadata. Every failure is a
:class:`TrackerFileError` that names the file.

:meth:`CSLTracker.from_file` reads the payload straight into the new tracker's CPU buffers
once the metadata has passed and the table holds every buffer the tracker has, of its shape
and kind (so that the tracker allocated before the checksum is about the file's size, not
what a small file's header claims): the new tracker is returned only after every check,
and it needs about the file's size in memory. :meth:`CSLTracker.load` into an existing tracker
reads the file whole into tensors of its own first, so the tracker changes only after
every check; that takes the file's size beside the tracker for a moment
(``benchmarks/results/load_scale.md``).

A tracker with ``num_labels`` stores its ``[N, L]`` per-label buffers in the same table; a
csl_fast from before per-label buffers refuses such a file (an unknown buffer). Version 3
added ``label_prob_sum``; a version 2 file (one per-label buffer, ``label_csl_sum``)
loads with it at NaN (the sum over the presentations already made is unknown, and stays
NaN as training goes on), which multi-label detection reads as "not recorded".

Version 1 files (``torch.save`` zip archives, no checksum) are still read, through
``torch.load(weights_only=True)`` after checks that the archive is uncompressed and no
larger than the file, and that its tensors are dense, contiguous and stored whole,
together describing no more bytes than the file holds (as ``torch.save`` of a tracker
wrote them: a view repeating a stored value is refused before a tracker is allocated for
its shape); they load with a :class:`UnverifiedTrackerFileWarning`. Buffers
introduced after a file's version (:data:`VERSION_BUFFERS`) are filled with their initial
values (``label_prob_sum``: NaN, above).

Saving writes a temporary file beside the target, fsyncs it and renames it over the
target, so the file at the path is always a complete old or new state
(:mod:`csl_fast.atomic_file`: how killed saves' temporary files are cleaned up, symlinks,
the file's mode).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from . import atomic_file, huge_pages
from .buffer_locks import buffer_lock
from .tracker_state import (  # re-exported: the format's names in one place
    FORMAT_NAME,
    FORMAT_VERSION,
    VERSION_BUFFERS,
    TrackerFileError,
    TrackerFileNotFoundError,
    TrackerStateError,
    UnverifiedTrackerFileWarning,
    _is_int,
    apply_state,
    checked_state,
    from_state,
    is_state,
    keys_text,
    load_state_dict,
    new_tracker_for,
    state_dict,
    tracker_path,
    validate_state,
)

if TYPE_CHECKING:
    from .tracker import CSLTracker

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAGIC",
    "VERSION_BUFFERS",
    "TrackerFileError",
    "TrackerFileNotFoundError",
    "TrackerStateError",
    "UnverifiedTrackerFileWarning",
    "from_file",
    "from_state",
    "load",
    "load_state_dict",
    "read_file",
    "save",
    "state_dict",
]

MAGIC = b"\x93CSLFAST"  # 0x93: not ASCII, so no text file and no zip archive starts so
_ZIP_MAGIC = b"PK\x03\x04"  # version 1 files (torch.save)
_DIGEST = 32
# The format versions written in this binary layout (version 1 files are zip archives).
_BINARY_VERSIONS = tuple(range(2, FORMAT_VERSION + 1))
_MAX_HEADER = 1 << 20  # a real header is a few KB
_CHUNK = 16 << 20  # part of the format: the payload's checksum chunks


_FILE_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "int32": torch.int32,
    "bool": torch.bool,
}


# ============================================================================ writing
def _tensor_bytes(t: torch.Tensor) -> memoryview | bytes:
    if t.numel() == 0:
        return b""
    return memoryview(t.contiguous().reshape(-1).numpy()).cast("B")


def _file_path(fn: str, path: Any) -> str:
    """``path`` (a str, bytes or ``os.PathLike``) as a str; os.fspath's TypeError for
    anything else ("expected str, bytes or os.PathLike object, not NoneType") named
    neither the function nor the argument."""
    if not isinstance(path, str | bytes | os.PathLike):
        raise TypeError(
            f"{fn}: path must be a file path (a str, bytes or os.PathLike such as "
            f"pathlib.Path), got {type(path).__name__}"
        )
    return os.fsdecode(path)


def save(tracker: CSLTracker, path: str | os.PathLike) -> None:
    """:meth:`CSLTracker.save` (see the module docstring)."""
    user_path = _file_path("CSLTracker.save", path)  # (bytes too, as load takes them)
    target = atomic_file.target_of(user_path, "save the tracker", "tracker.csl")

    def write(f: BinaryIO) -> None:
        # the tracker's lock while its buffers are read and written out, not while the
        # file is fsynced and renamed: recording threads waited for the disk
        with buffer_lock(tracker._buffers["csl_sum"]):
            prefix, tensors = _payload(tracker, user_path)
            f.write(prefix)
            checksum = _Checksum(prefix)
            for _, t in tensors:
                data = _tensor_bytes(t)
                f.write(data)
                checksum.update(data)
        f.write(checksum.digest())

    atomic_file.write(user_path, target, write, "save the tracker")


# Why a live tracker holds what a load refuses, by what was refused.
_BUFFER_ADVICE = (
    "Some buffers were written without the others: record() or record_sequences() called "
    "alone (they leave the CSL sums and counts to accumulate; record batches with update() "
    "or csl_fast.accumulate), csl=tracker.csl_sum passed to accumulate without "
    "count=tracker.csl_count, stats of another class count passed to update() on CUDA (a "
    "suggested label past num_classes), or a buffer assigned by hand"
)
_HISTORY_ADVICE = (
    "tracker.epoch (or eval_passes) was set by hand, so the histories no longer hold the one "
    "row per closed epoch (or eval pass) that end_epoch() (end_eval_pass()) appends: close "
    "epochs with end_epoch() instead"
)


def _epochs_set_by_hand(refusal: str) -> bool:
    """Whether ``validate_state``'s ``refusal`` of a live tracker is one that setting
    ``tracker.epoch`` by hand makes: history rows that do not match the epochs, or more
    epochs of input-gradient rows than a state keeps (which got the buffers' advice)."""
    return "rows but the state has" in refusal or "'input_grad_first_epoch' =" in refusal


def _payload(tracker: CSLTracker, user_path: str) -> tuple[bytes, list[tuple[str, torch.Tensor]]]:
    """The file's magic and header, and its tensors (CPU, contiguous), of a state a load
    would accept; else :class:`TrackerStateError`."""
    if tracker.device.type == "meta":  # (the load advice, "load it onto 'cpu'", said more)
        raise TrackerStateError(
            f"CSLTracker.save: not written to {user_path!r}: the tracker is on the meta "
            "device, which holds no values to save"
        )
    state = state_dict(tracker)
    try:
        # what load would refuse is not written: the file would keep the run unloadable
        validate_state(tracker, state)
    except TrackerStateError as exc:
        # a live tracker was not restored from anything: the load advice does not apply
        what = str(exc).split("; no tracker holds that")[0].split("; the state was edited")[0]
        raise TrackerStateError(
            f"CSLTracker.save: not written to {user_path!r}, a load would refuse it: {what}. "
            + (_HISTORY_ADVICE if _epochs_set_by_hand(what) else _BUFFER_ADVICE)
        ) from None
    tensors = [(f"buffers/{k}", v) for k, v in state.pop("buffers").items()]
    tensors += [(f"histories/{k}", v) for k, v in state.pop("histories").items()]
    tensors = [(k, v.detach().cpu().contiguous()) for k, v in tensors]
    state["byteorder"] = sys.byteorder
    state["tensors"] = [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors]
    header = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + len(header).to_bytes(8, "little") + header, tensors


# ============================================================================ reading
def _open(path: str) -> Any:
    try:
        # the reader checks every length against the file's size, which a pipe gives as 0
        # ("truncated or corrupted"), and opening a FIFO no one writes to waited forever
        what = atomic_file.special_kind(os.stat(path).st_mode)
    except OSError:
        what = None  # open() says what is wrong
    if what is not None:
        raise TrackerFileError(
            f"{path}: it is {what}, not a regular file: a tracker file is read with its size "
            "known; write it to a file (e.g. cat ... > run.csl) and give that path"
        )
    try:
        return open(path, "rb")  # closed by the caller's with
    except FileNotFoundError:
        raise TrackerFileNotFoundError(f"csl_fast: no tracker file at {path!r}") from None
    except IsADirectoryError:
        raise TrackerFileError(f"{path}: is a folder, not a tracker file") from None
    except OSError as exc:
        raise TrackerFileError(f"{path}: cannot read it: {exc.strerror or exc}") from None


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    """A tracker file's verified state dict (CPU tensors); nothing is checked against a
    tracker yet. Raises :class:`TrackerFileError` (:class:`TrackerFileNotFoundError` when
    there is no file)."""
    return _read(_file_path("csl_fast.tracker_file.read_file", path), None)


# Given the state a file describes (its metadata; tensors on the meta device), a new
# tracker whose CPU buffers the payload may be read into, or None.
_Receiver = Callable[[dict[str, Any]], "CSLTracker | None"]


def _read(path: str, receiver: _Receiver | None) -> dict[str, Any]:
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(16)
        if head.startswith(MAGIC):
            return _read_v2(path, f, size, head, receiver)
        if head.startswith(_ZIP_MAGIC):
            return _read_v1(path, f, size)
    raise TrackerFileError(
        f"{path}: not a csl_fast tracker file (it does not start with the tracker file "
        "signature; empty, another format, or damaged at the start)"
    )


def _read_v2(
    path: str, f: Any, size: int, head: bytes, receiver: _Receiver | None
) -> dict[str, Any]:
    if len(head) < 16:
        raise TrackerFileError(f"{path}: truncated tracker file ({size} bytes)")
    hlen = int.from_bytes(head[8:16], "little")
    if hlen > min(_MAX_HEADER, size - 16 - _DIGEST):
        raise TrackerFileError(
            f"{path}: truncated or corrupted tracker file (header of {hlen} bytes in a file "
            f"of {size})"
        )
    raw = f.read(hlen)
    try:
        header = json.loads(raw.decode("utf-8"))
        version = header.get("version")
        if _is_int(version) and version > FORMAT_VERSION:
            raise TrackerFileError(
                f"{path}: written in tracker format version {version} by a newer csl_fast, "
                f"or damaged (the checksum is read after the version); this csl_fast reads "
                f"versions up to {FORMAT_VERSION}. Upgrade csl_fast to load it, or restore "
                "the file from a copy"
            )
        table = header["tensors"]
        entries = []
        for name, dtype, shape in table:
            if not (
                isinstance(name, str)
                and isinstance(shape, list)
                and 1 <= len(shape) <= 2
                # (torch takes no size past int64, even in a shape with a zero)
                and all(_is_int(s) and 0 <= s < 2**63 for s in shape)
            ):
                raise ValueError(f"bad tensor entry {name!r}")
            entries.append((name, _FILE_DTYPES[dtype], shape))
    except TrackerFileError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise TrackerFileError(
            f"{path}: corrupted tracker file (its header does not parse: {type(exc).__name__})"
        ) from None
    sizes = [math.prod(s) * torch.empty((), dtype=d).element_size() for _, d, s in entries]
    payload = size - 16 - hlen - _DIGEST
    if sum(sizes) != payload:
        raise TrackerFileError(
            f"{path}: truncated or corrupted tracker file (its header describes "
            f"{sum(sizes)} bytes of tensors, the file holds {payload})"
        )
    state = {k: v for k, v in header.items() if k not in ("tensors", "byteorder")}
    state.update(buffers={}, histories={})
    slots = []  # (the state's dict, key) of each tensor, in the payload's order
    for name, dtype, shape in entries:
        kind, _, key = name.partition("/")
        where = state.get(kind) if kind in ("buffers", "histories") else None
        if where is None or key in where:
            raise TrackerFileError(f"{path}: invalid tracker file (tensor entry {name!r})")
        where[key] = torch.empty(shape, dtype=dtype, device="meta")
        slots.append((where, key))
    # From here every allocation is bounded by the file's size. A receiver's tracker is
    # new and private: the payload goes straight into its buffers, and it is dropped if
    # a check below fails.
    tracker = receiver(state) if receiver is not None else None
    live = tracker._buffers if tracker is not None and tracker.device.type == "cpu" else {}
    views = []
    for where, key in slots:
        meta = where[key]
        t = live.get(key) if where is state["buffers"] else None
        if t is None or t.dtype != meta.dtype or t.shape != meta.shape:
            # (torch.empty: no zero-filling of memory about to be overwritten; on the CPU
            # whatever torch.set_default_device says: the payload is read through NumPy)
            t = torch.empty(meta.shape, dtype=meta.dtype, device="cpu")
            huge_pages.advise(t)
        where[key] = t
        views.append(_tensor_bytes(t))
    chunks = _read_hashing(f, views)
    digest = f.read(_DIGEST)
    if chunks is None or len(digest) != _DIGEST:
        raise TrackerFileError(f"{path}: truncated tracker file (it changed while read?)")
    parts = [hashlib.sha256(head + raw).digest(), *chunks]
    if hashlib.sha256(b"".join(parts)).digest() != digest:
        raise TrackerFileError(
            f"{path}: corrupted tracker file: the checksum does not match its contents (a "
            "changed or damaged byte); restore it from a copy"
        )
    if header.get("byteorder") != sys.byteorder:
        raise TrackerFileError(
            f"{path}: written on a {header.get('byteorder')}-endian machine; this one is "
            f"{sys.byteorder}-endian"
        )
    if state.get("format") != FORMAT_NAME or state.get("version") not in _BINARY_VERSIONS:
        raise TrackerFileError(
            f"{path}: invalid tracker file (format {state.get('format')!r}, version "
            f"{state.get('version')!r} in a binary tracker file, which holds versions "
            f"{_BINARY_VERSIONS[0]}-{_BINARY_VERSIONS[-1]})"
        )
    # A tracker keeps every float buffer in its dtype; a header that says otherwise would
    # make a tracker of its dtype and round the values into it without a word.
    floats = {str(t.dtype) for t in state["buffers"].values() if t.is_floating_point()}
    if floats - {f"torch.{state.get('dtype')}"}:
        raise TrackerFileError(
            f"{path}: invalid tracker file (its header says dtype {state.get('dtype')!r} but "
            f"its float buffers are {', '.join(sorted(floats))})"
        )
    return state


class _Checksum:
    """The checksum of a file being written: chunk digests of the payload as it streams
    (see the module docstring)."""

    def __init__(self, prefix: bytes) -> None:
        self.parts = [hashlib.sha256(prefix).digest()]
        self.chunk = hashlib.sha256()
        self.filled = 0

    def update(self, data: memoryview | bytes) -> None:
        view = memoryview(data)
        while len(view):
            take = min(len(view), _CHUNK - self.filled)
            self.chunk.update(view[:take])
            self.filled += take
            view = view[take:]
            if self.filled == _CHUNK:
                self.parts.append(self.chunk.digest())
                self.chunk, self.filled = hashlib.sha256(), 0

    def digest(self) -> bytes:
        if self.filled:
            self.parts.append(self.chunk.digest())
            self.chunk, self.filled = hashlib.sha256(), 0
        return hashlib.sha256(b"".join(self.parts)).digest()


def _digest(parts: list[memoryview]) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


def _read_hashing(f: Any, views: list[memoryview | bytes]) -> list[bytes] | None:
    """Fill ``views`` in order from ``f`` while threads hash the payload's chunks already
    read (reading and SHA-256 release the GIL: a load costs about the read, not the read
    plus the hashing). A chunk may span views. Returns the chunk digests in order, or None
    when the file ends first."""
    pending, parts, filled = [], [], 0
    workers = max(1, min(4, (os.cpu_count() or 2) - 1))
    with ThreadPoolExecutor(workers) as pool:
        for view in views:
            pos = 0
            while pos < len(view):
                end = pos + min(len(view) - pos, _CHUNK - filled)
                part = memoryview(view)[pos:end]
                got = 0
                while got < len(part):  # readinto may return less than asked
                    k = f.readinto(part[got:])
                    if not k:
                        return None
                    got += k
                parts.append(part)
                filled += len(part)
                pos = end
                if filled == _CHUNK:
                    pending.append(pool.submit(_digest, parts))
                    parts, filled = [], 0
        if parts:
            pending.append(pool.submit(_digest, parts))
        return [p.result() for p in pending]


def _read_v1(path: str, f: Any, size: int) -> dict[str, Any]:
    # torch.load would allocate what the archive's entries claim and inflate compressed
    # ones: accept only what torch.save writes, stored entries within the file's size.
    try:
        f.seek(0)
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
        plain = all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        if not plain or sum(i.file_size for i in infos) > size:
            raise ValueError("compressed or oversized entries")
        f.seek(0)
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        # (Not torch's message: it can advise unsafe loading, which a tool must never print.)
        raise TrackerFileError(
            f"{path}: not a readable csl_fast tracker file (truncated, corrupted or another "
            f"format; {type(exc).__name__})"
        ) from None
    if not is_state(state):
        raise TrackerFileError(f"{path}: {_not_a_tracker_file(state)}")
    version = state.get("version")
    if _is_int(version) and version > FORMAT_VERSION:
        raise TrackerFileError(
            f"{path}: written in tracker format version {version} by a newer csl_fast; this "
            f"csl_fast reads versions up to {FORMAT_VERSION}. Upgrade csl_fast to load it."
        )
    if version in _BINARY_VERSIONS:  # torch.save(tracker.state_dict(), path)
        raise TrackerFileError(
            f"{path}: a torch.save archive of a tracker state_dict, not a tracker file: load "
            "it with tracker.load_state_dict(torch.load(path, weights_only=True)), and write "
            "tracker files with tracker.save(path)"
        )
    if version != 1:
        raise TrackerFileError(
            f"{path}: invalid tracker file (a zip archive of format version {version!r}; "
            "only version 1 files are zip archives)"
        )
    _check_v1_tensors(path, state, size)
    return dict(state)


def _check_v1_tensors(path: str, state: Mapping[str, Any], size: int) -> None:
    """Refuse a version 1 file whose tensors describe more than it stores: the tracker is
    allocated for the shapes they claim. torch.save of a tracker (each buffer a tensor of
    its own, each history stacked) writes dense contiguous tensors only, each stored
    whole; a stride-0 view of one stored value (``expand``) let a 7.9 KB file describe a
    tracker of 2**33 samples (32 GiB a buffer), and a sparse tensor stores no values."""
    described = 0
    for kind in ("buffers", "histories"):
        group = state.get(kind)
        if not isinstance(group, Mapping):
            continue  # (refused by the state's checks)
        for key, t in group.items():
            if not isinstance(t, torch.Tensor):
                continue
            name = f"{kind}/{key}"
            if t.layout != torch.strided:
                raise TrackerFileError(
                    f"{path}: invalid tracker file (tensor {name!r} has layout {t.layout}; a "
                    "tracker file holds dense tensors)"
                )
            nbytes = t.numel() * t.element_size()
            stored = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
            if not t.is_contiguous() or nbytes > stored:
                raise TrackerFileError(
                    f"{path}: invalid tracker file (tensor {name!r} of shape "
                    f"{list(t.shape)} is a view of {max(stored, 0)} stored bytes with strides "
                    f"{list(t.stride())}, not {nbytes} bytes stored contiguously, as a "
                    "tracker file holds them)"
                )
            described += nbytes
    if described > size:  # (views sharing one storage)
        raise TrackerFileError(
            f"{path}: invalid tracker file (its tensors describe {described} bytes, more "
            f"than the {size} bytes of the file)"
        )


def _not_a_tracker_file(archive: Any) -> str:
    """What a ``torch.save`` archive without a tracker's format tag is, and the fix."""
    untagged = f"not a csl_fast tracker file (no {FORMAT_NAME!r} format tag)"
    if not isinstance(archive, Mapping):
        return f"{untagged}: a torch.save archive of a {type(archive).__name__}"
    path = tracker_path(archive)
    if path is None:
        return (
            f"{untagged}: a torch checkpoint (a dict, keys {keys_text(archive)}) without a "
            "tracker state; write tracker files with tracker.save(path), or put "
            "tracker.state_dict() in the checkpoint"
        )
    return (
        f"{untagged}: a torch checkpoint that holds a tracker state at ckpt{path}; load it "
        f"with ckpt = torch.load(path) and "
        f"tracker.load_state_dict(ckpt{path}) (and write tracker files with "
        "tracker.save(path))"
    )


def _warn_unverified(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    if state.get("version") == 1:
        warnings.warn(
            f"{os.fspath(path)}: a tracker file of format version 1, which has no checksum: "
            "loaded unverified (a damaged byte would go unnoticed). Check the tracker, e.g. "
            "that its scores look as they did, before saving it again, which adds a "
            "checksum to whatever it holds.",
            UnverifiedTrackerFileWarning,
            stacklevel=4,
        )


def load(tracker: CSLTracker, path: str | os.PathLike) -> None:
    """:meth:`CSLTracker.load`: the whole file is read and checked before the tracker
    changes; raises :class:`TrackerFileError` (tracker unchanged)."""
    path = _file_path("CSLTracker.load", path)
    state = read_file(path)
    try:
        checked = checked_state(tracker, state)
    except TrackerStateError as exc:
        raise TrackerFileError(f"{os.fspath(path)}: {exc}") from None
    # Before the tracker changes: where warnings are errors (-W error) the file is then
    # refused whole, not raised about after the tracker was overwritten.
    _warn_unverified(path, state)
    apply_state(tracker, checked)


def from_file(
    cls: type[CSLTracker], path: str | os.PathLike, device: Any = "cpu", **kwargs: Any
) -> CSLTracker:
    """:meth:`CSLTracker.from_file`: the file's metadata is checked against its tensor
    table before a tracker is allocated; a binary file (version 2 or 3) is then read
    straight into the new tracker's CPU buffers (about the file's size in memory, not twice
    it) and verified before the tracker is returned."""
    path = _file_path("csl_fast.load (CSLTracker.from_file)", path)
    if str(device).startswith("meta"):
        # (a tracker made there is allowed, for its errors elsewhere: the file's values are not)
        raise ValueError(
            f"csl_fast: cannot load {os.fspath(path)} onto device {str(device)!r}: a meta "
            "tensor holds no data, so every value in the file would be dropped; load it onto "
            "'cpu' or a GPU"
        )
    made: list[CSLTracker] = []

    def receiver(described: dict[str, Any]) -> CSLTracker | None:
        try:
            made.append(new_tracker_for(cls, described, device, **kwargs))
        except TrackerStateError:
            return None  # refused below, after the checksum, by from_state
        return made[-1]

    state = _read(path, receiver)
    try:
        if made:
            tracker = made.pop()
            load_state_dict(tracker, state)
        else:
            tracker = from_state(cls, state, device, **kwargs)
    except TrackerStateError as exc:
        raise TrackerFileError(f"{os.fspath(path)}: invalid tracker file: {exc}") from None
    _warn_unverified(path, state)
    return tracker
