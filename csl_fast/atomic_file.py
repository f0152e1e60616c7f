"""Write a file so that its path always holds a complete old or new version.

Used by :meth:`csl_fast.CSLTracker.save` and for the tables a run's decisions are read from
(:meth:`csl_fast.cleaning.CleaningPlan.to_csv`, ``csl-fast rank --output``): a failure part
way (a full disk, a signal, a crash) keeps the previous file byte for byte instead of
leaving a truncated one that reads as a shorter plan.

The content goes to a temporary file beside the target, which is fsynced and renamed over
the target. Temporary files left by killed writes of the same target are removed by the
next write once stale (their writer process is gone, or they are older than
:data:`STALE_TEMP_SECONDS`); only names of this module's pattern, which holds the writer's
host and pid, are removed: a user's file such as ``.run.csl.backup01.tmp`` is never touched
(nor are the temporary files of csl_fast before tracker file version 2, named by
``tempfile.mkstemp``: nothing tells them from such a user's file, and a stale one is
harmless). A symlink at the path is **followed**: the file it points to is replaced and the
link is kept. Anything else that is not a regular file (a device such as ``/dev/null``, a
FIFO, a socket) is refused, not replaced. The new file's mode follows the umask, as for any
file the process creates.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import secrets
import socket
import stat
import time
import zlib
from collections.abc import Callable
from typing import BinaryIO, TextIO

__all__ = ["STALE_TEMP_SECONDS", "remove_stale_temps", "target_of", "write", "write_text"]

#: A temporary file older than this (seconds) is stale whoever wrote it.
STALE_TEMP_SECONDS = 15 * 60

_MAX_TEMP_STEM = 180  # bytes; a temporary name adds at most ~45 to it, NAME_MAX is 255


def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _temp_stem(base: str) -> str:
    """The target's name in its temporary files' names: ``base``, or, when ``base`` is
    too long to extend within NAME_MAX, its first 100 bytes and a digest of it (a target
    of 240 bytes, a legal name, could not be saved: the temporary name was too long)."""
    raw = os.fsencode(base)
    if len(raw) <= _MAX_TEMP_STEM:
        return base
    return f"{os.fsdecode(raw[:100])}~{hashlib.sha256(raw).hexdigest()[:16]}"


def _temp_pattern(base: str) -> re.Pattern[str]:
    # .STEM.<host crc32>-<pid>-<random>.tmp. Not tempfile.mkstemp's .NAME.<8 of [a-z0-9_]>.tmp
    # of saves before tracker file version 2: a user's ".run.csl.backup01.tmp" matches it.
    return re.compile(
        rf"\.{re.escape(_temp_stem(base))}\.(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-[0-9a-f]{{8}}\.tmp"
    )


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or no pid at all
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temps(target: str, now: float | None = None) -> list[str]:
    """Remove the temporary files that killed writes of ``target`` left beside it: files
    of the naming pattern only, and only stale ones (writer process gone on this host, or
    older than :data:`STALE_TEMP_SECONDS`). Returns the removed paths."""
    directory, base = os.path.split(target)
    directory = directory or "."
    pattern = _temp_pattern(base)
    now = time.time() if now is None else now
    host = _host_tag()
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        path = os.path.join(directory, name)
        try:
            age = now - os.lstat(path).st_mtime
        except OSError:
            continue
        dead = m["host"] == host and not _pid_alive(int(m["pid"]))
        if dead or age > STALE_TEMP_SECONDS:
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(path)
    return removed


def _error(exc: OSError, user_path: str, action: str, target: str | None = None) -> OSError:
    """``exc`` reworded for the user's path with what to do; same errno and class.
    ``target``: the file the write replaces, when ``user_path`` is a symlink to it."""
    hint = {
        errno.ENOSPC: "the disk is full: free some space or save elsewhere",
        errno.EDQUOT: "the disk quota is exceeded: free some space or save elsewhere",
        errno.ENOENT: "the folder does not exist: create it first",
        errno.ENOTDIR: "a part of the path is not a folder",
        errno.EACCES: "permission denied: choose a file and folder you can write to",
        errno.EPERM: "permission denied (an immutable file or folder?): choose another path",
        errno.EROFS: "the file system is read-only: save elsewhere",
        errno.EISDIR: "the path is a folder: give a file name",
        errno.EFBIG: "the file is too large for this file system or the process's limit",
    }.get(exc.errno, exc.strerror or str(exc))
    folder = os.path.dirname(target or os.path.abspath(user_path))
    linked = folder != os.path.dirname(os.path.abspath(user_path))
    if exc.errno == errno.ENOENT and linked and not os.path.isdir(folder):
        # a link into a folder that is not there: the link's own folder is
        hint = f"the link points into {folder!r}, which does not exist: create it first"
    elif exc.errno == errno.ENOENT and os.path.isdir(folder):
        # the folder is there but creating a file in it fails as if it were not (/proc)
        hint = (
            "the folder refuses new files (a virtual file system such as /proc?): write elsewhere"
        )
    # OSError(errno, text) is the errno's subclass (FileNotFoundError, PermissionError, ...).
    return OSError(exc.errno, f"cannot {action} to {user_path!r}: {hint}")


def target_of(user_path: str, action: str, example: str) -> str:
    """The file that writing to ``user_path`` replaces (a symlink followed), or an
    :class:`IsADirectoryError` when the path names a folder, a :class:`FileExistsError`
    when it names something else that is not a regular file. ``action`` words the error
    ("save the tracker"), ``example`` is a file name to suggest."""
    user_path = os.fsdecode(user_path)  # (bytes, as open() takes them)
    if not user_path:  # (realpath("") is the current folder: "it is a folder")
        raise FileNotFoundError(
            errno.ENOENT, f"cannot {action} to '': the path is empty; give a file name, e.g. "
            f"{example!r}", user_path,
        )  # fmt: skip
    # realpath drops a trailing separator: "out/" would be written as a file named "out".
    if user_path.endswith((os.sep, os.altsep or os.sep)):
        raise IsADirectoryError(
            errno.EISDIR,
            f"cannot {action} to {user_path!r}: it ends with a separator, so it names a "
            f"folder; give a file name, e.g. {os.path.join(user_path, example)!r}",
            user_path,
        )
    if descriptor_of(user_path) is not None:
        # realpath follows /dev/stdout to the file the shell redirected it to, and the
        # rename replaced that log with the output alone
        raise OSError(
            errno.EINVAL,
            f"cannot {action} to {user_path!r}: it names an open file descriptor (such as "
            "/dev/stdout), and an atomic write would replace the file behind it (a log that "
            "output is redirected to) with a new one; give a file name",
            user_path,
        )
    target = os.path.realpath(user_path)  # follow a symlink: replace what it points to
    if os.path.isdir(target):
        raise IsADirectoryError(
            errno.EISDIR, f"cannot {action} to {user_path!r}: it is a folder; give a file name",
            user_path,
        )  # fmt: skip
    _refuse_special(user_path, target, action)
    if os.path.isfile(target) and not os.stat(target).st_mode & 0o222:
        # the rename needs only the folder's permission: a write-protected file was
        # replaced all the same, and the new one writable again (its mode bits, not
        # os.access: as root, in a container or CI, that is always True)
        raise PermissionError(
            errno.EACCES,
            f"cannot {action} to {user_path!r}: the file is write-protected; make it "
            "writable (chmod u+w) or give another name",
            user_path,
        )
    return target


_STANDARD = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}
_DESCRIPTOR = re.compile(r"/(?:dev/fd|proc/(self|thread-self|\d+)/fd)/(\d+)")


def descriptor_of(path: str) -> int | None:
    """The number of this process's open file descriptor that ``path`` names
    (``/dev/stdout``, ``/dev/fd/N``, ``/proc/self/fd/N``, or a symlink to one of them);
    -1 for another process's; None for any other path."""
    path = os.path.abspath(os.fsdecode(path))
    for _ in range(40):  # (the kernel's limit on a chain of symlinks)
        if path in _STANDARD:
            return _STANDARD[path]
        found = _DESCRIPTOR.fullmatch(path)
        if found is not None:
            pid = found[1]
            own = pid is None or pid in ("self", "thread-self") or int(pid) == os.getpid()
            return int(found[2]) if own else -1
        try:
            link = os.readlink(path)
        except OSError:
            return None
        path = os.path.normpath(os.path.join(os.path.dirname(path), link))
    return None


_SPECIAL = (
    (stat.S_ISCHR, "a character device (such as /dev/null)"),
    (stat.S_ISBLK, "a block device (a disk)"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def special_kind(mode: int) -> str | None:
    """What a file of ``st_mode`` ``mode`` is when not a regular file (or a folder), in
    words; None for a regular file or a folder."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((text for test, text in _SPECIAL if test(mode)), "a special file")


def _refuse_special(user_path: str, target: str, action: str) -> None:
    """A :class:`FileExistsError` when ``target`` exists and is not a regular file: the
    rename would replace a device or FIFO with a regular file (as root, /dev/null)."""
    try:
        mode = os.stat(target).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the rename replaced the looping link with a file
            raise OSError(
                errno.ELOOP,
                f"cannot {action} to {user_path!r}: it is a symbolic link in a loop (it never "
                "reaches a file); fix or remove the link, or give another name",
                user_path,
            ) from None
        return  # nothing there yet (or unreadable: the write reports that)
    what = special_kind(mode)
    if what is None:
        return
    shown = user_path if target == os.path.abspath(user_path) else f"{user_path} -> {target}"
    raise FileExistsError(
        errno.EEXIST,
        f"cannot {action} to {shown!r}: it is {what}, not a regular file, and writing would "
        "replace it with a file; give the path of a regular file or a new name",
        user_path,
    )


def write(user_path: str, target: str, fill: Callable[[BinaryIO], None], action: str) -> None:
    """Replace ``target`` (from :func:`target_of`) with what ``fill`` writes to a binary
    file, atomically; an :class:`OSError` names ``user_path`` and what to do."""
    user_path = os.fsdecode(user_path)
    directory, base = os.path.split(target)
    remove_stale_temps(target)
    tmp = os.path.join(
        directory, f".{_temp_stem(base)}.{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    )
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise _error(exc, user_path, action, target) from None
    try:
        try:
            f = os.fdopen(fd, "wb")
        except BaseException:  # (then nothing owns fd)
            os.close(fd)
            raise
        with f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _error(exc, user_path, action, target) from None
        raise
    try:  # make the rename itself durable (POSIX; best effort elsewhere)
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def write_text(user_path: str, fill: Callable[[TextIO], None], action: str, example: str) -> None:
    """:func:`write` for text: ``fill`` writes UTF-8 text with newlines as given (what
    ``open(path, "w", encoding="utf-8", newline="")`` would take)."""
    user_path = os.fsdecode(user_path)
    target = target_of(user_path, action, example)

    def binary(f: BinaryIO) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        try:
            fill(text)
            text.flush()
        finally:
            text.detach()  # f stays open: write() fsyncs and closes it

    write(user_path, target, binary, action)
