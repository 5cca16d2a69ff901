import pytest
import torch

from tests.helpers.models import random_model, tiny_config


@pytest.fixture
def one_thread():
    """Tiny models on one thread (more only add contention); the count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    return random_model(tiny_config())
