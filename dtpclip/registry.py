"""The encoder registry: timm's model registry plus our metadata.

Every encoder is a timm model (so `timm.create_model` builds it); `register_encoder` records,
beside timm's entry, what a comparison table needs: family, compression, bit widths.
Model sizes live here, once, and every family derives its variants from them.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import timm
from timm.models import register_model

# The ViT sizes every family is built at: name suffix -> timm VisionTransformer kwargs.
# Two are ours, at 64x64: `tiny_patch16_64` (16 patches, class-token pooling) is the built-in
# demo's, chosen for what a CLIP learns in 5 minutes on 2 CPU cores: with 64 patches (patch 8)
# a step costs 3-4x more and the classes came no faster per step, and a mean-pooled tower
# learned the shapes about 2x slower per step than a class-token one (supervised, 400 steps:
# 36% vs 79% top-1). `tiny_patch8_64` (64 patches, mean pooling) is the tests' size: enough
# tokens to pool and merge, and the masked-mean path of DTP. The others are the CLIP towers of
# open_clip's ViT-S-16, ViT-B-32, ViT-B-16 and ViT-L-14.
VIT_SIZES: Dict[str, dict] = {
    "tiny_patch16_64": dict(img_size=64, patch_size=16, embed_dim=128, depth=6, num_heads=4, global_pool="token"),
    "tiny_patch8_64": dict(img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=4, global_pool="avg"),
    "small_patch16_224": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base_patch32_224": dict(img_size=224, patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "base_patch16_224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large_patch14_224": dict(img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16),
}
# How open_clip-style names spell each size ('B-32' in 'DTP-ViT-B-32-10x').
CLIP_TAGS: Dict[str, str] = {
    "tiny_patch16_64": "Ti-16-64", "tiny_patch8_64": "Ti-8-64", "small_patch16_224": "S-16", "base_patch32_224": "B-32",
    "base_patch16_224": "B-16", "large_patch14_224": "L-14",
}


@dataclass(frozen=True)
class EncoderInfo:
    """Registry metadata of one named encoder."""

    name: str
    family: str  # 'vit', 'dtp', ...
    size: str  # a key of VIT_SIZES
    compression: Optional[float] = None  # target fraction of tokens kept (DTP prior)
    bits: Optional[int] = None  # weight/activation bit width of quantized encoders
    clip_name: Optional[str] = None  # its open_clip model name, when it has one


_ENCODERS: Dict[str, EncoderInfo] = {}


def register_encoder(fn: Callable, info: EncoderInfo) -> Callable:
    """Register `fn` with timm under `info.name` and record its metadata."""
    fn.__name__ = fn.__qualname__ = info.name
    register_model(fn)
    _ENCODERS[info.name] = info
    return fn


def list_encoders(family: Optional[str] = None) -> List[EncoderInfo]:
    """Our encoders (optionally of one family), sorted by name."""
    return sorted((i for i in _ENCODERS.values() if family in (None, i.family)), key=lambda i: i.name)


def encoder_info(name: str) -> EncoderInfo:
    """Metadata of a registered encoder; a clear error for unknown names."""
    if name not in _ENCODERS:
        raise KeyError(f"unknown encoder {name!r}; known: {', '.join(sorted(_ENCODERS))}")
    return _ENCODERS[name]


def create_encoder(name: str, checkpoint: Optional[str] = None, **kwargs):
    """Build a registry encoder; `checkpoint` loads CLIP weights (open_clip or ours) from disk."""
    from dtpclip.checkpoint import load_encoder_weights

    encoder_info(name)
    model = timm.create_model(name, **kwargs)
    if checkpoint is not None:
        load_encoder_weights(model, checkpoint)
    return model
