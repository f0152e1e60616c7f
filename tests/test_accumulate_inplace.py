"""accumulate(inplace_grad=True): the logits gradient written over the logits. Same loss,
same gradients everywhere upstream and the same recording as the default; no new
logits-sized buffer; and safe under autograd (a graph that needs the logits raises)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import csl_fast


def _model_and_batch(device, dtype, batch=37, classes=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(16, classes).to(device, dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(classes, 16, generator=g))
        layer.bias.copy_(torch.randn(classes, generator=g))
    x = (torch.randn(batch, 16, generator=g) * 2).to(device, dtype)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    y[::5] = -100
    idx = torch.randint(0, 10, (batch,), generator=g).to(device)
    return layer, x, y, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "weighted": True}], ids=str)
def test_same_as_a_new_gradient_buffer(device, fused_backends, dtype, reduction, options):
    for backend in fused_backends:
        if dtype == torch.float64 and backend == "triton":
            continue
        results = []
        for inplace in (False, True):
            layer, x, y, idx = _model_and_batch(device, dtype)
            x.requires_grad_(True)
            g = torch.Generator().manual_seed(5)
            weight = (torch.rand(29, generator=g) + 0.5).to(device)
            weight = weight if options.get("weighted") else None
            # Batch-order sums: a GPU scatter's atomics add duplicates in any order.
            tracker = csl_fast.CSLTracker(
                10, 29, device=device, backend=backend, deterministic=True
            )
            logits = layer(x)
            loss = csl_fast.accumulate(
                logits,
                y,
                idx,
                tracker,
                deterministic=True,
                weight=weight,
                label_smoothing=options.get("label_smoothing", 0.0),
                reduction=reduction,
                backend=backend,
                inplace_grad=inplace,
            )
            g = torch.Generator().manual_seed(7)
            upstream = (torch.rand(loss.shape, generator=g) + 0.5).to(device, loss.dtype)
            (loss * upstream).sum().backward()
            results.append((loss.detach(), x.grad, layer.weight.grad, tracker.buffers(), logits))
        (l0, gx0, gw0, b0, _), (l1, gx1, gw1, b1, logits) = results
        assert torch.equal(l0, l1), backend
        if dtype == torch.bfloat16:
            # inplace rounds the gradient twice (the default forms it in backward and
            # rounds once): a bfloat16 ulp or two per logit, nothing like a wrong scale.
            for a, b in ((gx0, gx1), (gw0, gw1)):
                torch.testing.assert_close(
                    b.float(), a.float(), rtol=0.05, atol=0.05 * a.float().abs().max().item()
                )
        else:
            assert torch.equal(gx0, gx1) and torch.equal(gw0, gw1), backend
        for name in b0:
            assert torch.equal(b0[name], b1[name]), (backend, name)
        assert not torch.equal(logits.detach(), layer(x).detach())  # holds the gradient now


def test_no_new_logits_sized_buffer(device, fused_backends):
    """The gradient lives in the logits' storage through forward and backward."""
    for backend in fused_backends:
        layer, x, y, idx = _model_and_batch(device, torch.float32, batch=64, classes=29)
        logits = layer(x)
        ptr = logits.data_ptr()
        seen = []
        logits.register_hook(lambda g, seen=seen: seen.append(g.data_ptr()))
        csl_fast.accumulate(
            logits, y, idx, torch.zeros(10, device=device), backend=backend, inplace_grad=True
        ).backward()
        assert seen == [ptr], backend


def test_safe_when_the_graph_needs_the_logits(device, fused_backends):
    for backend in fused_backends:
        layer, x, y, idx = _model_and_batch(device, torch.float32)
        logits = torch.tanh(layer(x))  # tanh's backward needs its output: the logits
        loss = csl_fast.accumulate(
            logits, y, idx, torch.zeros(10, device=device), backend=backend, inplace_grad=True
        )
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.usefixtures("fused_backends")
def test_refuses_what_it_cannot_do_safely(device):
    csl = torch.zeros(10, device=device)
    layer, x, y, idx = _model_and_batch(device, torch.float32)
    leaf = torch.randn(37, 29, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        csl_fast.accumulate(leaf, y, idx, csl, inplace_grad=True)
    wide = torch.randn(37, 40, device=device)
    with pytest.raises(ValueError, match="needs them contiguous"):
        csl_fast.accumulate(wide[:, :29], y, idx, csl, inplace_grad=True)
    for flag in ("False", 1, None):  # a truthy string would overwrite the logits
        logits = layer(x)
        with pytest.raises(TypeError, match="inplace_grad must be True or False"):
            csl_fast.accumulate(logits, y, idx, csl, inplace_grad=flag)
        assert torch.equal(logits, layer(x))
    with pytest.raises(ValueError, match="needs a fused backend"):
        csl_fast.accumulate(layer(x), y, idx, csl, backend="reference", inplace_grad=True)
    loss = csl_fast.accumulate(layer(x), y, idx, csl, inplace_grad=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run once"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_mean_with_nothing_to_divide_by(device, fused_backends, dtype, smoothing):
    """'mean' with D = 0 (every row ignored; class weight 0 at every valid row's target):
    as F.cross_entropy, NaN gradient rows where the target is valid and 0 where it is
    ignored. The half path scaled every stored row by 1 / D = NaN: all-ignored batches got
    an all-NaN gradient where F.cross_entropy's is 0."""
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(6, 5, generator=g) * 2).to(device, dtype)
    weight = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0], device=device)
    cases = {
        "all ignored": (torch.full((6,), -100), None),
        "weight 0 at every valid target": (torch.tensor([0, -100, 1, 0, -100, 1]), weight),
    }
    for backend in fused_backends:
        for what, (target, w) in cases.items():
            target = target.to(device)
            want_in = logits.float().clone().requires_grad_(True)
            want = F.cross_entropy(want_in, target, weight=w, label_smoothing=smoothing)
            want.backward(torch.tensor(1.5, device=device))
            for inplace in (False, True):
                leaf = logits.clone().requires_grad_(True)
                loss = csl_fast.accumulate(
                    leaf * 1, target, torch.arange(6, device=device),
                    torch.zeros(6, device=device), weight=w, label_smoothing=smoothing,
                    backend=backend, inplace_grad=inplace,
                )  # fmt: skip
                loss.backward(torch.tensor(1.5, device=device, dtype=loss.dtype))
                label = f"{backend} {what} inplace={inplace}"
                assert loss.isnan() and want.isnan(), label
                assert torch.equal(leaf.grad.isnan(), want_in.grad.isnan()), label
                ok = ~want_in.grad.isnan()
                assert torch.equal(leaf.grad[ok].float(), want_in.grad[ok]), label


@pytest.mark.usefixtures("fused_backends")
def test_sequences(device):
    """[B*T, V] logits of [B, T] sequences: overwritten in place, the gradients agree."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 5, 8, generator=g).to(device)
    w = torch.randn(11, 8, generator=g).to(device)
    target = torch.randint(0, 11, (3, 5), generator=g).to(device)
    target[:, :2] = -100
    index = torch.tensor([4, 0, 2], device=device)
    got = []
    for inplace in (False, True):
        wi = w.clone().requires_grad_(True)
        csl = torch.zeros(6, device=device)
        logits = (h @ wi.T).flatten(0, 1)
        loss = csl_fast.accumulate(logits, target, index, csl, inplace_grad=inplace)
        loss.backward()
        got.append((loss.detach(), wi.grad, csl))
    want = F.cross_entropy((h @ w.T).reshape(-1, 11), target.reshape(-1))
    torch.testing.assert_close(got[1][0], want)
    for a, b in zip(got[0], got[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(
    "cpu" not in csl_fast.available_backends("cpu"), reason="compiled extension not built"
)
def test_refused_under_torch_compile():
    layer, x, y, idx = _model_and_batch("cpu", torch.float32)
    csl = torch.zeros(10)

    def step(x):
        return csl_fast.accumulate(layer(x), y, idx, csl, inplace_grad=True)

    with pytest.raises(Exception, match="inplace_grad=True is for eager mode"):
        torch.compile(step, fullgraph=True, backend="eager")(x)
