"""Test-wide settings."""

from collections.abc import Iterator

import pytest
import torch

# The suite runs many tiny problems; one intra-op thread avoids thread start-up and contention
# costs that dominate at these sizes (gradchecks run several times faster).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Every test starts on one thread, whatever the test before it set (and leaves it so)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
