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


@pytest.fixture(scope="session")
def torch_optimizers_warmed_up():
    """One torch optimizer built, stepped and collected: torch's first optimizer in a process
    imports ``torch._dynamo`` lazily, and that import leaves a cycle of frames holding the
    optimizer being built (it waits for the cyclic collector; later ones do not)."""
    import gc

    warm_up = torch.nn.Linear(1, 1)
    torch.optim.SGD(warm_up.parameters(), lr=0.1).step()
    del warm_up
    gc.collect()


@pytest.fixture
def no_cyclic_collector(torch_optimizers_warmed_up):
    """Python's cyclic collector off for the test: only reference counts free objects."""
    import gc

    gc.disable()
    yield
    gc.enable()
