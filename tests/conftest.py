"""Shared test helpers: tiny encoders built from registry configs, seeded."""
import os

import pytest
import timm
import torch

import dtpclip  # noqa: F401  (registers the encoders)

# Tiny models gain nothing from intra-op threads, and on a loaded machine OpenMP's spinning
# threads make them 50x slower; subprocesses inherit the variable.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

# A very small ViT at the demo size: fast on CPU, same code paths as the large ones.
TINY = dict(embed_dim=32, depth=4, num_heads=2)


def tiny(name: str = "plain_vit_tiny_patch8_64", seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **{**TINY, **kwargs}).eval()


@pytest.fixture
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def micro_clip_name():
    from micro_clip import register_micro_clip
    return register_micro_clip()


@pytest.fixture(scope="session")
def micro_vit_clip_name():
    """The plain-ViT micro CLIP: no dropout, no boundary sampling, so its forward is deterministic."""
    from micro_clip import register_micro_clip
    return register_micro_clip("vit")


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """The demo data generator at a few hundred samples: real shards, eval set, LLaVA json."""
    from dtpclip.demo_data import DemoConfig, ensure_demo_data
    return ensure_demo_data(tmp_path_factory.mktemp("demo"),
                            DemoConfig(num_train=192, num_eval=60, shard_size=48))


@pytest.fixture(scope="session")
def demo_lm(small_demo, tmp_path_factory):
    """The demo's tiny causal LM, briefly trained on the small demo's captions."""
    from llava_bridge.demo_lm import ensure_demo_lm
    return ensure_demo_lm(tmp_path_factory.mktemp("lm") / "lm", small_demo.llava_json, steps=40)
