"""Building the multimodal model from a run config, and loading a trained one back.

A trained model is a directory (`<run>/final`) holding
  llava_config.json        what to build: encoder, its kwargs and structure, select layer/feature,
                           projector kind, LM path (absolute, or relative to the directory), template
  projector.safetensors    the projector's weights
  vision_tower.safetensors the encoder's weights (always: the CLIP run it came from may prune or rewrite its
                           checkpoints), rebuilt from `tower_structure` (its transforms, quantization)
  lm/                      stage 2 only: the trained LM and its tokenizer (save_pretrained)
"""
import json
import os
import warnings
from functools import partial
from pathlib import Path
from typing import Optional, Sequence, Tuple

import timm
import torch
from PIL import Image
from torchvision import transforms
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dtpclip.checkpoint import checkpoint_config, load_checked, read_state_dict, resolve_checkpoint
from dtpclip.encoders.quant import quant_config
from dtpclip.evaluate import registry_name
from dtpclip.factory import apply_transforms, create_encoder, restore_structure
from dtpclip.registry import parse_transform, transform_info
from llava_bridge.align_config import ASPECT_RATIOS
from llava_bridge.conversation import Template, get_template
from llava_bridge.model import LlavaModel, VisionTower

CONFIG_FILE = "llava_config.json"
PROJECTOR_FILE = "projector.safetensors"
VISION_FILE = "vision_tower.safetensors"
LM_DIR = "lm"


def resolve_encoder_checkpoint(given: Optional[str]) -> Optional[str]:
    """'demo': the latest demo CLIP checkpoint, or None (a fresh encoder) with a warning; 'none': None."""
    if given in (None, "", "none"):
        return None
    if given == "demo":
        from dtpclip.evaluate import latest_demo_checkpoint
        try:
            return str(latest_demo_checkpoint()[0])
        except FileNotFoundError as e:
            warnings.warn(f"{e}; using a freshly initialised vision tower", stacklevel=2)
            return None
    return given


def tower_structure(tower: VisionTower, checkpoint: Optional[str], transforms: Sequence[str]) -> dict:
    """What was done to the tower's encoder after construction (its checkpoint's transforms, then ours; its
    quantized structure), so a trained directory rebuilds it from its own files (`restore_structure`)."""
    saved = checkpoint_config(resolve_checkpoint(checkpoint)[0]) if checkpoint else {}
    return {"transforms": [*saved.get("transforms", []), *transforms], "quantization": quant_config(tower.encoder)}


def checkpoint_encoder(checkpoint: Optional[str]) -> Optional[str]:
    """The registry encoder a CLIP checkpoint's config names (None without a checkpoint or a name)."""
    saved = checkpoint_config(resolve_checkpoint(checkpoint)[0]).get("model") if checkpoint else None
    return registry_name(saved) if saved else None


def encoder_kwargs(checkpoint: Optional[str], model_kwargs: dict) -> dict:
    """The encoder's constructor kwargs: those its checkpoint's config records, updated by `model_kwargs`."""
    saved = checkpoint_config(resolve_checkpoint(checkpoint)[0]).get("model_kwargs", {}) if checkpoint else {}
    return {**saved, **model_kwargs}


def build_vision_tower(encoder: str, checkpoint: Optional[str], select_layer: int, select_feature: str,
                       transforms: Sequence[str] = (), seed: int = 0, **model_kwargs) -> VisionTower:
    """A frozen registry encoder (kwargs go to its constructor, after those its checkpoint's config
    records), with calibration-free training-free `transforms` ('tome:r=4') applied in order."""
    for spec in map(parse_transform, transforms):
        if transform_info(spec.name).calibration:
            raise ValueError(f"transform {spec} calibrates on images: apply it to the CLIP with python -m "
                             "dtpclip.quantize and pass that checkpoint as the encoder checkpoint (it loads quantized)")
    torch.manual_seed(seed)  # a fresh tower is the same on every rank and in every run
    model = create_encoder(encoder, checkpoint=checkpoint, **encoder_kwargs(checkpoint, model_kwargs))
    apply_transforms(model, transforms)
    return VisionTower(model, select_layer, select_feature)


def expand_to_square(image: Image.Image, background: Tuple[int, ...]) -> Image.Image:
    """`image` centred on a square of its longer side filled with `background` (LLaVA's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def image_transform(tower: VisionTower, image_aspect_ratio: str = "crop"):
    """The tower's eval transform (resize, center crop, normalise); 'pad' squares the image first with the
    normalisation mean as background, so nothing is cropped away (LLaVA-1.5's image_aspect_ratio)."""
    if image_aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {image_aspect_ratio!r}")
    cfg = timm.data.resolve_data_config({}, model=tower.encoder)
    transform = timm.data.create_transform(**cfg, is_training=False)
    if image_aspect_ratio == "crop":
        return transform
    background = tuple(int(mean * 255) for mean in cfg["mean"])
    return transforms.Compose([partial(expand_to_square, background=background), transform])


def trained_transform(model: LlavaModel, config: dict):
    """The image transform a trained directory's model was trained with (configs before the option: crop)."""
    return image_transform(model.vision_tower, config.get("image_aspect_ratio", "crop"))


def load_lm(path, dtype: torch.dtype = torch.float32):
    """A local causal LM and its tokenizer (offline); the tokenizer gets a pad token if it has none."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"LM {str(path)!r} is not a local directory (expected a save_pretrained "
                                "directory with config.json, weights and tokenizer files)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    return lm, tokenizer


def save_file_atomic(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def trained_dir(path) -> Path:
    """A trained directory given as itself or as its run directory; FileNotFoundError otherwise."""
    path = Path(path)
    if (path / "final" / CONFIG_FILE).is_file():
        path = path / "final"  # a run directory
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{str(path)!r} has no {CONFIG_FILE}: expected the 'final' directory of a "
                                "launch/llava_align.py run (or the run directory)")
    return path


def trained_config(path) -> dict:
    """The llava_config.json of a trained directory (or its run directory)."""
    return json.loads((trained_dir(path) / CONFIG_FILE).read_text())


def trained_lm(path) -> Path:
    """The LM directory a trained directory was trained with (stage 1) or holds (stage 2)."""
    path = trained_dir(path)
    return path / trained_config(path)["lm"]  # an absolute "lm" wins over `path`


# LLaVA saves stage 1's projector as mm_projector.bin with the model's key prefix
LLAVA_PROJECTOR_PREFIX = "model.mm_projector."


def projector_state(path) -> dict:
    """Projector weights from our projector.safetensors or LLaVA's mm_projector.bin."""
    state = read_state_dict(path)
    return {k.removeprefix(LLAVA_PROJECTOR_PREFIX): v for k, v in state.items()}


def load_trained(path, dtype: torch.dtype = torch.float32) -> Tuple[LlavaModel, object, Template, dict]:
    """(model, tokenizer, template, config) of a trained directory (see the module doc)."""
    path, cfg = trained_dir(path), trained_config(path)
    encoder = create_encoder(cfg["encoder"], **cfg.get("model_kwargs", {}))
    restore_structure(encoder, cfg["tower_structure"])  # the tower's own weights are in the directory
    load_checked(encoder, load_file(str(path / VISION_FILE)), path / VISION_FILE)
    tower = VisionTower(encoder, cfg["select_layer"], cfg["select_feature"])
    lm, tokenizer = load_lm(trained_lm(path), dtype)
    model = LlavaModel(tower, lm, cfg["projector"], cfg.get("max_length"))
    load_checked(model.projector, load_file(str(path / PROJECTOR_FILE)), path / PROJECTOR_FILE)
    return model.to(dtype).eval(), tokenizer, get_template(cfg["template"]), cfg
