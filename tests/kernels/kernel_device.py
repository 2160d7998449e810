"""Where the kernel tests run: compiled on the GPU under TRITON_INTERPRET=0 (`make gpu-test`), else on CPU tensors
in Triton's interpreter, GPU or not (tests/conftest.py defaults TRITON_INTERPRET to 1, so that is `make test`
everywhere). The interpreter on CUDA tensors would copy each one to the host and back and run the full SD shapes at
Python speed; the GPU-only tests skip under it instead."""

import os

import torch

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if CUDA else "cpu"
