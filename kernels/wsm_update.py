"""Raw Triton kernels of the WSM streaming merge (launchers: ``wsm_optim.triton_backend``).

One launch updates every tensor of a (device, dtype) group and every merge:
program ``pid`` handles ``BLOCK`` elements of one tensor, found through a chunk
table (``chunk_tensor[pid]``, ``chunk_start[pid]``); tensors are reached through
tables of raw data pointers. The parameters are read once per launch whatever
the number of merges.

What to do for merge ``m`` is decided on the device from the step counter
``s = *step_ptr`` and ``meta[m] = (start, interval, k, table_offset, keep_last)``,
so no host value changes between steps and the launch can be captured in a
CUDA graph:

* ``PHASE == 0`` (before the inner step, ``s`` steps done): anchor iff
  ``s >= start`` and ``(s - start) % (k * interval) == 0``:
  ``last <- A`` (if keep_last and ``s > start``), then ``A <- c_0 * theta``.
* ``PHASE == 1`` (after the inner step, ``s`` counts it): with ``u = s - start``,
  checkpoint iff ``u > 0`` and ``u % interval == 0``:
  ``A <- A + c_t * theta``, ``t = (u // interval - 1) % k + 1``.

``c`` lives in ``coefs[table_offset : table_offset + k + 1]`` (fp32). Arithmetic
is fp32 whatever the parameter dtype.

Non-finite values: every program that reads a NaN/inf parameter value stores
the step into ``bad_step`` (first: atomic min, last: atomic max), read lazily by the host. With
``SKIP`` the launch first reads ``*ok_ptr`` (0 = the checkpoint holds a
non-finite value somewhere, found by ``nonfinite_check_kernel``) and then
leaves the accumulators untouched (accumulate) or zeroes them (anchor).
"""

import triton
import triton.language as tl


@triton.jit
def _load_chunk(param_ptrs, numels, chunk_tensor, chunk_start, PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """This program's chunk: (tensor index, offsets, mask, values as fp32, count of NaN/inf)."""
    pid = tl.program_id(0)
    tidx = tl.load(chunk_tensor + pid)
    offs = tl.load(chunk_start + pid) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + tidx)
    p_ptr = tl.load(param_ptrs + tidx).to(tl.pointer_type(PARAM_DTYPE))
    x = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    n_bad = tl.sum((~(tl.abs(x) < float("inf"))).to(tl.int32), axis=0)
    return tidx, offs, mask, x, n_bad


@triton.jit
def wsm_update_kernel(
    param_ptrs,  # *i64 [n_tensors]: data pointers of the params (dtype PARAM_DTYPE)
    numels,  # *i64 [n_tensors]
    chunk_tensor,  # *i32 [n_chunks]
    chunk_start,  # *i64 [n_chunks]: element offset of the chunk inside its tensor
    acc_ptrs,  # *i64 [N_MERGES * n_tensors]: fp32 accumulators
    last_ptrs,  # *i64 [N_MERGES * n_tensors]: fp32 last-window buffers (0 when unused)
    coefs,  # *f32: concatenated merge-weight tables
    meta,  # *i64 [N_MERGES * 5]: start, interval, k, table_offset, keep_last
    step_ptr,  # *i64 scalar: counted optimizer steps
    bad_step,  # *i64 [2 * n_tensors]: first / last step a non-finite value was read (-1: never)
    ok_ptr,  # *i32 scalar: 1 if the whole checkpoint is finite (read only with SKIP)
    n_tensors,
    N_MERGES: tl.constexpr,
    PHASE: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    SKIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tidx, offs, mask, x, n_bad = _load_chunk(param_ptrs, numels, chunk_tensor, chunk_start, PARAM_DTYPE, BLOCK)
    s = tl.load(step_ptr)
    if n_bad > 0:
        tl.atomic_min(bad_step + tidx, s)
        tl.atomic_max(bad_step + n_tensors + tidx, s)
    ok = 1
    if SKIP:
        ok = tl.load(ok_ptr)

    for m in tl.static_range(N_MERGES):
        start = tl.load(meta + 5 * m)
        interval = tl.load(meta + 5 * m + 1)
        k = tl.load(meta + 5 * m + 2)
        table = tl.load(meta + 5 * m + 3)
        a_ptr = tl.load(acc_ptrs + m * n_tensors + tidx).to(tl.pointer_type(tl.float32))
        u = s - start
        if PHASE == 0:
            if (u >= 0) & (u % (k * interval) == 0):
                keep_last = tl.load(meta + 5 * m + 4)
                if (keep_last != 0) & (u > 0):
                    l_ptr = tl.load(last_ptrs + m * n_tensors + tidx).to(tl.pointer_type(tl.float32))
                    tl.store(l_ptr + offs, tl.load(a_ptr + offs, mask=mask), mask=mask)
                c = tl.load(coefs + table)
                if ok != 0:
                    tl.store(a_ptr + offs, c * x, mask=mask)
                else:
                    tl.store(a_ptr + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=mask)
        else:
            if (u > 0) & (u % interval == 0):
                if ok != 0:
                    t = (u // interval - 1) % k + 1
                    c = tl.load(coefs + table + t)
                    a = tl.load(a_ptr + offs, mask=mask)
                    tl.store(a_ptr + offs, a + c * x, mask=mask)


@triton.jit
def nonfinite_check_kernel(
    param_ptrs,  # *i64 [n_tensors]
    numels,  # *i64 [n_tensors]
    chunk_tensor,  # *i32 [n_chunks]
    chunk_start,  # *i64 [n_chunks]
    ok_ptr,  # *i32 scalar, set to 1 beforehand; cleared if any value is NaN/inf
    PARAM_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, _, _, _, n_bad = _load_chunk(param_ptrs, numels, chunk_tensor, chunk_start, PARAM_DTYPE, BLOCK)
    if n_bad > 0:
        tl.atomic_min(ok_ptr, 0)
