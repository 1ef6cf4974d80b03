"""Readouts stay within one model copy, measured as peak RSS in a fresh subprocess.

Uses ``bench/bench_readout_memory.py``'s measurement (peak RSS reset through
``/proc/self/clear_refs``, fixed glibc mmap threshold). Bounds are checked
generously (10% + 8 MiB slack); a readout that builds a full extra copy exceeds them 1.4-3x.
"""

import os
import sys

import pytest

import wsm_optim

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_readout_memory as B  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(wsm_optim.__file__)))  # the checkout under test
MiB = 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("dtype, readout, out_dtype", B.CASES)
def test_readout_peak_memory_within_bound(dtype, readout, out_dtype):
    row = B.measure(REPO, dtype, readout, out_dtype, params=32 * 2**20, largest=8 * 2**20, tensors=6)
    assert row["peak_mib"] <= 1.1 * row["bound_mib"] + 8, row
