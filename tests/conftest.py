"""Shared test set-up.

Without a GPU, Triton kernels run in its CPU interpreter; the variable must be
set before triton is first imported, hence here, at collection time.
Tests marked ``cuda`` are skipped without a CUDA device.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
