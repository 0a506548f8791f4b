import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny model runs best on one intra-op thread; on a busy 2-core machine two threads were
    ~10x slower (each op waits for a descheduled thread). Restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
