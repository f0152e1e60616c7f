"""csl_fast.scores: names, orientation (higher = more suspicious) and DataFrame."""

import math

import pytest
import torch

import csl_fast
from csl_fast.scores import SCORES, as_dataframe

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


GOOD = [5.0, 0.0, 0.0]  # class 0 predicted confidently
BAD = [0.0, 5.0, 0.0]  # class 1 predicted


def _tracker(eval_pass=False, input_grads=False):
    """4 samples, label 0, three epochs of hand-made logits:
    0 always right, 1 right then wrong (forgotten), 2 wrong then right, 3 always wrong."""
    t = csl_fast.CSLTracker(5, 3)  # sample 4 is never presented
    plan = {0: [GOOD] * 3, 1: [GOOD, GOOD, BAD], 2: [BAD, GOOD, GOOD], 3: [BAD] * 3}
    y = torch.zeros(4, dtype=torch.long)
    idx = torch.arange(4)
    for e in range(3):
        x = torch.tensor([plan[i][e] for i in range(4)], requires_grad=True)
        logits = t.watch(x, idx) if input_grads else x
        csl_fast.accumulate(logits, y, idx, t).backward()
        t.end_epoch()
        if eval_pass:
            logits = torch.tensor([plan[i][e] for i in range(4)])
            csl_fast.score_epoch(torch.nn.Identity(), [(logits, y, idx)], t)
    return t


def test_default_names_follow_what_was_recorded():
    assert list(csl_fast.scores(_tracker())) == [
        n for n in SCORES if n not in ("eval_csl", "learning_time", "loss_sensitivity")
    ]
    assert list(csl_fast.scores(_tracker(True, True))) == list(SCORES)
    assert set(SCORES) == {
        "csl", "csl_mean", "eval_csl", "final_loss", "forgetting", "threshold_learning_time",
        "learning_time", "loss_sensitivity", "aum", "in_confidence", "confidence",
        "variability", "logit_grad_norm",
    }  # fmt: skip


def test_values_and_orientation():
    t = _tracker(eval_pass=True, input_grads=True)
    s = csl_fast.scores(t)
    for name, v in s.items():
        assert v.shape == (5,) and math.isnan(float(v[4])), name  # never presented
    torch.testing.assert_close(s["csl"][:4], t.csl[:4])
    torch.testing.assert_close(s["eval_csl"][:4], t.eval_csl[:4])
    torch.testing.assert_close(s["aum"][:4], -t.aum[:4])
    torch.testing.assert_close(s["confidence"][:4], 1 - t.confidence[:4])
    torch.testing.assert_close(s["final_loss"][:4], t.eval_last_loss[:4])
    torch.testing.assert_close(s["in_confidence"][:4], 1 - t.eval_last_max_prob[:4])
    torch.testing.assert_close(s["logit_grad_norm"][:4], t.logit_grad_norm_mean[:4])
    torch.testing.assert_close(s["loss_sensitivity"][:4], t.loss_sensitivity[:4])
    # forgetting: sample 1 forgot once, sample 3 never learned -> max + 1 = 2
    assert s["forgetting"][:4].tolist() == [0.0, 1.0, 0.0, 2.0]
    # threshold learning time: 0 from epoch 0, 2 from epoch 1, 1 and 3 never (epoch + 1)
    assert s["threshold_learning_time"][:4].tolist() == [0.0, 4.0, 1.0, 4.0]
    # the always-wrong sample is the most suspicious for every loss-like score
    for name in (
        "csl",
        "csl_mean",
        "eval_csl",
        "final_loss",
        "aum",
        "confidence",
        "logit_grad_norm",
        "learning_time",
        "loss_sensitivity",
    ):
        v = s[name][:4]
        assert v[3] == v.max() and v[0] == v.min() and v[3] > v[0], name
    # in-confidence ignores the label: a confidently wrong prediction looks as sure as a
    # confidently right one (why "In Conf." is a weak detector)
    torch.testing.assert_close(s["in_confidence"][:4], s["in_confidence"][:1].expand(4))


def test_final_values_without_eval_pass_use_last_presentation():
    t = _tracker()
    s = csl_fast.scores(t, ["final_loss", "in_confidence", "eval_csl"])
    torch.testing.assert_close(s["final_loss"][:4], t.last_loss[:4])
    torch.testing.assert_close(s["in_confidence"][:4], 1 - t.last_max_prob[:4])
    assert bool(s["eval_csl"].isnan().all())


def test_dataframe_and_errors():
    t = _tracker()
    df = csl_fast.scores.as_dataframe(t)
    assert list(df.columns) == list(csl_fast.scores(t)) and len(df) == 5
    assert df.index.name == "index"
    s = csl_fast.scores(t)
    assert as_dataframe(s, ["csl"])["csl"].iloc[3] == pytest.approx(float(s["csl"][3]))
    with pytest.raises(KeyError, match="unknown"):
        csl_fast.scores(t, ["nope"])
