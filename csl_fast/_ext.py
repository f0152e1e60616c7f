"""Which kernel backends this installation has, and why one is missing.

Backends, in the order ``backend="auto"`` prefers them:

- ``"triton"``: Triton kernels; the default for CUDA tensors.
- ``"cuda"``: CUDA C++ kernels from ``csrc/cuda`` (built when torch has CUDA and nvcc exists).
- ``"cpu"``: fused C++ kernels from ``csrc/cpu``; the default for CPU tensors.
- ``"reference"``: pure PyTorch (``csl_fast/reference.py``); always available.

Triton also runs on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for tests only), so it is
offered for CPU tensors only when asked for by name.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import json
import os
import sys
import types
import warnings
from pathlib import Path

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")

#: The folder this ``csl_fast`` was imported from.
PACKAGE_DIR = Path(__file__).resolve().parent


def extension_files(package_dir: Path) -> list[Path]:
    """The compiled extension files (``_C.<abi>.so`` / ``.pyd``) in a csl_fast folder."""
    return [
        package_dir / f"_C{suffix}"
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        if (package_dir / f"_C{suffix}").is_file()
    ]


def source_checkout() -> Path | None:
    """The source checkout this csl_fast was imported from, or None for an installed copy."""
    root = PACKAGE_DIR.parent
    return root if (root / "setup.py").is_file() and (root / "csrc").is_dir() else None


def other_copies() -> list[Path]:
    """csl_fast folders other than :data:`PACKAGE_DIR` that this Python could import: one on
    another ``sys.path`` entry (e.g. site-packages, hidden by a checkout in the current
    directory), or the source folder of an editable install (pip records it in
    ``direct_url.json``; its import hook is not a ``sys.path`` entry)."""
    found: list[Path] = []

    def add(folder: Path) -> None:
        folder = folder.resolve()
        if folder != PACKAGE_DIR and folder not in found and (folder / "__init__.py").is_file():
            found.append(folder)

    for entry in sys.path:
        try:
            spec = importlib.machinery.PathFinder.find_spec("csl_fast", [entry or os.getcwd()])
        except (ImportError, OSError, ValueError):
            continue
        for location in (spec and spec.submodule_search_locations) or ():
            add(Path(location))
    for dist in importlib.metadata.distributions(name="csl_fast"):
        try:
            url = json.loads(dist.read_text("direct_url.json") or "{}")
        except ValueError:
            continue
        if url.get("dir_info", {}).get("editable") and url.get("url", "").startswith("file://"):
            add(Path(url["url"].removeprefix("file://")) / "csl_fast")
    return found


def extension_advice(error: str) -> str:
    """What happened when ``csl_fast._C`` failed to load with ``error``, and the command that
    fixes it: the imported folder, any installed copy it hides, and why."""
    here, checkout = PACKAGE_DIR, source_checkout()
    built = extension_files(here)
    rebuild = (
        f"`pip install --no-build-isolation -e {checkout}`"
        if checkout
        else "`pip install --no-build-isolation --force-reinstall --no-deps <csl_fast source>`"
    )
    if OTHER_TREE in error:
        # (an editable install's hook found it: "installed without its compiled
        # extension ... --force-reinstall" named the wrong cause)
        return (
            f"csl_fast was imported from {here}, which has no compiled extension of its own; "
            "the one found belongs to another csl_fast folder (an editable install elsewhere), "
            f"whose kernels may be of other sources. Build this one: {rebuild}, or run from "
            "the folder the editable install points at."
        )
    if built and STALE in error:
        return (
            f"{built[0]} was built from older csl_fast sources than the Python code beside "
            f"it (after a `git pull` or an upgrade without a rebuild). Rebuild it: {rebuild}."
        )
    if built:
        return (
            f"{built[0]} exists but did not load ({error}); most often it was built against "
            f"another torch or Python than this one (torch {torch.__version__}, Python "
            f"{sys.version_info.major}.{sys.version_info.minor}). Rebuild it: {rebuild}."
        )
    with_ext = [d for d in other_copies() if extension_files(d)]
    if checkout and with_ext:
        return (
            f"csl_fast was imported from the source checkout {here}, which has no compiled "
            f"extension, not from the installed copy in {with_ext[0]}, which has one: Python "
            "puts the current directory (or the running script's) first on sys.path, so the "
            "checkout hides the installed package. Fix: run from any other directory, "
            f"e.g. `cd {checkout.parent}` (keep scripts of your own outside the checkout); to "
            f"work on csl_fast itself, {rebuild} builds the extension into the checkout."
        )
    if checkout:
        return (
            f"csl_fast was imported from the source checkout {here}, where the extension has "
            f"not been built. Fix: {rebuild} (compiles it into the checkout)."
        )
    return (
        f"csl_fast in {here} was installed without its compiled extension (built with "
        f"CSL_FAST_NO_EXT=1, or by a copy that skipped the build). Fix: {rebuild}."
    )


#: Every op schema ``csrc/csl_fast.cpp`` defines (``tests/test_ext_diagnosis.py`` keeps the
#: two in step). An extension built from older sources lacks the newer ones, and the
#: Python side would fail registering kernels for them: it is treated as not loaded.
OPS = (
    "cross_entropy_fwd",
    "cross_entropy_fwd_inplace",
    "cross_entropy_fwd_stats",
    "cross_entropy_bwd",
    "cross_entropy_fwd_extra",
    "cross_entropy_fwd_extra_inplace",
    "cross_entropy_fwd_extra_stats",
    "scatter_stats",
    "record_last",
    "record_vote",
    "input_grad_norms",
    "record_input_grad",
    "bce_fwd",
    "bce_bwd",
    "bce_record",
    "record_loss",
)
#: Arguments added to an op's schema after the op first shipped: an extension whose op
#: lacks one was built from older sources too (every call would fail on the argument count).
NEWER_ARGS = {"bce_record": "label_prob"}
#: What the load error says when the extension lacks some of :data:`OPS`.
STALE = "built from older sources"
#: What it says when the extension found belongs to another csl_fast folder.
OTHER_TREE = "another csl_fast tree"


def missing_ops(ops: tuple[str, ...] = OPS) -> list[str]:
    """The ``csl_fast::`` ops of ``ops`` that no loaded library defines, or defines without
    an argument of :data:`NEWER_ARGS` (named ``"op (its arg argument)"``)."""
    missing = []
    for op in ops:
        packet = getattr(torch.ops.csl_fast, op, None)
        if packet is None:
            missing.append(op)
        elif (arg := NEWER_ARGS.get(op)) and arg not in (
            a.name for a in packet.default._schema.arguments
        ):
            missing.append(f"{op} (its {arg} argument)")
    return missing


def load_extension() -> types.ModuleType:
    """``csl_fast._C``, refused (``ImportError``) when it was built from older sources or
    belongs to another csl_fast tree: a copy of the package without its own build (a git
    worktree, a copied folder) reaches an editable install's ``_C`` through that install's
    import hook, whose kernels may be of other sources than the Python beside them."""
    module = importlib.import_module("csl_fast._C")
    if missing := missing_ops():
        raise ImportError(f"csl_fast._C was {STALE}: it lacks the ops {', '.join(missing)}")
    where = Path(getattr(module, "__file__", "") or "").resolve().parent
    if where != PACKAGE_DIR:
        raise ImportError(
            f"csl_fast._C was found in {where}, {OTHER_TREE} than this one "
            f"({PACKAGE_DIR}), through an editable install's import hook: its kernels may be "
            "of other sources than this tree's Python"
        )
    return module


_C = None
#: Why ``csl_fast._C`` could not be loaded, or None when it loaded.
EXTENSION_ERROR: str | None = None
#: What to do about :data:`EXTENSION_ERROR` (:func:`extension_advice`), or None.
EXTENSION_ADVICE: str | None = None
try:
    _C = load_extension()
except Exception as exc:
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"
    EXTENSION_ADVICE = extension_advice(EXTENSION_ERROR)
    warnings.warn(
        "csl_fast: the compiled extension csl_fast._C is not available; running on the "
        f"pure-PyTorch reference, which is slower. {EXTENSION_ADVICE} "
        "`python -m csl_fast.info` says more.",
        RuntimeWarning,
        stacklevel=2,
    )

_TRITON_ERROR: str | None = None
_triton_checked = False


def _has_kernel(op: str, key: str) -> bool:
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"csl_fast::{op}", key)


def triton_error() -> str | None:
    """Why the Triton backend is unavailable, or None when it can be used."""
    global _TRITON_ERROR, _triton_checked
    if not _triton_checked:
        _triton_checked = True
        try:
            importlib.import_module("csl_fast._triton")
            importlib.import_module("csl_fast.ops").register_triton_autograd()
        except Exception as exc:
            _TRITON_ERROR = f"{type(exc).__name__}: {exc}"
    return _TRITON_ERROR


def backend_status(device: torch.device | str) -> dict[str, str | None]:
    """For each backend, None if it can run on ``device``, else the reason it cannot."""
    dev = torch.device(device)
    status: dict[str, str | None] = {"reference": None}
    ext = None if _C is not None else f"compiled extension not loaded ({EXTENSION_ERROR})"
    if dev.type == "cuda":
        status["cuda"] = ext or (
            None
            if _has_kernel("cross_entropy_fwd", "CUDA")
            else "csl_fast._C was built without CUDA (torch without CUDA, or no nvcc at build time)"
        )
        status["triton"] = triton_error()
        status["cpu"] = "the cpu backend takes CPU tensors"
    else:
        status["cpu"] = ext or (
            None if _has_kernel("cross_entropy_fwd", "CPU") else "no CPU kernel registered"
        )
        status["cuda"] = "the cuda backend takes CUDA tensors"
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        status["triton"] = (
            triton_error() if interp else "Triton runs on CPU tensors only with TRITON_INTERPRET=1"
        )
    return {name: status[name] for name in BACKENDS}


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, in the order ``backend="auto"`` tries them."""
    return [name for name, why in backend_status(device).items() if why is None]


_resolved: dict[tuple[str, str, bool], str] = {}


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend for ``backend`` (a name or ``"auto"``) on ``device``.

    ``dtype``: the logits' dtype, from the cross-entropy entry points. Triton's
    cross-entropy kernels take no float64, so for float64 logits ``"auto"`` passes over
    Triton to the CUDA kernels (or the reference); asked for by name, Triton says so.
    Cached, and a constant to torch.compile, so it costs nothing per step.
    """
    key = (backend, device.type, dtype == torch.float64)
    name = _resolved.get(key)
    if name is None:
        name = _resolve(backend, device, key[2])
        # Only Triton on CPU tensors depends on the environment (TRITON_INTERPRET), which
        # may change at run time; "auto" never picks it there.
        if not (backend == "triton" and device.type != "cuda"):
            _resolved[key] = name
    return name


# What torch.compiler.assume_constant_result sets; the decorator itself would import
# torch._dynamo (seconds) on every `import csl_fast`. tests/test_ops.py compiles with
# fullgraph=True, which fails if this stops working.
resolve_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _resolve(backend: str, device: torch.device, float64: bool) -> str:
    if backend == "auto":
        for name in BACKENDS:
            # The Triton interpreter is far too slow to be chosen for CPU tensors.
            if name == "triton" and (device.type != "cuda" or float64):
                continue
            if backend_status(device)[name] is None:
                return name
    if backend not in BACKENDS:
        raise ValueError(f"csl_fast: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    why = backend_status(device)[backend]
    if why is not None:
        raise RuntimeError(
            f"csl_fast: backend {backend!r} cannot run on {device.type} tensors: {why}. "
            f"Available here: {available_backends(device)}; backend='auto' picks the fastest."
        )
    return backend
