"""csl_fast.atomic_file on its own: what the path may hold (the tracker's saves:
tests/test_tracker_file.py)."""

from __future__ import annotations

import os
import stat

import pytest

from csl_fast import atomic_file


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_write_text_refuses_a_fifo_and_leaves_it(tmp_path):
    """CleaningPlan.to_csv and ``csl-fast rank --output`` write through write_text: a FIFO
    at the path was replaced by a regular file."""
    fifo = tmp_path / "plan.csv"
    os.mkfifo(fifo)
    with pytest.raises(FileExistsError, match=r"write the plan to .*plan\.csv.*is a FIFO"):
        atomic_file.write_text(str(fifo), lambda f: f.write("x\n"), "write the plan", "plan.csv")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["plan.csv"]


def test_target_of_accepts_a_regular_file_a_new_name_and_a_dangling_symlink(tmp_path):
    (tmp_path / "old.csv").write_text("old")
    (tmp_path / "dangling.csv").symlink_to(tmp_path / "new.csv")
    for name in ("old.csv", "fresh.csv", "dangling.csv"):
        atomic_file.write_text(str(tmp_path / name), lambda f: f.write("x"), "write", "a.csv")
    assert (tmp_path / "old.csv").read_text() == "x" == (tmp_path / "new.csv").read_text()
    assert (tmp_path / "dangling.csv").is_symlink()


def test_a_link_into_a_missing_folder_names_that_folder(tmp_path, monkeypatch):
    """The link's own folder exists; the one it points into does not: the error read "the
    folder refuses new files (a virtual file system such as /proc?)"."""
    monkeypatch.chdir(tmp_path)
    os.symlink(tmp_path / "runs" / "2024" / "x.csl", "latest.csl")
    with pytest.raises(FileNotFoundError, match=r"points into .*runs/2024', which does not"):
        atomic_file.write_text("latest.csl", lambda f: f.write("x"), "save", "a.csl")
    with pytest.raises(FileNotFoundError, match="the folder does not exist: create it first"):
        atomic_file.write_text("no/x.csl", lambda f: f.write("x"), "save", "a.csl")


def test_a_bytes_path_is_written_as_open_takes_it(tmp_path):
    # csl_fast.load(b"run.csl") worked; save(b"run.csl") raised a TypeError on str.endswith
    path = os.fsencode(tmp_path / "a.csv")
    atomic_file.write_text(path, lambda f: f.write("x"), "write", "a.csv")
    assert (tmp_path / "a.csv").read_text() == "x"


def test_a_symlink_loop_is_refused_and_left(tmp_path):
    # open() fails with ELOOP; the rename replaced the user's link with a regular file
    (tmp_path / "a.csl").symlink_to("b.csl")
    (tmp_path / "b.csl").symlink_to("a.csl")
    with pytest.raises(OSError, match=r"'.*a\.csl': it is a symbolic link in a loop"):
        atomic_file.write_text(str(tmp_path / "a.csl"), lambda f: f.write("x"), "write", "a.csl")
    assert (tmp_path / "a.csl").is_symlink() and sorted(os.listdir(tmp_path)) == ["a.csl", "b.csl"]


def test_a_write_protected_file_is_refused_and_kept(tmp_path):
    # the rename needs only the folder's permission: a 0444 file was replaced, and the new
    # one was writable again (as root too, where os.access said it was writable)
    path = tmp_path / "run.csl"
    path.write_bytes(b"kept")
    path.chmod(0o444)
    with pytest.raises(PermissionError, match="the file is write-protected; make it writable"):
        atomic_file.write_text(str(path), lambda f: f.write("new"), "save", "x.csv")
    assert path.read_bytes() == b"kept"


def test_an_empty_path_is_named_as_empty():
    # realpath("") is the current folder: "it is a folder"
    with pytest.raises(FileNotFoundError, match="the path is empty; give a file name"):
        atomic_file.target_of("", "save the tracker", "run.csl")
