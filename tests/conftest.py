import pytest
import torch

from tinysweep import swept  # noqa: F401  (a session fixture shared by the sweep and compare tests)


@pytest.fixture(scope="session", autouse=True)
def single_threaded():
    """The test models are tiny: one thread is faster than two fighting over 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
