"""Projectors from the vision tower's width to the LM's, as in LLaVA (haotian-liu/LLaVA,
llava/model/multimodal_projector/builder.py): `linear` (LLaVA 1.0) and `mlp2x_gelu` (LLaVA 1.5)."""
import torch.nn as nn

from llava_bridge.align_config import PROJECTORS


def build_projector(kind: str, vision_dim: int, lm_dim: int) -> nn.Module:
    """`mlp2x_gelu`: Linear(Dv, Dl) -> GELU -> Linear(Dl, Dl); `linear`: Linear(Dv, Dl)."""
    if kind == "linear":
        return nn.Linear(vision_dim, lm_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
    raise ValueError(f"unknown projector {kind!r}; expected one of {', '.join(PROJECTORS)}")
