"""The accumulator-precision rule, shared by the training engine and the file tools.

Torch only (no engine import), so ``offline`` and the CLIs can use it without
pulling in the optimizer.
"""

from __future__ import annotations

import torch

__all__ = ["accumulator_dtype", "accumulator_like"]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16/float8 params, float64 for float64; complex64/complex128 for complex params.

    A bf16 accumulator would round ``c_j ~ 1/k`` terms away; a float64 param
    keeps its range and precision (1e300 is finite in float64, not in fp32).
    """
    if dtype.is_floating_point and dtype.itemsize == 1:  # float8: torch promotes no float8 type to another
        return torch.float32
    floor = torch.complex64 if dtype.is_complex else torch.float32
    return torch.promote_types(dtype, floor)


def accumulator_like(p: torch.Tensor) -> torch.Tensor:
    """A zeroed accumulator shaped and strided like ``p`` (a ``DTensor`` for a ``DTensor`` param)."""
    return torch.zeros_like(p, dtype=accumulator_dtype(p.dtype), memory_format=torch.preserve_format)
