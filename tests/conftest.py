import os

# Triton kernels run on CPU tensors through Triton's interpreter in CI; it must be set before triton is imported.
# On a machine with a GPU, run with TRITON_INTERPRET=0 to test the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
