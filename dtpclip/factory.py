"""Building encoders: a registry name, constructor kwargs and a checkpoint in; a ready model out.

A checkpoint's config records what was done to its encoder after construction (training-free
transforms as spec strings, the quantized structure), and `restore_structure` redoes it on a fresh
model so that the saved state loads into it.
"""
from typing import Iterable, List, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn

from dtpclip.checkpoint import (checkpoint_config, encoder_state_from_clip, load_checked, read_state_dict,
                                resolve_checkpoint)
from dtpclip.encoders.quant import apply_quant_config, quant_config
from dtpclip.registry import TransformSpec, encoder_info, parse_transform, transform_info


def create_encoder(name: str, checkpoint: Optional[str] = None, **kwargs) -> nn.Module:
    """Build a registry encoder (timm or open_clip name; kwargs go to its constructor); `checkpoint` (a
    weights file, checkpoint directory or run directory) loads CLIP weights (open_clip or ours), restoring
    a quantized / transformed structure first."""
    model = timm.create_model(encoder_info(name).name, **kwargs)
    if checkpoint is not None:
        weights, _ = resolve_checkpoint(checkpoint)
        restore_structure(model, checkpoint_config(weights))
        load_checked(model, encoder_state_from_clip(read_state_dict(weights), model), weights)
    return model


def apply_transforms(model: nn.Module, specs: Iterable[Union[str, dict, TransformSpec]],
                     calibration: Optional[Sequence[torch.Tensor]] = None) -> List[TransformSpec]:
    """Apply training-free transforms in order ('tome:r=4', then 'ptq:w=8,a=8', ...) to `model`'s
    encoder in place; `calibration` (image batches) is needed by those that calibrate. Returns the specs."""
    applied = []
    for spec in map(parse_transform, specs):
        info = transform_info(spec.name)
        if info.calibration and not calibration:
            raise ValueError(f"transform {spec} calibrates on images: pass calibration batches "
                             "(python -m dtpclip.quantize does)")
        info.apply(model, list(calibration or []) if info.calibration else None, **spec.params)
        applied.append(spec)
    return applied


def restore_structure(model: nn.Module, config: dict) -> nn.Module:
    """Redo a checkpoint config's calibration-free transforms and rebuild its quantized structure
    (when the model has none yet), so the checkpoint's state loads."""
    specs = [s for s in map(parse_transform, config.get("transforms", [])) if not transform_info(s.name).calibration]
    apply_transforms(model, specs)
    quantization = config.get("quantization")
    if quantization and quant_config(model) is None:
        apply_quant_config(model, quantization)
    return model
