"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """Run the suite with one intra-op thread.

    The tensors in the tests are tiny, so one thread is fastest; with more, torch's worker threads
    wait on each other and a busy 2-core machine stalls every op. Bitwise comparisons are made
    within one setting, so they are unaffected. Tests that need more threads set them locally.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
