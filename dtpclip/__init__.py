"""dtpclip: efficient vision encoders (dynamic token pooling, token merging, quantization)
for CLIP pretraining, LLaVA-style alignment and zero-shot / classification evaluation.

Importing the package registers every encoder with timm and with open_clip.
"""
from dtpclip import clip, encoders  # noqa: F401  (timm and open_clip registration)
from dtpclip.encoders import EncoderOutput
from dtpclip.factory import apply_transforms, create_encoder
from dtpclip.registry import (EncoderInfo, Size, encoder_info, list_encoders, list_transforms, register_family,
                              register_transform)

__all__ = ["EncoderInfo", "EncoderOutput", "Size", "apply_transforms", "create_encoder", "encoder_info",
           "list_encoders", "list_transforms", "register_family", "register_transform"]
