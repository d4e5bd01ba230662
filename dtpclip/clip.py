"""open_clip bridge: CLIP models whose visual tower is a registry encoder.

Each registry encoder with a `clip_name` becomes an open_clip architecture (a timm tower config),
so `open_clip.create_model('DTP-ViT-B-32-10x')`, open_clip_train and CLIP_benchmark build it.
The CLIP projection lives in open_clip's timm-tower head; the encoder stays a plain timm model.
"""
import contextlib
import logging
from typing import Callable, Optional, Tuple

import open_clip
import open_clip.factory
import timm
import torch
from open_clip.timm_model import TimmModel
from open_clip.transform import PreprocessCfg, image_transform, image_transform_v2
from timm.models.vision_transformer import checkpoint_filter_fn

from dtpclip.checkpoint import checkpoint_config, load_checked, read_state_dict
from dtpclip.encoders.output import EncoderOutput
from dtpclip.factory import restore_structure
from dtpclip.registry import EncoderInfo, Size, encoder_info, on_register


def text_tower(size: Size) -> dict:
    """{'embed_dim', 'text_cfg'} of a size's CLIP: open_clip's own architecture's, or the size's own."""
    if size.text_tower is None:
        raise ValueError(f"size {size.name!r} has no CLIP (its registry row names no text tower)")
    base = size.text_tower
    return open_clip.get_model_config(base) if isinstance(base, str) else base


def clip_embed_dim(size: Size) -> int:
    """Width of the joint image-text embedding of a size's CLIP."""
    return text_tower(size)["embed_dim"]


def open_clip_config(info: EncoderInfo) -> dict:
    """An open_clip architecture config with the encoder as its timm visual tower.

    `timm_pool: ''` keeps the encoder's own pooling (CLS for the plain ViT, masked mean for DTP).
    """
    base = text_tower(info.size)
    return {
        "embed_dim": base["embed_dim"],
        "vision_cfg": {"timm_model_name": info.name, "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": info.size.img_size},
        "text_cfg": dict(base["text_cfg"]),
    }


def _add_open_clip_config(info: EncoderInfo) -> None:
    # open_clip's public add_model_config reads JSON files only; ours derive from the registry. The
    # table is looked up at each call: add_model_config rebinds it.
    if info.clip_name:
        open_clip.factory._MODEL_CONFIGS[info.clip_name] = open_clip_config(info)


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
    """Load a full open_clip CLIP checkpoint (text + visual) from disk into one of our CLIPs; the
    transforms and quantization its config records are rebuilt on the visual tower first."""
    restore_structure(model.visual.trunk, checkpoint_config(path))
    fresh = [f"visual.trunk.{p}" for p in model.visual.trunk.fresh_parameter_prefixes]
    load_checked(model, _clip_state_dict(model, read_state_dict(path)), path, fresh)


def _swap_trunk(model: torch.nn.Module, model_kwargs: dict) -> None:
    """open_clip's timm tower passes no kwargs to timm: build the trunk again with them, as TimmModel
    builds it (no head, the encoder's own pooling), and follow a changed input size."""
    visual = model.visual
    trunk = timm.create_model(visual.trunk.pretrained_cfg["architecture"], **model_kwargs)
    trunk.reset_classifier(0)
    head = next(visual.head.parameters())
    visual.trunk = trunk.to(device=head.device, dtype=head.dtype)
    image_size = trunk.patch_embed.img_size
    visual.image_size = tuple(image_size)
    visual.preprocess_cfg = {**visual.preprocess_cfg, "size": tuple(image_size)}


@contextlib.contextmanager
def _quiet_random_init_warning(quiet: bool):
    """open_clip logs 'No pretrained weights loaded ... initialized randomly' when we load the weights ourselves."""
    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    if quiet:
        root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _known_clip_name(name: str) -> str:
    try:
        return encoder_info(name).clip_name or name
    except KeyError:  # any other open_clip architecture
        return name


def create_clip_and_transforms(name: str, pretrained: Optional[str] = None, model_kwargs: Optional[dict] = None,
                               **kwargs):
    """open_clip.create_model_and_transforms for our names (timm or open_clip spelling).

    model_kwargs: the visual encoder's constructor kwargs (timm's --model-kwargs), e.g.
    {'compression': 0.2}; `pretrained`: a local checkpoint path.
    """
    name = _known_clip_name(name)
    with _quiet_random_init_warning(pretrained is not None):
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(name, **kwargs)
    if model_kwargs:
        _swap_trunk(model, model_kwargs)
        cfg = PreprocessCfg(**model.visual.preprocess_cfg)
        preprocess_train, preprocess_val = image_transform_v2(cfg, is_train=True), image_transform_v2(cfg, is_train=False)
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


on_register(_add_open_clip_config)


def encoder_transforms(encoder: torch.nn.Module) -> Tuple[Callable, Callable]:
    """(train, eval) image transforms: CLIP's (RandomResizedCrop 0.9-1 / resize + center crop) at the
    encoder's input size and normalisation (its timm pretrained config)."""
    cfg = encoder.pretrained_cfg
    size = encoder.patch_embed.img_size
    return (image_transform(size, is_train=True, mean=cfg["mean"], std=cfg["std"]),
            image_transform(size, is_train=False, mean=cfg["mean"], std=cfg["std"]))
