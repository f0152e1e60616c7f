"""Build csl_fast and its compiled extension ``csl_fast._C``.

The extension is compiled against the torch that is already installed, so install
with ``pip install --no-build-isolation .`` (build isolation would fetch a second,
possibly different torch into a temporary environment and build against that).

CUDA sources in ``csrc/cuda`` are added when the installed torch has CUDA, an nvcc of the
same major CUDA version is found (another major version builds the CPU kernels only, with a
warning), and a GPU is visible or ``TORCH_CUDA_ARCH_LIST`` is set (it selects the
architectures; default "8.0;9.0" when a GPU is visible).
``CSL_FAST_NO_CUDA=1`` forces a CPU-only build; ``CSL_FAST_NO_EXT=1`` skips the
extension altogether (the package then runs on its pure-PyTorch reference).

The build compiles one file per job with ninja, one job per core (``MAX_JOBS`` overrides
it); ``pip install -v`` shows each compiler call. Measured build times:
benchmarks/results/build-time-2026-11-30.md.
"""

import glob
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
README = Path(ROOT) / "README.md"


def _parallel_build():
    """Let torch's BuildExtension compile in parallel: it uses ninja only when ``ninja`` runs
    from PATH, which misses the ninja of a virtual environment that is not activated; without
    ninja it compiles the files one by one."""
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass  # a ninja on PATH, or the serial build
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("MAX_JOBS", str(cores or 1))


def _cuda_toolkit_fits(torch, cuda_home: str) -> bool:
    """Whether nvcc under ``cuda_home`` can build for the installed torch: torch refuses a
    toolkit of another major CUDA version (e.g. nvcc 13 for a CUDA 12 torch) with an error
    that would stop the whole install. Then build the CPU kernels only and say why: CUDA
    tensors still run on the Triton backend."""
    import re
    import subprocess
    import warnings

    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True
        ).stdout
    except OSError:
        return False
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found is None:
        return True  # torch's own check decides
    if found.group(1) != torch.version.cuda.split(".")[0]:
        warnings.warn(
            f"csl_fast: nvcc {found.group(1)}.{found.group(2)} in {cuda_home} cannot build for "
            f"this torch (CUDA {torch.version.cuda}); building the CPU kernels only (CUDA tensors "
            "run on the Triton backend). For the CUDA C++ backend, point CUDA_HOME at a CUDA "
            f"{torch.version.cuda.split('.')[0]}.x toolkit and reinstall.",
            stacklevel=1,
        )
        return False
    return True


def _cuda_target_given(torch) -> bool:
    """Whether to compile the CUDA C++ kernels: for the GPU this machine has, or for the
    architectures ``TORCH_CUDA_ARCH_LIST`` names. A CUDA build of torch on a machine without
    a GPU (the default torch wheel on Linux) would otherwise spend minutes compiling kernels
    for GPUs that are not there; CUDA tensors elsewhere run on the Triton backend."""
    import warnings

    if torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return True
    warnings.warn(
        "csl_fast: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building the CPU kernels "
        "only (CUDA tensors run on the Triton backend). To build the CUDA C++ kernels for "
        "another machine, set TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0') and reinstall.",
        stacklevel=1,
    )
    return False


def _extensions():
    if os.environ.get("CSL_FAST_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = ["csrc/module.cpp", "csrc/csl_fast.cpp", "csrc/autograd.cpp", "csrc/bce_autograd.cpp"]
    sources += rel("csrc/cpu/*.cpp")
    # -fno-trapping-math lets GCC turn the clamps of the polynomial exp into vector blends
    # (it assumes FP exceptions do not trap; NaN and inf semantics are unchanged).
    # -g0 overrides the -g of Python's own CFLAGS: debug information for torch's headers is
    # much of the compile time and most of the object size; drop it here to debug the kernels.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-g0"]
    want_cuda = os.environ.get("CSL_FAST_NO_CUDA") != "1"
    cuda_sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    if (
        want_cuda
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and cuda_sources
        and _cuda_target_given(torch)
        and _cuda_toolkit_fits(torch, CUDA_HOME)
    ):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "csl_fast._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": [*cxx, "-DWITH_CUDA"], "nvcc": ["-O3", "-DWITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "csl_fast._C",
            sources,
            extra_compile_args=cxx,
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension}


_parallel_build()
ext_modules, cmdclass = _extensions()

setup(
    name="csl_fast",
    version="0.1.0",
    description="Cumulative Sample Loss for free: fused cross entropy that records per-sample "
    "training dynamics",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["csl_fast", "csl_fast.*"]),
    # PEP 561: type checkers read the package's annotations
    package_data={"csl_fast": ["py.typed"]},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "eval": ["scikit-learn", "cleanlab", "matplotlib", "tqdm", "pandas"],
        # The integrations, as tested (requirements-dev.txt); neither asks for another torch.
        "lightning": ["pytorch-lightning>=2.6,<2.7"],
        "huggingface": ["transformers>=5,<6", "accelerate>=1.1"],  # Trainer needs accelerate
    },
    entry_points={"console_scripts": ["csl-fast=csl_fast.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
