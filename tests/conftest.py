import os

# Triton kernels run on CPU tensors through Triton's interpreter in CI; it must be set before triton is imported.
# On a machine with a GPU, run with TRITON_INTERPRET=0 to test the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


import pytest  # noqa: E402  (the environment above must be set before anything imports triton)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Shared CI machines oversubscribe their cores, and torch's OpenMP barriers then wait a scheduler quantum per
    op (tiny's text encoder: 1 ms on one thread, 60-200 ms on two). Modules that check results, not speed, on tiny
    models use it: `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def private_export_cache(tmp_path_factory):
    """Exports the tests make without an explicit $SDRT_CACHE land in the session's temp dir, never in the user's
    ~/.cache/sdrt (where a stale entry would also make a test pass for the wrong reason). Tests that need an empty
    cache set their own."""
    path = tmp_path_factory.getbasetemp() / "sdrt-cache"
    path.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDRT_CACHE", str(path))
        yield path
