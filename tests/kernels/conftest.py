"""Kernel tests run on CPU through Triton's interpreter when there is no GPU.

TRITON_INTERPRET must be set before `@triton.jit` runs, i.e. before sdrt.kernels is first imported, hence at the top
of this conftest (pytest imports it before the test modules of this directory). With CUDA, kernels are compiled.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
