"""Shared test setup. TRITON_INTERPRET must be set before triton is imported, so that the
triton kernels run on CPU through Triton's interpreter when no CUDA device is present."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


@pytest.fixture
def device():
    return DEVICE
