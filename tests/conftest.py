"""Test-wide settings."""

import torch

# The suite runs many tiny problems; one intra-op thread avoids thread start-up and contention
# costs that dominate at these sizes (gradchecks run several times faster).
torch.set_num_threads(1)
