"""Compile every Triton kernel variant to a CUDA binary for sm_90 without a GPU.

The interpreter accepts programs the real compiler rejects (types of loop-carried values,
constexpr misuse, ...). ``triton.compile`` with an explicit ``GPUTarget`` runs the whole
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin via the bundled ptxas) on any machine.
Run as ``python tests/_triton/compile_sm90.py [minimal|quick|full]``; it sets
``TRITON_INTERPRET=0`` itself, prints one line per variant and exits non-zero on the first
failure. ``test_triton_compile_sm90.py`` runs the minimal set (set
``CSL_FAST_TRITON_AOT=quick`` or ``full`` for more).
"""

from __future__ import annotations

import itertools
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from csl_fast._triton import cross_entropy, cross_entropy_bwd, grad_norms, record, scatter

TARGET = GPUTarget("cuda", 90, 32)


def _compile(fn, signature: dict[str, str], constexprs: dict[str, object], num_warps: int) -> None:
    """Compiles ``fn`` as typed, then as a launcher may also type it (:func:`_specialised`)."""
    for sig, const in ((signature, constexprs), _specialised(signature, constexprs)):
        sig = dict(sig)
        for name in const:
            sig[name] = "constexpr"
        src = ASTSource(fn=fn, signature=sig, constexprs=const)
        triton.compile(src, target=TARGET, options={"num_warps": num_warps})


def _specialised(signature: dict[str, str], constexprs: dict[str, object]):
    """The other types the launches can give the scalar arguments: the JIT and
    torch.compile (Inductor) both turn an integer argument equal to 1 (a size, a stride, a
    count) into a constexpr Python int, on which ``.to()`` and other tensor methods fail,
    and Inductor passes Python floats as fp64 (the JIT as fp32), which promotes what they
    touch. All at once: every integer 1, every float fp64."""
    sig, const = {}, dict(constexprs)
    for name, ty in signature.items():
        if ty in ("i32", "i64"):
            const[name] = 1
        else:
            sig[name] = "fp64" if ty == "fp32" else ty
    return sig, const


def main(mode: str) -> None:
    """mode: "minimal" (one variant per code path, ~10 s), "quick" or "full"."""
    quick = mode != "full"
    dtypes = (
        ["bf16"] if mode == "minimal" else ["fp32", "bf16"] if quick else ["fp32", "fp16", "bf16"]
    )
    ce_sig_base = {
        "target_ptr": "*i64",
        "weight_ptr": "*fp32",
        "denom_ptr": "*fp32",
        "loss_ptr": "*fp32",
        "stats_ptr": "*fp32",
        "B": "i32",
        "C": "i32",
        "stride_lr": "i64",
        "stride_gr": "i64",
        "ignore_index": "i32",
        "eps": "fp32",
        "zloss_ptr": "*fp32",
        "cap": "fp32",
        "zs": "fp32",
    }
    layouts = [(True, 16, 128, 8), (True, 1, 8192, 16), (False, 1, 1024, 4)]  # the defaults
    if mode == "minimal":
        layouts = [layouts[0], layouts[2]]
    for dt, (fused, rows, block, warps) in itertools.product(dtypes, layouts):
        flags = (
            [(True, True, True), (False, False, False)]
            if quick
            else itertools.product([0, 1], repeat=3)
        )
        if mode == "minimal":
            flags = [(True, True, True)]
        # The language-model extras (soft-capping, z-loss) on every other variant; minimal:
        # on the two-pass layout.
        for variant, (has_w, smooth, mean) in enumerate(flags):
            extras = variant % 2 == 1 or (mode == "minimal" and not fused)
            sig = {"logits_ptr": f"*{dt}", "grad_ptr": f"*{dt}", **ce_sig_base}
            sig = {k: sig[k] for k in cross_entropy._ce_fwd_kernel.arg_names if k in sig}
            const = dict(
                HAS_WEIGHT=bool(has_w),
                HAS_SMOOTH=bool(smooth),
                IS_MEAN=bool(mean),
                FUSED=fused,
                ROWS=rows,
                BLOCK_C=block,
                MANUAL_BF16_RNE=False,
                INPLACE=bool(mean),
                HAS_CAP=extras,
                HAS_ZLOSS=extras,
            )
            # The loss and statistics alone (the gradient pass compiled out) on the first
            # variant of each layout.
            for has_grad in (True, False) if variant == 0 else (True,):
                const["HAS_GRAD"] = has_grad
                _compile(cross_entropy._ce_fwd_kernel, sig, const, warps)
                print("ok cross_entropy", dt, const, flush=True)
    # The mean's denominator: weighted or not, int64 or int32 targets.
    denom_variants = [("i64", False), ("i64", True), ("i32", True), ("i32", False)]
    for tgt_t, has_w in denom_variants[: 2 if mode == "minimal" else 4]:
        sig = {"target_ptr": f"*{tgt_t}", "weight_ptr": "*fp32", "out_ptr": "*fp32"}
        sig |= {"B": "i32", "C": "i32", "ignore_index": "i32"}
        const = dict(HAS_WEIGHT=has_w, BLOCK=cross_entropy.DENOM_BLOCK)
        _compile(cross_entropy._denom_kernel, sig, const, 4)
        print("ok denom", tgt_t, has_w, flush=True)
    # The float16/bfloat16 backward: several rows per program and one wide row in tiles; the
    # extras (soft-cap, z-loss) on the variants without weights.
    bwd_layouts = [(16, 128, 4), (1, 2048, 8)]
    for dt, (rows, block, warps) in itertools.product(["fp16", "bf16"], bwd_layouts):
        if mode == "minimal" and dt == "fp16":
            continue
        for has_w in (True, False) if mode != "minimal" else (True,):
            sig = {"logits_ptr": f"*{dt}", "grad_ptr": f"*{dt}", "target_ptr": "*i64"}
            sig |= {"weight_ptr": "*fp32", "wsum_ptr": "*fp32", "stats_ptr": "*fp32"}
            sig |= {"scale_ptr": "*fp32", "B": "i32", "C": "i32", "stride_lr": "i64"}
            sig |= {"ignore_index": "i32", "eps": "fp32", "cap": "fp32", "zs": "fp32"}
            sig = {k: sig[k] for k in cross_entropy_bwd._ce_bwd_kernel.arg_names if k in sig}
            const = dict(
                HAS_WEIGHT=has_w,
                HAS_SMOOTH=has_w,
                PER_ROW_SCALE=has_w,
                ROWS=rows,
                BLOCK_C=block,
                MANUAL_BF16_RNE=False,
                STAT_LOSS=0,
                STAT_VALID=5,
                BOUND=cross_entropy_bwd.LOSS_BOUND,
                HAS_CAP=not has_w or mode == "minimal",
                HAS_ZLOSS=not has_w or mode == "minimal",
            )
            _compile(cross_entropy_bwd._ce_bwd_kernel, sig, const, warps)
            print("ok cross_entropy_bwd", dt, const, flush=True)
    for dt in ["fp32", "fp64"] if mode == "minimal" else ["fp32", "bf16", "fp64"]:
        sig = {"x_ptr": f"*{dt}", "out_ptr": "*fp32", "B": "i32", "N": "i32", "scale": "fp32"}
        const = dict(IS_FP64=dt == "fp64", ROWS=4, BLOCK=1024)
        _compile(grad_norms._row_sqnorm_kernel, sig, const, 8)
        print("ok grad_norms", dt, flush=True)
    scatter_types = [("fp32", "i64"), ("fp64", "fp32"), ("fp32", "i32"), ("fp64", "fp64")]
    for csl_t, cnt_t in scatter_types[:1] if mode == "minimal" else scatter_types:
        base = {"stats_ptr": "*fp32", "csl_ptr": f"*{csl_t}", "count_ptr": f"*{cnt_t}", "B": "i32"}
        base |= {"N_CSL": "i64", "N_CNT": "i64"}  # buffer sizes: out-of-range indices skipped
        strides = {"stride_sr": "i32", "stride_sc": "i32", "stride_csl": "i32", "stride_cnt": "i32"}
        const = dict(HAS_CSL=True, HAS_COUNT=True, BLOCK=1024)
        sig = {"index_ptr": "*i64", **base, **strides}
        sig = {k: sig[k] for k in scatter._scatter_atomic_kernel.arg_names if k in sig}
        _compile(scatter._scatter_atomic_kernel, sig, const, 4)
        sig = {"sorted_ptr": "*i64", "perm_ptr": "*i64", **base, **strides}
        sig = {k: sig[k] for k in scatter._scatter_sorted_kernel.arg_names if k in sig}
        _compile(scatter._scatter_sorted_kernel, sig, const, 4)
        print("ok scatter", csl_t, cnt_t, flush=True)
    for f_t in ["fp32"] if mode == "minimal" else ["fp32", "fp64"]:
        sig = {"stats_ptr": "*fp32", "sorted_ptr": "*i64", "perm_ptr": "*i64"}
        sig |= {"max_prob_ptr": "*fp32", "last_loss_ptr": f"*{f_t}"}
        sig |= {"last_max_prob_ptr": f"*{f_t}", "last_correct_ptr": "*i1"}
        sig |= {"forgetting_ptr": "*i32", "learned_epoch_ptr": "*i32"}
        sig |= {f"{k}_ptr": f"*{f_t}" for k in ("grad_norm_sum", "margin_sum", "p_true_sum")}
        sig |= {"p_true_sq_sum_ptr": f"*{f_t}"}
        sig |= {f"suggest_{k}_ptr": "*i32" for k in ("label", "votes", "hits")}
        sig |= {"B": "i32", "N": "i64", "epoch": "i32", "epoch_now_ptr": "*i64"}
        sig |= {"stride_sr": "i32", "stride_sc": "i32"}
        flags = ("MAX_PROB", "TRANSITIONS", "GRAD_NORM_SUM", "MARGIN_SUM", "P_TRUE_SUM")
        for on in (True, False) if mode != "minimal" else (True,):
            const = {f"HAS_{k}": on for k in (*flags, "P_TRUE_SQ_SUM", "SUGGEST", "EPOCH_NOW")}
            const["BLOCK"] = record.BLOCK
            _compile(record._record_sorted_kernel, sig, const, 4)
            print("ok record_last", f_t, on, flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "quick")
