"""What a result was measured on: device, CPU/GPU model, versions, load, git commit.

Provenance: ``git_commit`` is ``git rev-parse HEAD`` of the checkout, unless the environment
variable ``CSL_COMMIT`` is set, which then replaces it (``git_commit_from`` says which, and
``git_head`` keeps git's answer): on a machine that got a copy of the working tree with a
stale ``.git`` (the GPU machine), git names the wrong commit, so the caller passes the right
one (``CSL_COMMIT=$(git rev-parse HEAD)``; ``benchmarks/gpu_check.sh`` sets it when the
copy's sources match its HEAD). ``source_hash`` is a SHA-256 of the source files under
``csl_fast/`` and ``csrc/`` (:func:`source_hash`), whatever git says: the same hash from a
checkout of the named commit proves the result came from those sources."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from .harness import GiB, _why


def environment(device: torch.device | str) -> dict:
    dev = torch.device(device)
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": dev.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu_model": _cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": _loadavg(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton"] = f"not importable ({_why(exc)})"
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        env["liger_kernel"] = version("liger-kernel")
    except Exception:
        env["liger_kernel"] = None
    import csl_fast

    from .. import _ext
    from .._ext import EXTENSION_ERROR, backend_status

    env["csl_fast"] = csl_fast.__version__
    # which code ran: an editable install's import hook can hand out another checkout's
    # build, which the commit and source hash (of this tree) would not show
    env["csl_fast_module"] = csl_fast.__file__
    env["extension"] = getattr(_ext._C, "__file__", None) if _ext._C is not None else None
    env["extension_error"] = EXTENSION_ERROR
    env["backends"] = backend_status(dev)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / GiB, 1),
            sm=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            driver=_nvidia_smi("driver_version"),
        )
    env.update(_git())
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except Exception:
        return None


#: The files :func:`source_hash` reads: sources, not build outputs (``_C*.so``, ``build/``).
SOURCE_DIRS = ("csl_fast", "csrc")
SOURCE_SUFFIXES = (".py", ".c", ".cc", ".cpp", ".h", ".hpp", ".cu", ".cuh")


def source_hash(root: str | Path | None = None) -> str | None:
    """SHA-256 (hex) over the sorted relative paths and contents of the source files
    (:data:`SOURCE_SUFFIXES`) under :data:`SOURCE_DIRS` of ``root`` (default: this checkout),
    ``__pycache__`` left out; None when there are none. Reproduce it for a commit with
    ``python -c "from csl_fast.bench.env import source_hash; print(source_hash('.'))"`` in a
    clean checkout of it."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    files = sorted(
        p
        for d in SOURCE_DIRS
        if (root / d).is_dir()
        for p in (root / d).rglob("*")
        if p.is_file() and p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts
    )
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        data = p.read_bytes()
        h.update(f"{p.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _git() -> dict:
    root = Path(__file__).resolve().parents[2]  # the checkout: csl_fast/bench/env.py

    def git(*args):
        try:
            out = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            )
            return out.stdout.strip() if out.returncode == 0 else None
        except Exception:
            return None

    head = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    out = {
        "git_commit": head,
        "git_commit_from": "git rev-parse HEAD" if head else None,
        "git_dirty": bool(dirty) if head else None,
        "source_hash": source_hash(root),
    }
    override = os.environ.get("CSL_COMMIT", "").strip()
    if override:
        out.update(git_commit=override, git_commit_from="CSL_COMMIT", git_head=head)
        if not head or not head.startswith(override):
            out["git_dirty"] = None  # measured against another commit: says nothing here
    return out


def device_slug(env: dict) -> str:
    if env["device"] == "cuda":
        name = env.get("gpu", "cuda")
    else:
        name = f"cpu-{env['cpu_model']}-{env['cpu_cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
