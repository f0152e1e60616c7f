"""Shared fixtures. Without a GPU, Triton kernels run in the interpreter on CPU tensors."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CUDA cases exist everywhere and skip, saying why, without a GPU: a CPU run lists
# what it did not check.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="no CUDA device: this case runs on a GPU"
        ),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def fused_backends(device) -> list[str]:
    """The compiled backends that run on ``device`` (C++ CPU; CUDA C++ and Triton on a GPU;
    Triton on CPU tensors is left to tests/_triton, the interpreter being slow).

    Skips the test with each backend's reason when there is none (no compiled extension):
    a test looping over them must not pass by running zero cases, nor fall back to
    comparing the reference, which is ``F.cross_entropy``, with itself.
    """
    from csl_fast import _ext

    status = _ext.backend_status(device)
    names = [
        b
        for b, why in status.items()
        if why is None and b != "reference" and not (b == "triton" and device == "cpu")
    ]
    if not names:
        why = "; ".join(f"{b}: {w}" for b, w in status.items() if b != "reference")
        pytest.skip(f"no compiled backend for {device} tensors ({why})")
    return names


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fast_cpu_step_not_bypassed():
    """Fails any test in which ``csl_fast.accumulate``'s one-call CPU step raised on input
    the op-by-op path then completed (``csl_fast.info.fast_step_fallbacks``): the results
    would be right, so a broken fast path would otherwise show only as a slower suite."""
    from csl_fast.info import fast_step_fallbacks

    before = fast_step_fallbacks()[0]
    yield
    count, reason = fast_step_fallbacks()
    assert count == before, f"{count - before} call(s) fell back from csl_fast._C.step: {reason}"


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after.

    Tiny tensors and models: one thread is faster, and far faster on a loaded machine.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def trackers_built(monkeypatch) -> list[tuple]:
    """The constructor arguments of every ``CSLTracker`` built during the test, in order:
    a load that refuses a file must refuse it before allocating a tracker for it."""
    from csl_fast import CSLTracker

    built: list[tuple] = []
    init = CSLTracker.__init__

    def counted(self, *args, **kwargs):
        built.append(args)
        init(self, *args, **kwargs)

    monkeypatch.setattr(CSLTracker, "__init__", counted)
    return built
