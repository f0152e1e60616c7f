"""Fixtures for the Triton kernel tests.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` when there is no GPU, so on CPU the
kernels run in Triton's interpreter on CPU tensors. With a GPU, kernels are compiled and
only run on CUDA tensors; the ``cpu`` parametrisation is then skipped.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from csl_fast._triton import cross_entropy  # noqa: E402
from csl_fast._triton._registry import is_interpreted  # noqa: E402

INTERPRETED = is_interpreted(cross_entropy._ce_fwd_kernel)


@pytest.fixture
def tdevice(device: str) -> str:
    """The ``device`` fixture, restricted to devices the Triton kernels can run on."""
    if device == "cpu" and not INTERPRETED:
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    if device != "cpu" and INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1: kernels run on CPU tensors only")
    return device


_HERE = __import__("pathlib").Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    # The interpreter evaluates both sides of tl.where with numpy, so masked-off lanes
    # (padding columns at -inf, C == 1 divisions) raise harmless numpy RuntimeWarnings.
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(
                pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
            )
            item.add_marker(
                pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
            )
            item.add_marker(
                pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
            )
