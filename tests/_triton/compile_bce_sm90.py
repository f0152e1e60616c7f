"""Compile the binary-cross-entropy Triton kernels (csl_fast/_triton/bce.py) to sm_90
cubins without a GPU, as ``compile_sm90.py`` does for the others. Run as
``python tests/_triton/compile_bce_sm90.py``; prints one line per variant, exits non-zero
on the first failure (``test_triton_bce.py`` runs it)."""

from __future__ import annotations

import itertools
import os

os.environ["TRITON_INTERPRET"] = "0"

import triton.language as tl
from compile_sm90 import _compile

from csl_fast._triton import bce

_ACC = {"fp64": tl.float64}


def _sig(kernel, types: dict[str, str]) -> dict[str, str]:
    """Every runtime argument of ``kernel``: pointers and sizes as given, strides i64."""
    out = {}
    for name in kernel.arg_names:
        if name.isupper() and name not in ("B", "L", "N"):
            continue  # a constexpr
        out[name] = types.get(name, "i64")
    return out


def main() -> None:
    for dt, (rows, block) in itertools.product(("bf16", "fp32", "fp64"), ((32, 16), (2, 1024))):
        acc = _ACC.get(dt, tl.float32)
        acc_t = "fp64" if dt == "fp64" else "fp32"
        ptrs = {"z_ptr": f"*{dt}", "y_ptr": f"*{dt}", "w_ptr": f"*{acc_t}", "pw_ptr": f"*{acc_t}"}
        sizes = {"B": "i32", "L": "i32", "N": "i64", "n_mean": "i64"}
        for per_entry in (True, False):
            sig = {**ptrs, **sizes, "loss_ptr": f"*{dt}", "rows_ptr": f"*{acc_t}"}
            sig["stats_ptr"] = "*fp32"
            const = dict(HAS_W=True, HAS_PW=True, PER_ENTRY=per_entry, ACC=acc, ROWS=rows)
            const |= dict(BLOCK_L=block, MANUAL_BF16_RNE=False)
            _compile(bce._bce_fwd_kernel, _sig(bce._bce_fwd_kernel, sig), const, 4)
            sig = {**ptrs, **sizes, "g_ptr": f"*{dt}", "out_ptr": f"*{dt}"}
            _compile(bce._bce_bwd_kernel, _sig(bce._bce_bwd_kernel, sig), const, 4)
            print("ok bce fwd/bwd", dt, rows, block, per_entry, flush=True)
        bufs = {"csl_ptr": "*fp32", "count_ptr": "*i64", "wrong_ptr": "*i32", "mm_ptr": "*fp64"}
        bufs |= {"lc_ptr": "*fp32", "lm_ptr": "*fp64", "stats_ptr": "*fp32"}
        bufs |= {"index_ptr": "*i64", "sorted_ptr": "*i64", "perm_ptr": "*i64"}
        flags = ("CSL", "COUNT", "WRONG", "MM", "LC", "LM", "LP")
        # Every buffer; and label_prob alone, whose entry loss is then computed without
        # label_csl's branch (a name bound only in a pruned branch fails to compile).
        for given, lp in ((flags, "*fp32"), (("LP",), "*fp64")):
            const = {f"HAS_{k}": k in given for k in flags}
            const |= dict(ACC=acc, ROWS=rows, BLOCK_L=block)
            for kernel in (bce._bce_record_atomic_kernel, bce._bce_record_sorted_kernel):
                sig = {**ptrs, **sizes, **bufs, "lp_ptr": lp}
                _compile(kernel, _sig(kernel, sig), const, 4)
            print("ok bce record", dt, rows, block, "+".join(given), flush=True)


if __name__ == "__main__":
    main()
