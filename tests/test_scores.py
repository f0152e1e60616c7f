"""csl_fast.scores: names, orientation (higher = more suspicious) and DataFrame."""

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import csl_fast
from csl_fast.scores import SCORES, as_dataframe, unscored_reason

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
        n
        for n in SCORES
        if n
        not in ("eval_csl", "eval_csl_mean", "learning_time", "loss_sensitivity", "variability")
    ]
    # every oriented score; the two-sided one only by name
    assert list(csl_fast.scores(_tracker(True, True))) == [n for n in SCORES if n != "variability"]
    assert [n for n, info in SCORES.items() if info.two_sided] == ["variability"]
    assert list(csl_fast.scores(_tracker(), ["variability"])) == ["variability"]
    assert set(SCORES) == {
        "csl", "csl_mean", "eval_csl", "eval_csl_mean", "final_loss", "forgetting",
        "threshold_learning_time",
        "learning_time", "loss_sensitivity", "aum", "in_confidence", "confidence",
        "variability", "logit_grad_norm",
    }  # fmt: skip


def test_scores_an_eval_pass_gives_are_listed_whatever_training_recorded():
    """final_loss and in_confidence are read from the last eval pass once one exists: a
    tracker fed only by score_epoch (a trained model scored) listed only eval_csl, and one
    fed by record_loss left in_confidence out."""
    y, idx = torch.zeros(4, dtype=torch.long), torch.arange(4)
    logits = torch.tensor([GOOD, BAD, GOOD, BAD])
    scored = csl_fast.CSLTracker(4, 3)
    csl_fast.score_epoch(torch.nn.Identity(), [(logits, y, idx)], scored)
    want = ["eval_csl", "eval_csl_mean", "final_loss", "in_confidence"]
    assert list(csl_fast.scores(scored)) == want
    losses = csl_fast.CSLTracker(4, 3)
    csl_fast.record_loss(torch.rand(4), idx, losses)
    csl_fast.score_epoch(torch.nn.Identity(), [(logits, y, idx)], losses)
    got = csl_fast.scores(losses)
    assert list(got) == [
        "csl",
        "csl_mean",
        "eval_csl",
        "eval_csl_mean",
        "final_loss",
        "in_confidence",
    ]
    assert all(bool(v.isfinite().all()) for v in got.values())


def test_input_gradient_calls_that_recorded_nothing_list_no_input_gradient_score():
    """record_input_grad marks its first epoch on any call (no host sync per step); a
    call whose rows were all invalid or non-finite recorded nothing, so the default names
    leave the input-gradient scores out (they were listed, NaN for every sample)."""
    t = _tracker()
    idx = torch.arange(4)
    t.record_input_grad(idx, torch.ones(4), torch.zeros(4, dtype=torch.bool))
    t.record_input_grad(idx, torch.full((4,), float("nan")))
    t.end_epoch()
    assert t.input_grad_first_epoch == 3
    assert "loss_sensitivity" not in csl_fast.scores(t)
    assert "learning_time" not in csl_fast.scores(t)
    t.record_input_grad(idx, torch.ones(4), torch.tensor([True, False, False, False]))
    assert "loss_sensitivity" in csl_fast.scores(t) and "learning_time" in csl_fast.scores(t)


def test_without_a_closed_epoch_the_epoch_scores_are_warned_about_or_left_out():
    """end_epoch() never called: the default call warns about the threshold learning time
    (0 or 1 for everyone) as a call by name does, and leaves out the learning time (NaN
    for everyone until an epoch with input-gradient records closes)."""
    t = csl_fast.CSLTracker(4, 3)
    idx, y = torch.arange(4), torch.zeros(4, dtype=torch.long)
    for _ in range(3):
        x = t.watch(torch.randn(4, 3), idx)
        csl_fast.accumulate(x, y, idx, t).backward()
    with pytest.warns(RuntimeWarning, match="never called"):
        csl_fast.scores(t, ["threshold_learning_time"])
    with pytest.warns(RuntimeWarning, match="never called"):
        default = csl_fast.scores(t)
    assert "threshold_learning_time" in default and "learning_time" not in default
    t.end_epoch()
    assert "learning_time" in csl_fast.scores(t)


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
    # their directions: forgotten above stable, learned late above learned early
    assert s["forgetting"][1] > s["forgetting"][0]
    assert s["threshold_learning_time"][2] > s["threshold_learning_time"][0]
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
    # variability is two-sided: the samples whose p_y swung (1, 2) lie above both the
    # always-right and the always-wrong one, whose p_y never moved
    v = csl_fast.scores(t, ["variability"])["variability"]
    torch.testing.assert_close(v[:4], t.variability[:4])
    assert min(v[1], v[2]) > 0.4 > 0.01 > max(v[0], v[3])


def test_in_confidence_is_high_where_the_final_model_is_unsure():
    """1 - max softmax of the final model, whatever the label: an undecided final
    prediction ranks above a confident one, right or wrong."""
    t = csl_fast.CSLTracker(3, 3)
    logits = torch.tensor([GOOD, BAD, [1.0, 1.0, 1.0]])
    csl_fast.accumulate(logits, torch.zeros(3, dtype=torch.long), torch.arange(3), t)
    s = csl_fast.scores(t, ["in_confidence"])["in_confidence"]
    torch.testing.assert_close(s, 1 - logits.softmax(1).amax(1))
    assert s[2] > s[0] and s[2] > s[1]


def _linear_run(memorizing: bool, seed: int = 0):
    """A linear classifier trained on 4 classes with 10% flipped labels: ``(tracker, flipped,
    fit)``. Separable blobs in 8 dimensions cannot fit a flipped label (the regime of
    issue 18's small CNN); 96 random points in 256 dimensions can, and the flipped ones
    are fit late (the regime of the digits demo)."""
    from csl_fast import corrupt

    g = torch.Generator().manual_seed(seed)
    if memorizing:
        n, dim = 96, 256
        x = torch.randn(n, dim, generator=g)
        x[:, :4] *= 3  # the clean labels: the largest of the first four coordinates
        y = x[:, :4].argmax(1)
        epochs, lr = 40, 0.01
    else:
        n, dim = 200, 8
        centres = torch.randn(4, dim, generator=g) * 4
        y = torch.arange(n) % 4
        x = centres[y] + torch.randn(n, dim, generator=g)
        epochs, lr = 20, 0.05
    noisy, flipped = corrupt.flip_labels(y, 0.1, num_classes=4, seed=seed)
    model = torch.nn.Linear(dim, 4)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    t = csl_fast.CSLTracker(n, 4)
    csl_fast.train.train(
        model, x, noisy, epochs=epochs, lr=lr, batch_size=32, tracker=t,
        input_grads=not memorizing, eval_each_epoch=not memorizing, seed=seed,
    )  # fmt: skip
    with torch.no_grad():
        fit = model(x).argmax(1) == noisy
    return t, flipped, fit


def test_every_oriented_score_ranks_unfit_flipped_labels_high():
    """Known answer: flipped labels the model never fits are the suspicious samples. Every
    default score but in_confidence (label-blind, tested above) must rank them high; a
    score whose sign were flipped would give an AUROC near 1 - that."""
    pytest.importorskip("sklearn")
    from csl_fast.evaluate import auroc

    t, flipped, fit = _linear_run(memorizing=False)
    assert not fit[flipped].any() and fit[~flipped].float().mean() > 0.95  # the regime
    s = csl_fast.scores(t)
    assert set(s) == set(SCORES) - {"variability"}
    got = {name: auroc(v, flipped) for name, v in s.items() if name != "in_confidence"}
    assert all(a > 0.9 for a in got.values()), got


def test_variability_sign_depends_on_the_regime():
    """Why variability is two-sided: flipped labels never fit keep p_y ~ 0 (low
    variability, AUROC < 0.5); flipped labels memorized late swing (AUROC > 0.5)."""
    pytest.importorskip("sklearn")
    from csl_fast.evaluate import auroc

    unfit, flipped, fit = _linear_run(memorizing=False)
    assert not fit[flipped].any()
    low = auroc(csl_fast.scores(unfit, ["variability"])["variability"], flipped)
    memorized, flipped, fit = _linear_run(memorizing=True)
    assert fit.all()
    high = auroc(csl_fast.scores(memorized, ["variability"])["variability"], flipped)
    assert low < 0.4 and high > 0.8, (low, high)


def test_final_values_without_eval_pass_use_last_presentation():
    t = _tracker()
    s = csl_fast.scores(t, ["final_loss", "in_confidence", "eval_csl"])
    torch.testing.assert_close(s["final_loss"][:4], t.last_loss[:4])
    torch.testing.assert_close(s["in_confidence"][:4], 1 - t.last_max_prob[:4])
    assert bool(s["eval_csl"].isnan().all())


def test_final_values_after_training_past_the_last_eval_pass_come_from_training():
    """The last eval pass gave them however old it was: a sanity-check pass before
    training, and scores() read the untrained model's losses as the final model's."""
    t = csl_fast.CSLTracker(5, 3)
    y, idx = torch.zeros(4, dtype=torch.long), torch.arange(4)
    csl_fast.score_epoch(torch.nn.Identity(), [(torch.tensor([BAD] * 4), y, idx)], t)
    csl_fast.accumulate(torch.tensor([GOOD] * 4), y, idx, t)
    t.end_epoch()
    with pytest.warns(RuntimeWarning, match=r"training was recorded after the last eval pass"):
        s = csl_fast.scores(t)
    assert "in_confidence" in s
    torch.testing.assert_close(s["final_loss"][:4], t.last_loss[:4])
    torch.testing.assert_close(s["in_confidence"][:4], 1 - t.last_max_prob[:4])
    assert unscored_reason("final_loss", t) == "never presented in training"
    # a pass after the training is the final model's again, without a word
    csl_fast.score_epoch(torch.nn.Identity(), [(torch.tensor([BAD] * 4), y, idx)], t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = csl_fast.scores(t, ["final_loss", "in_confidence"])
    torch.testing.assert_close(s["final_loss"][:4], t.eval_last_loss[:4])
    assert float(s["final_loss"][0]) > float(t.last_loss[0])


def test_dataframe_and_errors():
    pytest.importorskip("pandas")
    t = _tracker()
    df = csl_fast.scores.as_dataframe(t)
    assert list(df.columns) == list(csl_fast.scores(t)) and len(df) == 5
    assert df.index.name == "index"
    s = csl_fast.scores(t)
    assert as_dataframe(s, ["csl"])["csl"].iloc[3] == pytest.approx(float(s["csl"][3]))
    # a generator of names was used up by the check, and the frame came back empty
    assert list(as_dataframe(s, (n for n in ["csl", "aum"])).columns) == ["csl", "aum"]
    with pytest.raises(KeyError, match="unknown"):
        csl_fast.scores(t, ["nope"])


def test_bad_sources_and_names_are_refused_plainly():
    t = _tracker()
    # a string is an iterable of one-letter names: "unknown scores ['c', 's', 'l']"
    with pytest.raises(TypeError, match=r"names must be a list of names, e\.g\. \['csl'\]"):
        csl_fast.scores(t, "csl")
    # AttributeError: 'dict' object has no attribute 'csl_count'
    with pytest.raises(TypeError, match="a mapping is already scores"):
        csl_fast.scores(csl_fast.scores(t))
    with pytest.raises(TypeError, match="got ndarray"):
        csl_fast.scores(torch.rand(5).numpy())
    pytest.importorskip("pandas")
    # pandas' "All arrays must be of the same length", a bare KeyError, pandas' 1-D error
    with pytest.raises(ValueError, match="must all be"):
        as_dataframe({"a": torch.rand(3), "b": torch.rand(4)})
    with pytest.raises(KeyError, match=r"no scores \['b'\] in the mapping"):
        as_dataframe({"a": torch.rand(3)}, ["b"])
    with pytest.raises(ValueError, match="'a' must be a 1-D"):
        as_dataframe({"a": torch.rand(3, 2)})
    # a complex score lost its imaginary part with only torch's UserWarning
    with pytest.raises(ValueError, match="'a' must be a 1-D \\[N\\] real tensor, got a complex"):
        as_dataframe({"a": torch.rand(3, dtype=torch.cfloat)})


@pytest.mark.parametrize(("classes", "label_dtype"), [(2, torch.int32), (5, torch.uint8)])
def test_training_scores_match_a_plain_pytorch_replay(classes, label_dtype):
    """A real SGD run (shuffled batches, one sample never presented) against each score's
    published definition, computed from a log of every presentation's logits and a
    per-sample input gradient (torch.func, not the tracker's hook)."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    n, d, b, skipped = 41, 4, 8, 7
    x, y = torch.randn(n, d), torch.randint(0, classes, (n,))
    model = torch.nn.Sequential(
        torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, classes)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    t = csl_fast.CSLTracker(n, classes, dtype=torch.float64)
    log = [[] for _ in range(n)]  # (logits row, ||dl/dx||) per presentation
    for _ in range(5):
        order = torch.randperm(n)
        order = order[order != skipped]
        for s in range(0, len(order), b):
            idx = order[s : s + b]
            params = {k: v.detach() for k, v in model.named_parameters()}

            def loss(xi, yi, params=params):
                return F.cross_entropy(functional_call(model, params, (xi[None],)), yi[None])

            gnorm = vmap(grad(loss))(x[idx], y[idx]).norm(dim=1)
            z = model(t.watch(x[idx].clone(), idx))
            for k, i in enumerate(idx.tolist()):
                log[i].append((z[k].detach().double(), float(gnorm[k])))
            opt.zero_grad()
            csl_fast.accumulate(z, y[idx].to(label_dtype), idx, t).backward()
            opt.step()
        t.end_epoch()

    want = {k: torch.full((n,), math.nan, dtype=torch.float64) for k in SCORES}
    forgot, learned = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.bool)
    for i, rows in enumerate(log):
        if not rows:
            continue
        z = torch.stack([r[0] for r in rows])
        yi = int(y[i])
        others = z.clone()
        others[:, yi] = -math.inf
        p = z.softmax(1)[:, yi]
        want["csl"][i] = F.cross_entropy(z, torch.full((len(z),), yi), reduction="sum")
        want["aum"][i] = -(z[:, yi] - others.amax(1)).mean()  # Pleiss et al., negated
        want["confidence"][i] = 1 - p.mean()
        want["variability"][i] = p.std(correction=0)
        want["loss_sensitivity"][i] = sum(r[1] for r in rows) / len(rows)
        correct = (z.argmax(1) == yi).tolist()
        # Toneva et al.: correct -> incorrect between successive presentations
        forgot[i] = sum(a and not c for a, c in itertools.pairwise(correct))
        learned[i] = any(correct)
    never = ~learned & torch.tensor([bool(r) for r in log])
    assert bool(never.any()) and bool(forgot.max() > 0)  # both conventions exercised
    want["forgetting"] = torch.where(never, forgot.max() + 1, forgot)
    want["forgetting"][skipped] = math.nan
    names = ["csl", "aum", "confidence", "variability", "loss_sensitivity", "forgetting"]
    got = csl_fast.scores(t, names)
    for name in names:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_samples_recorded_without_logits_in_a_logits_tracker_get_nan_softmax_scores():
    """record_loss into a tracker that accumulate also fed: its samples read confidence 1
    (the most suspicious) and a forgotten label from sums of 0 over their count."""
    tracker = csl_fast.CSLTracker(8, 3)
    logits = torch.tensor([[4.0, 0.0, 0.0]]).repeat(4, 1)
    csl_fast.accumulate(logits, torch.zeros(4, dtype=torch.long), torch.arange(4), tracker)
    csl_fast.record_loss(torch.full((4,), 0.5), torch.arange(4, 8), tracker)
    with pytest.warns(RuntimeWarning, match="4 of 8 samples were recorded without softmax"):
        got = csl_fast.scores(tracker)
    for name in ("aum", "confidence", "forgetting", "in_confidence"):
        assert got[name][4:].isnan().all() and got[name][:4].isfinite().all(), name
    assert got["csl"].isfinite().all()


def test_a_losses_only_run_without_history_is_not_told_to_close_epochs():
    # no statistic of such a run counts epochs: the note was noise
    from csl_fast.scores import no_epoch_closed

    losses = csl_fast.CSLTracker(4)
    kept = csl_fast.CSLTracker(4, history=True)
    fed = csl_fast.CSLTracker(4, 3)
    for _ in range(2):
        csl_fast.record_loss(torch.rand(4), torch.arange(4), losses)
        csl_fast.record_loss(torch.rand(4), torch.arange(4), kept)
        csl_fast.accumulate(torch.randn(4, 3), torch.arange(4) % 3, torch.arange(4), fed)
    assert no_epoch_closed(losses) is None
    assert "closed no epoch" in no_epoch_closed(kept)  # (its history has no row)
    assert "closed no epoch" in no_epoch_closed(fed)


def test_label_csl_asked_of_scores_names_the_entries_detector():
    # a documented score name (the CLI's --score label_csl) was only "unknown" here
    with pytest.raises(
        KeyError, match=r"label_csl ranks \(sample, label\) entries.*mislabeled_entries"
    ):
        csl_fast.scores(csl_fast.CSLTracker(3, num_labels=2), ["label_csl"])


@pytest.mark.parametrize("names", [3, 2.5, object()])
def test_names_that_are_no_list_are_refused_by_name(names):
    # "'int' object is not iterable" (a str already had a message of its own)
    with pytest.raises(TypeError, match=r"^csl_fast\.scores: names must be a list of names"):
        csl_fast.scores(csl_fast.CSLTracker(4, 3), names)
