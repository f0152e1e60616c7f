"""Hide the optional packages, as on a machine that has only torch, triton, numpy and pytest.

Put this folder first on ``PYTHONPATH`` and every ``import`` of a hidden package (or of
one of its submodules) raises ``ModuleNotFoundError``, so ``pytest.importorskip`` skips and
a module-level import fails as it would there. ``CSL_FAST_HIDE`` (comma-separated top-level
names) replaces the default list. Used by ``tests/test_optional_deps.py`` and
``benchmarks/gpu_check.sh --dry-run``.
"""

import os
import sys

_DEFAULT = (
    "sklearn,cleanlab,pandas,matplotlib,lightning,pytorch_lightning,lightning_fabric,"
    "transformers,accelerate,tqdm,scipy,pytest_benchmark"
)
HIDDEN = frozenset(n for n in os.environ.get("CSL_FAST_HIDE", _DEFAULT).split(",") if n)


class _Hiding:
    """A meta-path finder that finds nothing of the hidden packages and defers the rest,
    so ``import`` raises ``ModuleNotFoundError`` and ``importlib.util.find_spec`` returns
    None, as when they are not installed (torch probes some with ``find_spec``)."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in HIDDEN:
            return None
        find = getattr(self._finder, "find_spec", None)
        return None if find is None else find(fullname, path, target)

    def __getattr__(self, name):
        return getattr(self._finder, name)


sys.meta_path[:] = [_Hiding(f) for f in sys.meta_path]
