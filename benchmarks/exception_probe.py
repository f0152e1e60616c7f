"""Which C++ exceptions from a torch extension reach Python on this machine, and which
crash it: a diagnostic for the segmentation faults of the second GPU check
(benchmarks/results/gpu-check-h200-2026-11-30-second.md).

There, every ``TORCH_CHECK_VALUE`` and ``TORCH_CHECK_INDEX`` that csl_fast's C++ code
raised killed the process, while every ``TORCH_CHECK_TYPE`` raised a Python ``TypeError``.
This builds one small extension per compiler setting, throws each combination through
``HANDLE_TH_ERRORS`` (as ``csl_fast._C.step``) in a fresh process, and prints a table: the
exception that reached Python, or the signal that ended the process. The third check
(benchmarks/results/gpu-check-h200-2026-12-04.md) answered it: with that machine's
``/opt/gcc/bin/g++`` every message that formats an integer crashed, of any exception type
and with every setting tried, and no message without one did; torch's own errors with
integers (thrown inside libtorch) were raised. csl_fast's checks therefore format their
messages without a stream (``csrc/message.h``): the last two cases are that remedy, and a
plain ``std::ostringstream << int`` with nothing thrown.

    python benchmarks/exception_probe.py [--out DIR]   # 2 min on 2 cores; 5 builds in parallel

Compiler: ``$CXX`` or ``c++``; link flags: Python's ``LDSHARED`` (``-Wl,-Bsymbolic-functions``
on Debian/Ubuntu Pythons), as ``setup.py build_ext`` links.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from run_meta import add_force, refuse_overwrite, write_atomic

SOURCE = r"""
#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/csrc/Exceptions.h>
#include <cstdint>
#include <sstream>

#include "message.h"

namespace {
int64_t volatile three = 3;

PyObject* raise(PyObject*, PyObject* arg) {
  HANDLE_TH_ERRORS
  switch (PyLong_AsLong(arg)) {
    case 0: TORCH_CHECK_VALUE(false, "value, no integer");
    case 1: TORCH_CHECK_VALUE(false, "value, integer ", three);
    case 2: TORCH_CHECK_INDEX(false, "index, integer ", three);
    case 3: TORCH_CHECK_TYPE(false, "type, no integer");
    case 4: TORCH_CHECK_TYPE(false, "type, integer ", three);
    case 5: TORCH_CHECK(false, "runtime, integer ", three);
    case 6: CSL_CHECK_VALUE(false, "value, integer ", three);
    case 7: {
      std::ostringstream os;
      os << "integer " << three;
      return PyUnicode_FromString(os.str().c_str());
    }
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {{"raise_", raise, METH_O, nullptr}, {nullptr, nullptr, 0, nullptr}};
}  // namespace

#define INIT2(name) PyInit_##name
#define INIT(name) INIT2(name)
PyMODINIT_FUNC INIT(PROBE_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, PROBE_STR, nullptr, -1, methods};
  return PyModule_Create(&def);
}
"""

# case name -> what a sound build gives: the exception's name, or "no exception"
CASES = {"ValueError no int": "ValueError", "ValueError int": "ValueError",
         "IndexError int": "IndexError", "TypeError no int": "TypeError",
         "TypeError int": "TypeError", "RuntimeError int": "RuntimeError",
         "ValueError int, csl_fast::message": "ValueError",
         "ostringstream << int, no throw": "no exception"}  # fmt: skip
# setup.py's compiler flags, then one change at a time; the last adds a link flag that
# binds the module's own type information and vtables to its own copies.
BASE = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-g0"]
VARIANTS = {
    "setup.py": (BASE, []),
    "c++17": (["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math", "-g0"], []),
    "no -fopenmp": (["-O3", "-std=c++20", "-fno-trapping-math", "-g0"], []),
    "-O0 c++17": (["-O0", "-std=c++17"], []),
    "setup.py -Wl,-Bsymbolic": (BASE, ["-Wl,-Bsymbolic"]),
}


def build(name: str, flags: list[str], ldflags: list[str], work: Path) -> Path:
    import torch
    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX", "c++")
    src = work / f"{name}.cpp"
    src.write_text(SOURCE)
    obj, lib = work / f"{name}.o", work / f"{name}.so"
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    inc = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    inc.append(f"-I{Path(__file__).resolve().parent.parent / 'csrc'}")  # message.h
    defs = [f"-DPROBE_NAME={name}", f'-DPROBE_STR="{name}"', "-DTORCH_API_INCLUDE_EXTENSION_H"]
    subprocess.run([cxx, "-fPIC", abi, *defs, *inc, *flags, "-c", str(src), "-o", str(obj)],
                   check=True, capture_output=True)  # fmt: skip
    ldshared = shlex.split(sysconfig.get_config_var("LDSHARED") or "cc -shared")[1:]
    torch_lib = Path(torch.__file__).parent / "lib"
    libs = ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    omp = ["-fopenmp"] if "-fopenmp" in flags else []
    subprocess.run([cxx, *ldshared, *ldflags, str(obj), f"-L{torch_lib}", *libs, *omp,
                    "-o", str(lib)], check=True, capture_output=True)  # fmt: skip
    return lib


# torch's own C++ errors with integers in the message (thrown in libtorch_cpu): whether
# the machine crashes on those too, whatever an extension does.
TORCH_CASES = {"torch RuntimeError int": "torch.zeros(2).view(3)",
               "torch IndexError int": "torch.zeros(2)[5]"}  # fmt: skip


def run_case(lib: Path | None, case: int | str) -> str:
    if lib is None:
        call = case
    else:
        call = (
            f"spec = importlib.util.spec_from_file_location({lib.stem!r}, {str(lib)!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            f"m.raise_({case})"
        )
    code = (
        "import importlib.util, torch\n"
        f"try:\n    exec({call!r})\nexcept Exception as e:\n    print(type(e).__name__)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if p.returncode < 0:
        return f"signal {-p.returncode}"
    if p.returncode:
        return f"exit {p.returncode}"
    return p.stdout.strip() or "no exception"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for the table (probe.md)")
    add_force(ap)
    args = ap.parse_args()
    refuse_overwrite(ap, args.force, args.out and args.out / "probe.md")
    work = Path(tempfile.mkdtemp(prefix="csl_exc_probe_"))
    names = {v: f"probe{i}" for i, v in enumerate(VARIANTS)}
    with concurrent.futures.ThreadPoolExecutor(len(VARIANTS)) as pool:
        built = pool.map(lambda v: build(names[v], *VARIANTS[v], work), VARIANTS)
        libs = dict(zip(VARIANTS, built, strict=True))
        rows = {v: list(pool.map(lambda c, lib=libs[v]: run_case(lib, c), range(len(CASES))))
                for v in VARIANTS}  # fmt: skip
    lines = ["| build | " + " | ".join(CASES) + " |", "|---" * (len(CASES) + 1) + "|"]
    lines += [f"| {v} | " + " | ".join(rows[v]) + " |" for v in VARIANTS]
    torch_rows = [f"{k}: {run_case(None, v)}" for k, v in TORCH_CASES.items()]
    table = "\n".join([*lines, "", *torch_rows])
    cxx, ldshared = os.environ.get("CXX", "c++"), sysconfig.get_config_var("LDSHARED")
    print(f"compiler: {cxx}; LDSHARED: {ldshared}")
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out / "probe.md", table + "\n")
    expected = list(CASES.values())
    torch_ok = all(r.endswith(k.split()[1]) for r, k in zip(torch_rows, TORCH_CASES, strict=True))
    return 0 if torch_ok and all(rows[v] == expected for v in VARIANTS) else 1


if __name__ == "__main__":
    sys.exit(main())
