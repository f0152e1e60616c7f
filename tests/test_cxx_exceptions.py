"""Errors raised in csl_fast's C++ code reach Python as the right exception, in a child
process, so that a crash is one failed test naming the case, not a dead pytest worker.

On the second GPU check every ``TORCH_CHECK_VALUE``/``TORCH_CHECK_INDEX`` in csrc killed the
process ("Fatal Python error: Segmentation fault") while ``TORCH_CHECK_TYPE`` raised
``TypeError`` (benchmarks/results/gpu-check-h200-2026-11-30-second.md;
benchmarks/exception_probe.py tells the build settings apart). Each case here goes through
one of the two ways out of C++: the one-call CPU step (``_C.step``, its own
``HANDLE_TH_ERRORS``) and ``torch.ops`` (torch's handler), each exception type, with and
without integers in the message. The cause was the messages' integers, formatted through an
``std::ostream`` in the extension (the third check, 2026-12-04): ``csrc/message.h`` formats
them without one.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

import csl_fast

# Each case: name, expected exception, code run with torch, csl_fast and the inputs defined.
CASES = [
    ("step ValueError", "ValueError", "csl_fast.accumulate(z, y[:3], i, csl, backend='cpu')"),
    ("step IndexError", "IndexError",
     "i[1] = 99; csl_fast.accumulate(z, y, i, csl, backend='cpu', validate=False)"),
    ("step TypeError", "TypeError", "csl_fast.accumulate(z, y, i.float(), csl, backend='cpu')"),
    ("op ValueError", "ValueError",
     "torch.ops.csl_fast.cross_entropy_fwd_inplace(z.t(), y[:5], None, -100, 0.0, 1)"),
    ("op TypeError", "TypeError",
     "torch.ops.csl_fast.cross_entropy_bwd(z, y, None, stats, scale, -100, 0.0)"),
    ("op ValueError after TypeError checks", "ValueError",
     "torch.ops.csl_fast.cross_entropy_bwd(z.half(), y, None, stats[:, :3], scale, -100, 0.0)"),
]  # fmt: skip

CHILD = """
import sys, torch, csl_fast
device = sys.argv[1]
for name, code in {cases!r}:
    if device != "cpu" and name.startswith("step"):
        continue  # (the one-call step is the CPU backend's)
    z = torch.randn(4, 5, device=device)
    y = torch.randint(0, 5, (4,), device=device)
    i = torch.arange(4, device=device)
    csl = torch.zeros(6, device=device)
    stats = torch.ops.csl_fast.cross_entropy_fwd(z.half(), y, None, -100, 0.0, 0)[2]
    scale = torch.ones(4, device=device)
    try:
        exec(code)
        print(name, "|none|", flush=True)
    except Exception as e:
        print(name, "|" + type(e).__name__ + "|", str(e).splitlines()[0], flush=True)
"""


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cxx_errors_raise_python_exceptions(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: this case runs on a GPU")
    if device not in csl_fast.available_backends(device):
        pytest.skip(f"no {device} C++ kernels in csl_fast._C")
    cases = [(name, code) for name, _, code in CASES]
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD.format(cases=cases)), device],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    got = {}
    for line in child.stdout.splitlines():
        name, kind, message = line.split("|", 2)
        got[name.strip()] = (kind, message.strip())
    for name, expected, _ in CASES:
        if device != "cpu" and name.startswith("step"):
            continue
        assert name in got, (
            f"{device}: the process died (exit {child.returncode}) at '{name}', which should "
            f"raise {expected}; stderr:\n{child.stderr[-3000:]}"
        )
        assert got[name][0] == expected, (name, got[name])
        assert got[name][1].startswith("csl_fast"), (name, got[name])
    assert child.returncode == 0, child.stderr[-3000:]


def test_csrc_formats_its_messages_without_a_stream():
    """Every check in csrc goes through csrc/message.h's CSL_CHECK*: a TORCH_CHECK with a
    number in its message crashed the process on the H200 check's compiler."""
    import re
    from pathlib import Path

    csrc = Path(__file__).parents[1] / "csrc"
    pattern = re.compile(r"\b(TORCH_CHECK\w*|c10::str)\(")
    found = [
        f"{path.relative_to(csrc)}:{n}: {line.strip()}"
        for path in sorted(csrc.rglob("*"))
        if path.suffix in {".h", ".cpp", ".cu", ".cuh"} and path.name != "message.h"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, "use CSL_CHECK* (csrc/message.h):\n" + "\n".join(found)
