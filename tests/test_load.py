"""csl_fast.load: the one-call restore of a tracker file written by CSLTracker.save."""

import pytest
import torch

import csl_fast


def test_load_restores_a_saved_tracker(tmp_path):
    tracker = csl_fast.CSLTracker(7, 3, dtype=torch.float64, history=True)
    tracker.csl_sum.copy_(torch.arange(7.0))
    tracker.csl_count.fill_(2)
    tracker.end_epoch()
    path = tmp_path / "run.csl"
    tracker.save(path)
    restored = csl_fast.load(path)
    assert isinstance(restored, csl_fast.CSLTracker)
    assert (restored.num_samples, restored.num_classes) == (7, 3)
    assert restored.dtype == torch.float64 and restored.history and restored.epoch == 1
    torch.testing.assert_close(restored.csl_sum, tracker.csl_sum, rtol=0, atol=0)


def test_load_refuses_a_file_that_is_not_a_tracker(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a tracker")
    with pytest.raises(csl_fast.TrackerFileError, match=r"notes\.txt"):
        csl_fast.load(path)
