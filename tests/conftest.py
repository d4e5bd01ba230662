"""Shared test helpers: tiny encoders built from registry configs, seeded."""
import pytest
import timm
import torch

import dtpclip  # noqa: F401  (registers the encoders)

# A very small ViT at the demo size: fast on CPU, same code paths as the large ones.
TINY = dict(embed_dim=32, depth=4, num_heads=2)


def tiny(name: str = "plain_vit_tiny_patch8_64", seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **{**TINY, **kwargs}).eval()


@pytest.fixture
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
