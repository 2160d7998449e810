"""Kernel tests run on CPU through Triton's interpreter unless TRITON_INTERPRET=0 says to compile them on a GPU
(`make gpu-test`): kernel_device.py says which, and tests/conftest.py sets the default before triton is imported."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
