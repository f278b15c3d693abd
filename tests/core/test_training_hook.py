"""`after_optimizer_step` reaches mechanisms with online state (Routing's k-means centroids)."""

from __future__ import annotations

import torch

import attnkit


def test_hook_moves_routing_centroids_only_after_a_training_forward() -> None:
    mha = attnkit.MultiHeadAttention(16, 2, attention="routing", num_clusters=2, window=8, seed=0)
    x = torch.randn(2, 24, 16)
    mha.eval()
    mha(x)  # the first forward shapes the centroids
    centroids = mha.attention.centroids.clone()
    assert attnkit.after_optimizer_step(mha) == 1
    assert torch.equal(mha.attention.centroids, centroids)  # an eval forward records nothing
    mha.train()
    mha(x)
    attnkit.after_optimizer_step(mha)
    assert not torch.equal(mha.attention.centroids, centroids)
    unit = mha.attention.centroids.norm(dim=-1)
    torch.testing.assert_close(unit, torch.ones_like(unit))  # centroids stay on the unit sphere


def test_hook_is_harmless_for_stateless_mechanisms() -> None:
    mha = attnkit.MultiHeadAttention(16, 2, attention="full")
    before = {k: v.clone() for k, v in mha.state_dict().items()}
    assert attnkit.after_optimizer_step(mha) == 1
    assert all(torch.equal(before[k], v) for k, v in mha.state_dict().items())
