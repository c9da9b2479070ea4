import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The engine runs many small ops in these tests; extra threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
