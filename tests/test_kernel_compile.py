"""Compile the Triton kernels for real GPUs without one (ahead of time, ptxas from the triton wheel).

The interpreter used by the other CPU tests accepts code the compiler rejects
(type mismatches across branches, bad pointer casts); this proves every
variant the launcher can request lowers to a Hopper (sm_90) and an Ampere
(sm_80) cubin, and that aligned full chunks compile to 16-byte vector loads
and stores (the kernel is bandwidth-bound). Runs in a subprocess: under TRITON_INTERPRET=1 ``@triton.jit``
functions cannot be compiled.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import itertools
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from wsm_optim.kernels.wsm_update import nonfinite_check_kernel, wsm_update_kernel

    ptrs = {"param_ptrs": "*i64", "numels": "*i64", "chunk_tensor": "*i32", "chunk_start": "*i64"}
    update_sig = {**ptrs, "acc_ptrs": "*i64", "completed_ptrs": "*i64", "origin_ptrs": "*i64", "kept_ptr": "*fp32",
                  "coefs": "*fp32", "meta": "*i64", "step_ptr": "*i64", "bad_step": "*i64", "ok_ptr": "*i32",
                  "n_tensors": "i32", "N_MERGES": "constexpr", "PHASE": "constexpr", "PARAM_DTYPE": "constexpr",
                  "SKIP": "constexpr", "ORIGIN": "constexpr", "BLOCK": "constexpr", "ALIGNED": "constexpr"}
    check_sig = {**ptrs, "ok_ptr": "*i32", "PARAM_DTYPE": "constexpr", "BLOCK": "constexpr", "ALIGNED": "constexpr"}
    options = {"num_warps": 8, "enable_fp_fusion": True}
    n = 0
    for arch in (90, 80):
        target = GPUTarget("cuda", arch, 32)
        variants = itertools.product((tl.float32, tl.bfloat16, tl.float16), (0, 1), (False, True), (False, True),
                                     (True, False))
        for dtype, phase, skip, origin, aligned in variants:
            merges = 3 if arch == 90 else 1
            src = ASTSource(fn=wsm_update_kernel, signature=update_sig, constexprs=dict(
                N_MERGES=merges, PHASE=phase, PARAM_DTYPE=dtype, SKIP=skip, ORIGIN=origin, BLOCK=4096,
                ALIGNED=aligned))
            kernel = triton.compile(src, target=target, options=options)
            assert len(kernel.asm["cubin"]) > 1000
            if aligned:  # full chunks must use 16-byte accesses (bandwidth): params, accumulators
                ptx = kernel.asm["ptx"]
                assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx, (arch, dtype, phase, skip, origin)
            n += 1
        src = ASTSource(fn=nonfinite_check_kernel, signature=check_sig,
                        constexprs=dict(PARAM_DTYPE=tl.bfloat16, BLOCK=4096, ALIGNED=True))
        assert len(triton.compile(src, target=target, options=options).asm["cubin"]) > 1000
        n += 1
    print("COMPILED", n)
    """
)


def test_kernels_compile_for_sm90_and_sm80():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "COMPILED 98" in out.stdout
