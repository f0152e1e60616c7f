"""Confident learning: K fresh fold models, out-of-sample probabilities, flipped labels found."""

import pytest
import torch

pytest.importorskip("sklearn")  # fold splits and the AUROC
pytest.importorskip("cleanlab")

from csl_fast import corrupt, evaluate
from csl_fast.baselines import confident_learning, out_of_sample_probs

from ._synthetic import FAST, FLOAT_LABELS, LABEL_FORMS, blobs, diverged, linear


def test_finds_flipped_labels_with_fresh_model_per_fold():
    x, y = blobs(150)
    noisy, flipped = corrupt.flip_labels(y, 0.1, num_classes=2, seed=0)
    made = []
    factory = linear(2)

    def counting(seed):
        made.append(seed)
        return factory(seed)

    res = confident_learning(counting, x, noisy, k=3, train_kwargs=FAST, seed=0)
    assert made == [0, 1, 2]  # one fresh model per fold
    assert res.pred_probs.shape == (150, 2)
    torch.testing.assert_close(res.pred_probs.sum(1), torch.ones(150))
    # separable blobs: every issue is a flipped label, and cleanlab's noise-rate pruning
    # finds most of them; the continuous self-confidence ranking separates them exactly
    assert not bool((res.issues & ~flipped).any())
    assert int((res.issues & flipped).sum()) >= 0.8 * int(flipped.sum())
    assert evaluate.auroc(res.scores, flipped) == 1.0
    assert set(res.ranked.tolist()) == set(res.issues.nonzero().squeeze(1).tolist())


def test_refuses_mismatched_labels_and_nan_predictions():
    x, y = blobs(12)
    kw = dict(FAST, epochs=1)
    with pytest.raises(ValueError, match=r"x \(12, 2\) and y \(10,\)"):  # rows 10, 11 were 0
        out_of_sample_probs(linear(2), x, y[:10], k=2, train_kwargs=kw)
    with pytest.raises(FloatingPointError, match="non-finite"):  # cleanlab flagged nothing
        confident_learning(diverged(2), x, y, k=2, train_kwargs=kw)


@pytest.mark.parametrize("form", LABEL_FORMS)
def test_labels_of_any_integer_dtype_array_or_list(form):
    # int32 labels failed deep inside training, uint8 in the score's gather
    x, y = blobs(30)
    kw = dict(FAST, epochs=2)
    want = confident_learning(linear(2), x, y, k=2, train_kwargs=kw)
    got = confident_learning(linear(2), x, LABEL_FORMS[form](y), k=2, train_kwargs=kw)
    assert torch.equal(got.scores, want.scores) and torch.equal(got.issues, want.issues)
    with pytest.raises(TypeError, match=FLOAT_LABELS):
        out_of_sample_probs(linear(2), x, y.float(), k=2, train_kwargs=kw)


def test_a_ranking_of_the_users_choice_orders_ranked():
    # cleanlab's own option collided with ours: "got multiple values for keyword argument
    # 'return_indices_ranked_by'"
    from cleanlab.filter import find_label_issues

    x, y = blobs(90)
    noisy, _ = corrupt.flip_labels(y, 0.1, num_classes=2, seed=0)
    kw = dict(FAST, epochs=10)
    res = confident_learning(
        linear(2), x, noisy, train_kwargs=kw, return_indices_ranked_by="normalized_margin"
    )
    p = res.pred_probs.double().numpy()
    p = p / p.sum(1, keepdims=True)
    want = find_label_issues(noisy.numpy(), p, return_indices_ranked_by="normalized_margin")
    assert res.ranked.tolist() == want.tolist() and len(want) > 1
    assert set(res.ranked.tolist()) == set(res.issues.nonzero().squeeze(1).tolist())


def test_each_row_comes_from_the_model_that_did_not_train_on_it():
    # one-hot inputs: a linear model's logits on sample i are W[:, i] + b, and W[:, i] only
    # moves when i is trained on. With W = 0 at the start, a held-out row is softmax(b) of
    # its fold's model, whatever its own label; a model that saw it (one model reused over
    # the folds, the released code's leak) fits its label.
    n = 24
    x, y = torch.eye(n), torch.arange(n) % 2

    def factory(seed):
        model = torch.nn.Linear(n, 2)
        torch.nn.init.zeros_(model.weight)
        return model

    p = out_of_sample_probs(factory, x, y, k=3, train_kwargs=dict(FAST, epochs=50), seed=0)
    # balanced folds: b stays near 0, so every held-out row is near uniform
    torch.testing.assert_close(p, torch.full((n, 2), 0.5), atol=0.02, rtol=0)


@pytest.mark.parametrize("key", ["seed", "progress", "tracker", "input_grads", "eval_each_epoch"])
def test_refuses_train_kwargs_it_sets_itself(key):
    # seed and progress collided with the fold's own ("got multiple values for keyword
    # argument"); a tracker would record fold rows as dataset indices; input_grads and
    # eval_each_epoch met train's "need a tracker", which is refused
    # (confident_learning's error said out_of_sample_probs, a function it was not called as)
    x, y = blobs(12)
    for fn in (out_of_sample_probs, confident_learning):
        with pytest.raises(ValueError, match=f"{fn.__name__}: train_kwargs may not hold '{key}'"):
            fn(linear(2), x, y, k=2, train_kwargs={"epochs": 1, key: None})


def test_tracker_options_that_are_off_are_taken():
    x, y = blobs(12)
    kw = {"epochs": 1, "input_grads": False, "eval_each_epoch": False}
    assert out_of_sample_probs(linear(2), x, y, k=2, train_kwargs=kw).shape == (12, 2)


def test_train_kwargs_must_say_how_long_to_train():
    # the default None met train's "missing 1 required keyword-only argument: 'epochs'"
    from csl_fast.baselines.memorization import stability_memorization

    x, y = blobs(12)
    for fn, name in (
        (out_of_sample_probs, "out_of_sample_probs"),
        (stability_memorization, "stability_memorization"),
    ):
        with pytest.raises(TypeError, match=f"{name}: train_kwargs must say how long"):
            fn(linear(2), x, y)


@pytest.mark.parametrize("n", [0, 2])
def test_refuses_fewer_samples_than_folds(n):
    x, y = blobs(12)
    with pytest.raises(ValueError, match=f"k = 3 folds need at least 3 samples, got {n}"):
        confident_learning(linear(2), x[:n], y[:n], k=3, train_kwargs={"epochs": 1})


@pytest.mark.parametrize("k", [2.5, True])
def test_refuses_a_number_of_folds_that_is_not_an_int(k):
    # k=2.5 reached sklearn ("The number of folds must be of Integral type"), k=True was
    # refused as "k must be >= 2"
    x, y = blobs(12)
    with pytest.raises(TypeError, match="out_of_sample_probs: k must be an int"):
        out_of_sample_probs(linear(2), x, y, k=k, train_kwargs={"epochs": 1})


@pytest.mark.parametrize(
    "seed, error, match",
    [
        (-1, ValueError, "seed must be an int >= 0, got -1"),
        (2**32, ValueError, r"seed must be below 2\*\*32"),
        (None, TypeError, "seed must be an int, got NoneType"),
    ],
)
def test_refuses_a_seed_the_fold_split_cannot_take(seed, error, match):
    # sklearn's "Seed must be between 0 and 2**32 - 1", or "unsupported operand type(s)
    # for +: 'NoneType' and 'int'"
    x, y = blobs(12)
    for fn in (out_of_sample_probs, confident_learning):
        with pytest.raises(error, match=f"{fn.__name__}: {match}"):
            fn(linear(2), x, y, k=2, train_kwargs={"epochs": 1}, seed=seed)


def _never(seed):
    raise AssertionError("trained before the options were checked")


@pytest.mark.parametrize(
    "options, error, match",
    [
        # a bare "unexpected keyword argument", after the K trainings
        ({"fliter_by": "both"}, TypeError, "does not take these options"),
        # cleanlab's assertion, with an empty message, after the K trainings
        ({"filter_by": "prune_by_noise"}, ValueError, "refused filter_by='prune_by_noise'"),
        ({"return_indices_ranked_by": "bogus"}, ValueError, "not a valid scoring method"),
    ],
)
def test_cleanlab_options_are_checked_before_training(options, error, match):
    x, y = blobs(12)
    with pytest.raises(error, match=match):
        confident_learning(_never, x, y, k=2, train_kwargs={"epochs": 1}, **options)


def test_more_folds_than_the_largest_class_is_named():
    # sklearn's "n_splits=3 cannot be greater than the number of members in each class."
    x, y = torch.randn(4, 2), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="k = 3 stratified folds need a class of at least 3"):
        out_of_sample_probs(_never, x, y, k=3, train_kwargs={"epochs": 1})
