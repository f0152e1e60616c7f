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
