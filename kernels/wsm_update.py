"""Raw Triton kernels of the WSM streaming merge (launchers: ``wsm_optim.core.backends.triton``).

One launch updates every tensor of a (device, dtype) group and every merge:
program ``pid`` handles ``BLOCK`` elements of one tensor, found through a chunk
table (``chunk_tensor[pid]``, ``chunk_start[pid]``); tensors are reached through
tables of raw data pointers. The parameters are read once per launch whatever
the number of merges.

What to do for merge ``m`` is decided on the device from the step counter
``s = *step_ptr`` and ``meta[m] = (start, interval, k, table_offset, keeps_completed)``,
so no host value changes between steps and the launch can be captured in a
CUDA graph:

* ``PHASE == 0`` (before the inner step, ``s`` steps done): anchor iff
  ``s >= start`` and ``(s - start) % (k * interval) == 0``. With ``ORIGIN``
  (each tensor has a window origin ``theta_0``, PARAM_DTYPE, same layout):
  ``completed <- A + kept * theta_0`` (if the merge keeps its completed window
  and ``s > start``; ``kept = 1`` unless ``SKIP``), then ``theta_0 <- theta`` and
  ``A <- 0``. Without (raw sums, format-1 runs): ``completed <- A``, then
  ``A <- c_0 * theta``. Every merge's completed window is folded before any
  origin is written: merges anchored at the same steps share one origin.
* ``PHASE == 1`` (after the inner step, ``s`` counts it): with ``u = s - start``,
  checkpoint iff ``u > 0`` and ``u % interval == 0``:
  ``A <- A + c_t * (theta - theta_0)`` (``A + c_t * theta`` without ``ORIGIN``),
  ``t = (u // interval - 1) % k + 1``.

``c`` lives in ``coefs[table_offset : table_offset + k + 1]`` (fp32). Arithmetic
is fp32 whatever the parameter dtype; ``theta - theta_0`` is exact for bf16/fp16
params, and for fp32 params rounds relative to the displacement, not to theta.

Speed: a chunk is ``BLOCK`` elements starting at a multiple of ``BLOCK``, so
only the last chunk of a tensor is partial; full chunks take an unmasked path.
With ``ALIGNED`` (the launcher checked every pointer is 16-byte aligned) the
pointers carry that hint too. Both are needed for 16-byte vector loads and
stores: pointers read from a table and a mask against a runtime ``numel`` would
otherwise compile to scalar accesses.

Non-finite values: every program that reads a NaN/inf parameter value stores
the step into ``bad_step`` (first: atomic min, last: atomic max), read lazily by the host. With
``SKIP`` the launch first reads ``*ok_ptr`` (0 = the checkpoint holds a
non-finite value somewhere, found by ``nonfinite_check_kernel``) and then
leaves the accumulators untouched (accumulate) or zeroes them (anchor; with
``ORIGIN`` the origin is zeroed, so that window sums raw params).
"""

import triton
import triton.language as tl


@triton.jit
def _chunk(param_ptrs, numels, chunk_tensor, chunk_start, PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
           ALIGNED: tl.constexpr):
    """This program's chunk: (tensor index, offsets, numel, param pointer, whether it is full)."""
    pid = tl.program_id(0)
    tidx = tl.load(chunk_tensor + pid)
    first = tl.multiple_of(tl.load(chunk_start + pid), BLOCK)
    numel = tl.load(numels + tidx)
    p_ptr = tl.load(param_ptrs + tidx).to(tl.pointer_type(PARAM_DTYPE))
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
    return tidx, first + tl.arange(0, BLOCK), numel, p_ptr, first + BLOCK <= numel


@triton.jit
def _load(ptr, offs, numel, MASKED: tl.constexpr):
    if MASKED:
        value = tl.load(ptr + offs, mask=offs < numel, other=0.0)
    else:
        value = tl.load(ptr + offs)
    return value


@triton.jit
def _store(ptr, offs, numel, value, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, value, mask=offs < numel)
    else:
        tl.store(ptr + offs, value)


@triton.jit
def _count_nonfinite(x):
    return tl.sum((~(tl.abs(x) < float("inf"))).to(tl.int32), axis=0)


@triton.jit
def _pointer(ptrs, index, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(ptrs + index).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _merge_chunk(
    tidx, offs, numel, p_ptr, acc_ptrs, completed_ptrs, origin_ptrs, kept_ptr, coefs, meta, step_ptr, bad_step,
    ok_ptr, n_tensors,
    N_MERGES: tl.constexpr, PHASE: tl.constexpr, PARAM_DTYPE: tl.constexpr, SKIP: tl.constexpr,
    ORIGIN: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
):
    x = _load(p_ptr, offs, numel, MASKED).to(tl.float32)
    s = tl.load(step_ptr)
    if _count_nonfinite(x) > 0:
        tl.atomic_min(bad_step + tidx, s)
        tl.atomic_max(bad_step + n_tensors + tidx, s)
    ok = 1
    if SKIP:
        ok = tl.load(ok_ptr)

    if PHASE == 0:
        # fold every finished window before any (shared) origin is overwritten by the new anchor
        for m in tl.static_range(N_MERGES):
            start = tl.load(meta + 5 * m)
            interval = tl.load(meta + 5 * m + 1)
            k = tl.load(meta + 5 * m + 2)
            keeps = tl.load(meta + 5 * m + 4)
            u = s - start
            if (u > 0) & (u % (k * interval) == 0) & (keeps != 0):
                a_ptr = _pointer(acc_ptrs, m * n_tensors + tidx, tl.float32, ALIGNED)
                c_ptr = _pointer(completed_ptrs, m * n_tensors + tidx, tl.float32, ALIGNED)
                merged = _load(a_ptr, offs, numel, MASKED)
                if ORIGIN:
                    o_ptr = _pointer(origin_ptrs, m * n_tensors + tidx, PARAM_DTYPE, ALIGNED)
                    origin = _load(o_ptr, offs, numel, MASKED).to(tl.float32)
                    if SKIP:
                        merged = merged + tl.load(kept_ptr + m) * origin
                    else:
                        merged = merged + origin
                _store(c_ptr, offs, numel, merged, MASKED)
        for m in tl.static_range(N_MERGES):
            start = tl.load(meta + 5 * m)
            interval = tl.load(meta + 5 * m + 1)
            k = tl.load(meta + 5 * m + 2)
            table = tl.load(meta + 5 * m + 3)
            u = s - start
            if (u >= 0) & (u % (k * interval) == 0):
                a_ptr = _pointer(acc_ptrs, m * n_tensors + tidx, tl.float32, ALIGNED)
                if ORIGIN:
                    o_ptr = _pointer(origin_ptrs, m * n_tensors + tidx, PARAM_DTYPE, ALIGNED)
                    if ok != 0:
                        _store(o_ptr, offs, numel, x.to(PARAM_DTYPE), MASKED)
                    else:
                        _store(o_ptr, offs, numel, tl.zeros([BLOCK], dtype=PARAM_DTYPE), MASKED)
                    _store(a_ptr, offs, numel, tl.zeros([BLOCK], dtype=tl.float32), MASKED)
                else:
                    c = tl.load(coefs + table)
                    if ok != 0:
                        _store(a_ptr, offs, numel, c * x, MASKED)
                    else:
                        _store(a_ptr, offs, numel, tl.zeros([BLOCK], dtype=tl.float32), MASKED)
    else:
        for m in tl.static_range(N_MERGES):
            start = tl.load(meta + 5 * m)
            interval = tl.load(meta + 5 * m + 1)
            k = tl.load(meta + 5 * m + 2)
            table = tl.load(meta + 5 * m + 3)
            u = s - start
            if (u > 0) & (u % interval == 0):
                if ok != 0:
                    a_ptr = _pointer(acc_ptrs, m * n_tensors + tidx, tl.float32, ALIGNED)
                    t = (u // interval - 1) % k + 1
                    c = tl.load(coefs + table + t)
                    d = x
                    if ORIGIN:
                        o_ptr = _pointer(origin_ptrs, m * n_tensors + tidx, PARAM_DTYPE, ALIGNED)
                        d = x - _load(o_ptr, offs, numel, MASKED).to(tl.float32)
                    _store(a_ptr, offs, numel, _load(a_ptr, offs, numel, MASKED) + c * d, MASKED)


@triton.jit
def wsm_update_kernel(
    param_ptrs,  # *i64 [n_tensors]: data pointers of the params (dtype PARAM_DTYPE)
    numels,  # *i64 [n_tensors]
    chunk_tensor,  # *i32 [n_chunks]
    chunk_start,  # *i64 [n_chunks]: element offset of the chunk inside its tensor (multiple of BLOCK)
    acc_ptrs,  # *i64 [N_MERGES * n_tensors]: fp32 accumulators
    completed_ptrs,  # *i64 [N_MERGES * n_tensors]: fp32 completed-window buffers (0 when unused)
    origin_ptrs,  # *i64 [N_MERGES * n_tensors]: window origins (dtype PARAM_DTYPE; read only with ORIGIN)
    kept_ptr,  # *f32 [N_MERGES]: weight each finished window kept (read only with ORIGIN and SKIP, at anchors)
    coefs,  # *f32: concatenated merge-weight tables
    meta,  # *i64 [N_MERGES * 5]: start, interval, k, table_offset, keeps_completed
    step_ptr,  # *i64 scalar: counted optimizer steps
    bad_step,  # *i64 [2 * n_tensors]: first / last step a non-finite value was read
    ok_ptr,  # *i32 scalar: 1 if the whole checkpoint is finite (read only with SKIP)
    n_tensors,
    N_MERGES: tl.constexpr,
    PHASE: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    SKIP: tl.constexpr,
    ORIGIN: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    tidx, offs, numel, p_ptr, full = _chunk(param_ptrs, numels, chunk_tensor, chunk_start, PARAM_DTYPE, BLOCK, ALIGNED)
    if full:
        _merge_chunk(tidx, offs, numel, p_ptr, acc_ptrs, completed_ptrs, origin_ptrs, kept_ptr, coefs, meta,
                     step_ptr, bad_step, ok_ptr, n_tensors, N_MERGES, PHASE, PARAM_DTYPE, SKIP, ORIGIN, BLOCK,
                     ALIGNED, False)
    else:
        _merge_chunk(tidx, offs, numel, p_ptr, acc_ptrs, completed_ptrs, origin_ptrs, kept_ptr, coefs, meta,
                     step_ptr, bad_step, ok_ptr, n_tensors, N_MERGES, PHASE, PARAM_DTYPE, SKIP, ORIGIN, BLOCK,
                     ALIGNED, True)


@triton.jit
def nonfinite_check_kernel(
    param_ptrs,  # *i64 [n_tensors]
    numels,  # *i64 [n_tensors]
    chunk_tensor,  # *i32 [n_chunks]
    chunk_start,  # *i64 [n_chunks]
    ok_ptr,  # *i32 scalar, set to 1 beforehand; cleared if any value is NaN/inf
    PARAM_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    tidx, offs, numel, p_ptr, full = _chunk(param_ptrs, numels, chunk_tensor, chunk_start, PARAM_DTYPE, BLOCK, ALIGNED)
    if full:
        n_bad = _count_nonfinite(_load(p_ptr, offs, numel, False).to(tl.float32))
    else:
        n_bad = _count_nonfinite(_load(p_ptr, offs, numel, True).to(tl.float32))
    if n_bad > 0:
        tl.atomic_min(ok_ptr, 0)
