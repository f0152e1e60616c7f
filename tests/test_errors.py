"""Bad input: a clear exception naming the argument and the fix, and no write into csl."""

import re

import pytest
import torch
import torch.nn.functional as F

import csl_fast


def _good(device, batch=4, classes=5, num=6):
    return dict(
        logits=torch.randn(batch, classes, device=device),
        target=torch.randint(0, classes, (batch,), device=device),
        index=torch.randint(0, num, (batch,), device=device),
        csl=torch.zeros(num, device=device),
    )


def _backends(device):
    return [
        b for b in csl_fast.available_backends(device) if not (b == "triton" and device == "cpu")
    ]


CASES = [
    (
        "logits rank",
        lambda a: a.update(logits=a["logits"][0]),
        ValueError,
        r"unbatched logits \[C\] = \(5,\) need a 0-d target",
    ),
    (
        "logits int",
        lambda a: a.update(logits=a["logits"].long()),
        TypeError,
        r"logits must be float",
    ),
    (
        "target rank",
        lambda a: a.update(target=a["target"][:, None]),
        ValueError,
        r"target must be 1-D",
    ),
    (
        "target batch",
        lambda a: a.update(target=a["target"][:3]),
        ValueError,
        r"target must be 1-D with B = 4",
    ),
    (
        "target float",
        lambda a: a.update(target=a["target"].float()),
        TypeError,
        r"class probabilities need the logits' shape",
    ),
    (
        "target int16",  # uint8 is taken too, and the message says so
        lambda a: a.update(target=a["target"].to(torch.int16)),
        TypeError,
        r"target must hold int64 \(or int32, uint8\) indices, got torch.int16",
    ),
    (
        "index batch",
        lambda a: a.update(index=a["index"][:2]),
        ValueError,
        r"index must be 1-D with B = 4",
    ),
    (
        "index int",  # Lightning's batch_idx passed as the index
        lambda a: a.update(index=3),
        TypeError,
        r"index must be a tensor, got int \(not the batch's number\).*IndexedDataset",
    ),
    (
        "index float",
        lambda a: a.update(index=a["index"].float()),
        TypeError,
        r"index must hold int64",
    ),
    (
        "target range",
        lambda a: a["target"].__setitem__(2, 5),
        IndexError,
        r"target\[2\] = 5 is outside \[0, C = 5\)",
    ),
    ("target negative", lambda a: a["target"].__setitem__(1, -3), IndexError, r"target\[1\] = -3"),
    (
        "index range",
        lambda a: a["index"].__setitem__(3, 6),
        IndexError,
        r"index\[3\] = 6 is outside \[0, N = 6\)",
    ),
    ("index negative", lambda a: a["index"].__setitem__(0, -1), IndexError, r"index\[0\] = -1"),
    (
        "csl dtype",
        lambda a: a.update(csl=a["csl"].half()),
        TypeError,
        r"csl must be a tensor of dtype",
    ),
    (
        "csl 2-D",
        lambda a: a.update(csl=a["csl"][:, None]),
        ValueError,
        r"csl must be a contiguous 1-D",
    ),
    (
        "csl strided",
        lambda a: a.update(csl=torch.zeros(12, device=a["csl"].device)[::2]),
        ValueError,
        r"contiguous",
    ),
    (
        "csl not tensor",
        lambda a: a.update(csl=[0.0] * 6),
        TypeError,
        r"csl must be a float32/float64 tensor",
    ),
]


@pytest.mark.parametrize("name,mutate,exc,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_and_leaves_csl_untouched(device, name, mutate, exc, message):
    for backend in _backends(device):
        args = _good(device)
        mutate(args)
        before = args["csl"].clone() if isinstance(args["csl"], torch.Tensor) else None
        # On a GPU, values are range-checked only when asked (a check costs a device
        # synchronisation); unasked, a bad row is skipped (tests/_triton/test_triton_bounds.py).
        asked = {"validate": True} if exc is IndexError and device == "cuda" else {}
        with pytest.raises(exc, match=message):
            csl_fast.accumulate(
                args.pop("logits"),
                args.pop("target"),
                args.pop("index"),
                args["csl"],
                backend=backend,
                **asked,
            )
        if before is not None:
            assert torch.equal(args["csl"], before), f"{backend} wrote into csl on a failed call"


@pytest.mark.parametrize("backend", ["cpu"])
def test_kernel_checks_values_without_python_validation(backend):
    """validate=False skips the Python checks; the C++ kernels still refuse, before writing."""
    if backend not in csl_fast.available_backends("cpu"):
        pytest.skip("compiled extension not built")
    args = _good("cpu")
    args["index"][1] = 99
    with pytest.raises(IndexError, match=re.escape("index[1] = 99 is outside [0, N = 6)")):
        csl_fast.accumulate(**args, backend=backend, validate=False)
    assert torch.equal(args["csl"], torch.zeros(6))
    args = _good("cpu")
    args["target"][0] = 7
    with pytest.raises(IndexError, match=re.escape("target[0] = 7 is outside [0, C = 5)")):
        csl_fast.accumulate(**args, backend=backend, validate=False)
    assert torch.equal(args["csl"], torch.zeros(6))


@pytest.mark.parametrize("validate", [None, False, True])
@pytest.mark.parametrize("layout", ["BT_V", "NCd"])
def test_a_bad_target_of_several_positions_is_named_where_it_is(layout, validate):
    """A [2, 4] target's bad entry target[1, 1] was called target[5] (a flattened row
    that the caller's target does not have)."""
    target = torch.zeros(2, 4, dtype=torch.long)
    target[1, 1] = 7
    logits = torch.randn(8, 3) if layout == "BT_V" else torch.randn(2, 3, 4)
    csl = torch.zeros(2)
    for backend in csl_fast.available_backends("cpu"):
        if backend != "cpu" and validate is False:
            continue  # left to the backend, as documented: only the C++ kernels check
        with pytest.raises(IndexError, match=re.escape("target[1, 1] = 7 is outside [0, C = 3)")):
            csl_fast.accumulate(
                logits, target, torch.arange(2), csl, backend=backend, validate=validate
            )
        assert torch.equal(csl, torch.zeros(2))


def test_other_argument_errors():
    a = _good("cpu")
    with pytest.raises(ValueError, match="count has 3 entries but csl has 6"):
        csl_fast.accumulate(**a, count=torch.zeros(3))
    with pytest.raises(ValueError, match="weight must be 1-D with C = 5"):
        csl_fast.accumulate(**a, weight=torch.ones(4))
    with pytest.raises(ValueError, match="reduction must be one of"):
        csl_fast.accumulate(**a, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        csl_fast.accumulate(**a, label_smoothing=1.5)
    with pytest.raises(
        TypeError, match=r"label_smoothing must be a float in \[0, 1\], got NoneType"
    ):
        csl_fast.accumulate(**a, label_smoothing=None)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        csl_fast.accumulate(**a, backend="fast")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu tensors"):
        csl_fast.accumulate(**a, backend="cuda")
    with pytest.raises(TypeError, match="weight must be a tensor of C = 5 class weights, got list"):
        csl_fast.accumulate(**a, weight=[1.0] * 5)
    assert torch.equal(a["csl"], torch.zeros(6))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the Triton interpreter
@pytest.mark.parametrize("backend", csl_fast.available_backends("cpu"))
def test_ignore_index_takes_integers_only(backend):
    """A 0-d integer tensor is an int (as for F.cross_entropy); a float is refused by name,
    not by the schema of whichever op it reaches (or, for a tensor, as out of int64 range)."""
    a = _good("cpu")
    a["target"][1] = 2
    want = torch.nn.functional.cross_entropy(a["logits"], a["target"], ignore_index=2)
    got = csl_fast.accumulate(**a, ignore_index=torch.tensor(2), backend=backend)
    torch.testing.assert_close(got, want)
    csl = a.pop("csl").zero_()
    with pytest.raises(TypeError, match="ignore_index must be an int, got float"):
        csl_fast.accumulate(**a, csl=csl, ignore_index=2.0, backend=backend)
    # a bool, which F.cross_entropy refuses, was read as class 1
    with pytest.raises(TypeError, match="ignore_index must be an int, got bool"):
        csl_fast.accumulate(**a, csl=csl, ignore_index=True, backend=backend)
    assert torch.equal(csl, torch.zeros(6))


def test_mixed_devices_meta():
    a = _good("cpu")
    with pytest.raises(ValueError, match=r"csl is on meta but logits are on cpu"):
        csl_fast.accumulate(a["logits"], a["target"], a["index"], a["csl"].to("meta"))
    with pytest.raises(ValueError, match=r"weight is on meta but logits are on cpu"):
        csl_fast.accumulate(**a, weight=torch.ones(5, device="meta"))


def test_tracker_off_device_names_where_to_fix_it():
    # a tracker has no .to: the fix for its buffers is the device it is created on
    tracker = csl_fast.CSLTracker(10, 3)
    x = torch.randn(4, 3, device="meta")
    t = torch.zeros(4, dtype=torch.long, device="meta")
    i = torch.arange(4, device="meta")
    fix = (
        r"move it with \.to\((logits|hidden|loss)\.device\) if you passed it, or, for a "
        r"CSLTracker's buffer, create the tracker with device='meta' \(or move the inputs "
        r"to cpu\)"
    )
    with pytest.raises(ValueError, match=r"csl is on cpu but logits are on meta; " + fix):
        csl_fast.accumulate(x, t, i, tracker)
    with pytest.raises(ValueError, match=r"csl is on cpu but logits are on meta; " + fix):
        csl_fast.accumulate_bce(x, torch.zeros(4, 3, device="meta"), i, tracker)
    h, w = torch.randn(4, 5, device="meta"), torch.randn(3, 5, device="meta")
    with pytest.raises(ValueError, match=r"csl is on cpu but hidden is on meta; " + fix):
        csl_fast.linear_cross_entropy(h, w, t, i, tracker)
    with pytest.raises(ValueError, match=r"csl is on cpu but loss is on meta; " + fix):
        csl_fast.record_loss(torch.rand(4, device="meta"), i, tracker)
    # a plain tensor passed as csl: .to() is the fix (no tracker involved)
    with pytest.raises(ValueError, match=r"move it with \.to\(logits\.device\) if you passed"):
        csl_fast.accumulate(x, t, i, torch.zeros(10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: tensors on two devices")
def test_mixed_devices():
    a = _good("cuda")
    with pytest.raises(ValueError, match=r"index is on cpu but logits are on cuda"):
        csl_fast.accumulate(a["logits"], a["target"], a["index"].cpu(), a["csl"])
    with pytest.raises(ValueError, match=r"csl is on cpu but logits are on cuda"):
        csl_fast.accumulate(a["logits"], a["target"], a["index"], a["csl"].cpu())


# --------------------------------------------------------------------- issue 16
def _all_backends() -> list[str]:
    """Every backend that runs on CPU tensors here: the reference, the C++ kernels when
    built, and Triton when its interpreter is on (TRITON_INTERPRET=1, set by conftest)."""
    names = list(csl_fast.available_backends("cpu"))
    try:
        from csl_fast._triton import cross_entropy
        from csl_fast._triton._registry import is_interpreted

        if is_interpreted(cross_entropy._ce_fwd_kernel) and "triton" not in names:
            names.append("triton")
    except ImportError:
        pass
    return names


_INF, _NAN = float("inf"), float("nan")
NON_FINITE = {
    # rows, targets; the last row of each case is ordinary
    "inf logits": (
        torch.float32,
        [[_INF, 0, 0], [-_INF, 0, 0], [0, _INF, 0], [_NAN, 0, 0], [1, 2, 3]],
        [0, 0, 0, 0, 2],
    ),
    "C = 1": (torch.float32, [[_INF], [-_INF], [_NAN], [2.0]], [0, 0, 0, 0]),
    "float16 overflow": (
        torch.float16,
        [[7e4, 0, 0], [-7e4, 1, 0], [0, 7e4, 0], [1, 2, 3]],  # 7e4 overflows to inf
        [0, 0, 0, 2],
    ),
    # Finite logits whose float32 loss rounds to inf in the logits dtype, the dtype of the
    # returned loss: 1.2e5; exactly 65520, the float16 tie that rounds up to inf.
    "float16 loss overflow": (
        torch.float16,
        [[-6e4, 6e4, 0], [-16, 65504, 0], [1, 2, 3]],
        [0, 0, 2],
    ),
    # 3.3895e38 (the bfloat16 maximum) + 1e36: finite in float32, inf in bfloat16.
    "bfloat16 loss overflow": (torch.bfloat16, [[-1e36, 3.3895e38, 0], [1, 2, 3]], [0, 2]),
    # float64 losses of 2e39 and 5e38: finite in the logits dtype, inf in the float32
    # statistics (recorded, they made the sample's CSL inf for good).
    "float64 loss past float32": (
        torch.float64,
        [[-1e39, 1e39, 0], [0, 5e38, 0], [1, 2, 3]],
        [0, 0, 2],
    ),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the Triton interpreter
@pytest.mark.parametrize("case", list(NON_FINITE))
def test_no_backend_records_a_row_whose_loss_is_not_finite(case):
    dtype, rows, targets = NON_FINITE[case]
    # (float64 rows past float32's range would be inf logits if made in float32 first)
    logits = torch.tensor(rows, dtype=torch.float64 if dtype == torch.float64 else None).to(dtype)
    target = torch.tensor(targets)
    n = len(rows)
    backends = _all_backends()
    assert "reference" in backends
    if dtype == torch.float64:  # the Triton cross-entropy kernels refuse float64 logits
        backends = [b for b in backends if b != "triton"]
    last = torch.nn.functional.cross_entropy(logits[-1:].float(), target[-1:]).item()
    fused = [b for b in backends if b != "reference"]  # inplace_grad needs a fused kernel
    for backend, inplace in [(b, False) for b in backends] + [(b, True) for b in fused]:
        csl, count = torch.zeros(n), torch.zeros(n)
        loss = csl_fast.accumulate(
            logits.clone(), target, torch.arange(n), csl, count=count, reduction="none",
            backend=backend, inplace_grad=inplace,
        )  # fmt: skip
        finite = torch.isfinite(loss.float())
        assert finite.tolist() == [False] * (n - 1) + [True], (backend, inplace, loss)
        assert count.tolist() == finite.float().tolist(), (backend, inplace, count)
        assert torch.isfinite(csl).all() and csl[:-1].eq(0).all(), (backend, inplace, csl)
        assert csl[-1].item() == pytest.approx(last, rel=1e-3, abs=1e-6), (backend, inplace, csl)
        if inplace:
            continue
        tracker = csl_fast.CSLTracker(n, logits.shape[1], backend=backend)
        csl_fast.accumulate(logits.clone(), target, torch.arange(n), tracker, backend=backend)
        assert tracker.csl_count.tolist() == finite.float().tolist(), backend
        assert tracker.last_correct[:-1].eq(False).all(), backend
        assert tracker.learned_epoch[:-1].eq(-1).all(), backend
        assert tracker.csl_sum[:-1].eq(0).all(), backend
        assert tracker.csl_sum[-1].item() == pytest.approx(last, rel=1e-3, abs=1e-6), backend


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the Triton interpreter
@pytest.mark.parametrize(
    "dtype, rows, expected",
    [
        # 65512 rounds down to 65504 in float16 (the tie at 65520 rounds up to inf).
        (torch.float16, [[-8, 65504, 0]], 65512.0),
        # 3.3895e38 + 1e35 rounds down to the bfloat16 maximum.
        (torch.bfloat16, [[-1e35, 3.3895e38, 0]], 3.3895e38 + 1e35),
    ],
)
def test_a_loss_that_rounds_to_a_finite_value_is_recorded(dtype, rows, expected):
    """The bound is the rounding of the returned loss, not the dtype's largest value."""
    logits = torch.tensor(rows).to(dtype)
    for backend in _all_backends():
        csl, count = torch.zeros(1), torch.zeros(1)
        loss = csl_fast.accumulate(
            logits.clone(), torch.tensor([0]), torch.arange(1), csl, count=count,
            reduction="none", backend=backend,
        )  # fmt: skip
        assert torch.isfinite(loss).all(), (backend, loss)
        assert count.tolist() == [1.0], (backend, count)
        assert csl.item() == pytest.approx(expected, rel=1e-5), (backend, csl)


@pytest.mark.parametrize("bad", ["index", "target"])
def test_inplace_grad_checks_before_overwriting_the_logits(bad):
    if "cpu" not in csl_fast.available_backends("cpu"):
        pytest.skip("compiled extension not built")
    for make in (lambda: torch.zeros(6), lambda: csl_fast.CSLTracker(6, 5)):
        args = _good("cpu")
        args[bad][2] = 99
        logits = args.pop("logits")
        original = logits.clone()
        csl = make()
        buffers = {"csl": csl} if isinstance(csl, torch.Tensor) else csl.buffers()
        before = {k: v.clone() for k, v in buffers.items()}
        with pytest.raises(IndexError, match=re.escape(f"{bad}[2] = 99 is outside")):
            csl_fast.accumulate(logits, args["target"], args["index"], csl, inplace_grad=True)
        assert torch.equal(logits, original), "the caller's logits were overwritten"
        for k, v in before.items():
            assert torch.equal(buffers[k], v), k


def test_ignore_index_out_of_int64_range():
    a = _good("cpu")
    for value in (2**70, -(2**63) - 1):
        with pytest.raises(ValueError, match=r"ignore_index must fit in int64 .* got "):
            csl_fast.accumulate(**a, ignore_index=value)
    assert torch.equal(a["csl"], torch.zeros(6))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the Triton interpreter
@pytest.mark.parametrize("name,mutate,exc,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_on_every_cpu_backend_including_interpreted_triton(name, mutate, exc, message):
    """The argument checks of every backend that runs on CPU tensors here (the case above
    leaves Triton to a GPU; under TRITON_INTERPRET=1 it runs on the CPU too), with a
    tracker as well as a tensor buffer: refused before anything is written."""
    for backend in _all_backends():
        for tracked in (False, True) if not name.startswith("csl") else (False,):
            args = _good("cpu")
            if tracked:
                args["csl"] = csl_fast.CSLTracker(6, 5, backend=backend)
            mutate(args)
            csl = args["csl"]
            buffers = (
                {"csl": csl} if isinstance(csl, torch.Tensor) else getattr(csl, "buffers", dict)()
            )
            before = {k: v.clone() for k, v in buffers.items()}
            with pytest.raises(exc, match=message):
                csl_fast.accumulate(
                    args["logits"], args["target"], args["index"], csl, backend=backend
                )
            for k, v in before.items():
                assert torch.equal(buffers[k], v), f"{backend} wrote into {k} on a failed call"


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("sequences", [False, True])
def test_validate_false_into_a_cpu_tracker_writes_nothing_it_then_refuses(backend, sequences):
    """With validate=False and another backend the scatter skipped the bad row and added
    the others into csl_sum and csl_count; then the tracker's C++ op refused the index:
    samples counted that no other statistic saw, which a save kept."""
    if backend not in csl_fast.available_backends("cpu") or "cpu" not in (
        csl_fast.available_backends("cpu")
    ):
        pytest.skip(f"needs the {backend} and the compiled cpu backends")
    t = csl_fast.CSLTracker(5, 3)
    if sequences:
        logits, target = torch.randn(8, 3), torch.tensor([[0, 1], [2, 1], [0, 0], [1, 2]])
    else:
        logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.raises(IndexError, match=re.escape("= 9 is outside [0, N = 5)")):
        csl_fast.accumulate(
            logits, target, torch.tensor([0, 1, 2, 9]), t, backend=backend, validate=False
        )
    assert all(not v.is_floating_point() or not v.any() for v in t.buffers().values())


def test_an_int_index_says_how_to_get_the_dataset_indices_in_every_recorder():
    # record_loss and accumulate_bce said only "index must be a tensor[...], got int"
    match = r"got int \(not the batch's number\).*csl_fast.data.IndexedDataset"
    with pytest.raises(TypeError, match=match):
        csl_fast.record_loss(torch.rand(4), 3, torch.zeros(8))
    with pytest.raises(TypeError, match=match):
        csl_fast.accumulate_bce(torch.randn(4, 2), torch.rand(4, 2), 3, torch.zeros(8))
    with pytest.raises(TypeError, match=r"int64 \(or int32\) dataset indices, got torch.float32"):
        csl_fast.accumulate_bce(torch.randn(4, 2), torch.rand(4, 2), torch.zeros(4), torch.zeros(8))


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5)])
def test_integer_one_hot_targets_are_named(shape):
    # [N, C, d]: "need a target ... (2, 3, 5), got target of shape (2, 3, 5)"; [B, C]:
    # "target must be 1-D with B = 4 entries", with no word of the dtype
    logits = torch.randn(shape)
    one_hot = F.one_hot(logits.argmax(1), shape[1]).movedim(-1, 1)
    with pytest.raises(
        ValueError, match=r"integer dtype torch.int64: one-hot labels\? .*argmax\(1\)"
    ):
        csl_fast.accumulate(logits, one_hot, torch.arange(shape[0]), torch.zeros(shape[0]))


def test_unbatched_one_class_integer_target_is_refused_as_pytorch_does():
    # [1] logits (C = 1) with a [1] integer target: F.cross_entropy reads it as class
    # probabilities and raises; it was taken as a class index, loss 0
    logits, target = torch.randn(1), torch.tensor([0])
    with pytest.raises(RuntimeError, match="class probabilities"):
        F.cross_entropy(logits, target)
    with pytest.raises(ValueError, match=r"same shape, torch.int64: .*pass a 0-d target"):
        csl_fast.accumulate(logits, target, torch.tensor(0), torch.zeros(2))


def _tracker_index_calls():
    """Every way an index reaches a tracker, each with index 9 of a tracker of 5 samples."""
    from csl_fast.stats import NUM_STATS

    bad = torch.tensor([0, 9])
    z, y = torch.randn(2, 3), torch.tensor([0, 1])
    stats = torch.zeros(NUM_STATS, 2)
    return {
        "update": lambda t: t.update(bad, stats),
        "record_eval": lambda t: t.record_eval(bad, stats),
        "record": lambda t: t.record(bad, stats),
        "accumulate": lambda t: csl_fast.accumulate(z, y, bad, t),
        "accumulate validate": lambda t: csl_fast.accumulate(z, y, bad, t, validate=True),
        "record_loss": lambda t: csl_fast.record_loss(torch.rand(2), bad, t),
        "record_loss validate": lambda t: csl_fast.record_loss(
            torch.rand(2), bad, t, validate=True
        ),
        "accumulate_bce validate": lambda t: csl_fast.accumulate_bce(
            torch.randn(2, 3), torch.rand(2, 3), bad, t, validate=True
        ),
        "linear_cross_entropy validate": lambda t: csl_fast.linear_cross_entropy(
            torch.randn(2, 4), torch.randn(3, 4), y, bad, t, validate=True
        ),
        "score_epoch": lambda t: csl_fast.score_epoch(
            torch.nn.Identity(), [(z, y, bad)], t, validate=True
        ),
    }


@pytest.mark.parametrize("call", list(_tracker_index_calls()))
def test_an_index_outside_a_tracker_names_the_tracker_not_a_buffer(call):
    # update, record_eval, record_loss and accumulate(validate=True) into a tracker said
    # "N is the size of the csl buffer": a buffer the user never made
    t = csl_fast.CSLTracker(5, 3)
    with pytest.raises(IndexError, match=r"= 9 is outside \[0, N = 5\) where N is the tracker's "
                       r"num_samples.*num_samples=len\(dataset\)") as info:  # fmt: skip
        _tracker_index_calls()[call](t)
    # (not an internal op's name, csl_fast.record_last, which the user never called)
    assert str(info.value).startswith(("csl_fast.CSLTracker:", f"csl_fast.{call.split()[0]}:"))
    assert all(not v.is_floating_point() or not v.any() for v in t.buffers().values())


def test_an_index_outside_a_buffer_names_the_buffer():
    for validate in (None, True):
        with pytest.raises(IndexError, match="N is the size of the csl buffer"):
            csl_fast.record_loss(
                torch.rand(2), torch.tensor([0, 9]), torch.zeros(5), validate=validate
            )
        with pytest.raises(IndexError, match="N is the size of the csl buffer"):
            csl_fast.accumulate(
                torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([0, 9]), torch.zeros(5),
                validate=validate,
            )  # fmt: skip
