"""open_clip bridge: CLIP models whose visual tower is a registry encoder.

Each registry encoder with a `clip_name` becomes an open_clip architecture (a timm tower config),
so `open_clip.create_model('DTP-ViT-B-32-10x')`, open_clip_train and CLIP_benchmark build it.
The CLIP projection lives in open_clip's timm-tower head; the encoder stays a plain timm model.
"""
from typing import Optional, Tuple

import open_clip
import torch
from open_clip.factory import _MODEL_CONFIGS
from open_clip.timm_model import TimmModel
from timm.models.vision_transformer import checkpoint_filter_fn

from dtpclip.checkpoint import load_checked, read_state_dict
from dtpclip.encoders.output import EncoderOutput
from dtpclip.registry import VIT_SIZES, list_encoders

# The text tower and joint embedding each size's CLIP uses: open_clip's own architecture of that
# size, or (our 64x64 sizes, which open_clip lacks) a small one of ours. The demo's has one
# layer: on the demo captions it reached 86% zero-shot in 1500 steps where two layers reached
# 69% in 1250, and it costs less a step; 16 tokens hold every demo caption (at most 9).
CLIP_TEXT_TOWERS = {
    "tiny_patch16_64": {"embed_dim": 128, "text_cfg": {
        "context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 1}},
    "tiny_patch8_64": {"embed_dim": 128, "text_cfg": {
        "context_length": 24, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2}},
    "small_patch16_224": "ViT-S-16",
    "base_patch32_224": "ViT-B-32",
    "base_patch16_224": "ViT-B-16",
    "large_patch14_224": "ViT-L-14",
}


def _text_tower(size: str) -> dict:
    base = CLIP_TEXT_TOWERS[size]
    return open_clip.get_model_config(base) if isinstance(base, str) else base


def clip_embed_dim(size: str) -> int:
    """Width of the joint image-text embedding of a size's CLIP."""
    return _text_tower(size)["embed_dim"]


def open_clip_config(encoder_name: str, size: str) -> dict:
    """An open_clip architecture config with `encoder_name` as its timm visual tower.

    `timm_pool: ''` keeps the encoder's own pooling (CLS for the plain ViT, masked mean for DTP).
    """
    base = _text_tower(size)
    return {
        "embed_dim": base["embed_dim"],
        "vision_cfg": {"timm_model_name": encoder_name, "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": VIT_SIZES[size]["img_size"]},
        "text_cfg": dict(base["text_cfg"]),
    }


def register_open_clip_configs() -> None:
    """Make every registry encoder with a `clip_name` an open_clip architecture.

    open_clip's public `add_model_config` only reads JSON files; ours are derived from the registry
    (sizes live there once), so they go into the same table it fills.
    """
    for info in list_encoders():
        if info.clip_name:
            _MODEL_CONFIGS[info.clip_name] = open_clip_config(info.name, info.size)


def _clip_state_dict(model: torch.nn.Module, state: dict) -> dict:
    """Convert an open_clip CLIP state dict (its own ViT or a timm tower) to our CLIP's layout."""
    if "visual.class_embedding" not in state:
        return state
    visual = checkpoint_filter_fn(state, model.visual.trunk)  # 'proj' arrives as head.weight [E, D]
    converted = {k: v for k, v in state.items() if not k.startswith("visual.")}
    converted["visual.head.proj.weight"] = visual.pop("head.weight")
    visual.pop("head.bias")
    converted.update({f"visual.trunk.{k}": v for k, v in visual.items()})
    return converted


def load_clip_checkpoint(model: torch.nn.Module, path) -> None:
    """Load a full open_clip CLIP checkpoint (text + visual) from disk into one of our CLIPs."""
    fresh = [f"visual.trunk.{p}" for p in model.visual.trunk.fresh_parameter_prefixes]
    load_checked(model, _clip_state_dict(model, read_state_dict(path)), path, fresh)


def create_clip_and_transforms(name: str, pretrained: Optional[str] = None, **kwargs):
    """open_clip.create_model_and_transforms for our names; `pretrained` is a local checkpoint path."""
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(name, **kwargs)
    if pretrained is not None:
        load_clip_checkpoint(model, pretrained)
    return model, preprocess_train, preprocess_val


def encode_image(model: torch.nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, EncoderOutput]:
    """Image embeddings through the encoder contract: (projected features, the encoder's output).

    The training loop uses this instead of `model.encode_image` to reach `aux_loss` and `stats`.
    """
    visual = getattr(model, "visual", None)
    if not (isinstance(visual, TimmModel) and hasattr(visual.trunk, "encode")):
        raise TypeError(f"{type(model).__name__} has no registry encoder as its visual tower; "
                        "build it with dtpclip.clip.create_clip_and_transforms")
    out = visual.trunk.encode(images)
    return visual.head(out.pooled), out


register_open_clip_configs()
