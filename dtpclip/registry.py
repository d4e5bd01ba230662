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
# `tiny_patch8_64` is ours (64x64 images) for tests and the built-in demo; the others are the
# CLIP towers of open_clip's ViT-S-16, ViT-B-32, ViT-B-16 and ViT-L-14. The demo size pools by
# the mean of its tokens, not the class token: trained from scratch, a fresh class token gives
# every image nearly the same feature (cosine 0.99 between images, 0.01 with mean pooling), and
# the demo CLIP with it stayed at chance for 5 epochs while mean-pooled DTP reached 31%.
VIT_SIZES: Dict[str, dict] = {
    "tiny_patch8_64": dict(img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=4, global_pool="avg"),
    "small_patch16_224": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base_patch32_224": dict(img_size=224, patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "base_patch16_224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large_patch14_224": dict(img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16),
}
# How open_clip-style names spell each size ('B-32' in 'DTP-ViT-B-32-10x').
CLIP_TAGS: Dict[str, str] = {
    "tiny_patch8_64": "Ti-8-64", "small_patch16_224": "S-16", "base_patch32_224": "B-32",
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
