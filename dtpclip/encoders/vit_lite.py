"""ViT-Lite (Hassani et al. 2021, "Escaping the Big Data Paradigm with Compact Transformers",
github.com/SHI-Labs/Compact-Transformers, src/vit.py): the small CIFAR ViTs of the LSQ summary seed.

`vit_6_4_32`: 32 x 32 images, a 4 x 4 conv tokenizer (kernel = stride = 4, with bias: the
reference's `conv_bias=True`), a class token and a learnable positional embedding over the 65
tokens, 6 layers of dim 256 with 4 heads and MLP ratio 2, qkv without bias, final LayerNorm, class
token pooling, a 10-class head. The reference's layer is not timm's pre-norm block: its second
LayerNorm normalises the residual stream itself (`src = norm1(src + attn(pre_norm(src)));
src = src + mlp(src)`), which `LiteBlock` reproduces under timm's names (norm1 = pre_norm,
norm2 = the reference's norm1). Parameters with 10 classes: 3,190,538 (the paper's 3.191M):
tokenizer 3*16*256 + 256 = 12,544; class token 256; positional embedding 65*256 = 16,640;
per layer 2*512 (norms) + 256*768 (qkv) + 256*257 (proj) + 256*512 + 512 (fc1) + 512*256 + 256 (fc2)
= 526,336, times 6 = 3,158,016; final norm 512; head 256*10 + 10 = 2,570.
Training regularisation as CCT's `ViTLite` defaults: attention dropout 0.1 and stochastic depth 0.1
(linear over the layers, as both CCT and timm space it), no other dropout.
timm's initialisation is kept (the reference draws the positional embedding with std 0.2).
"""
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from dtpclip.encoders.vit import VIT_FEATURE_CFG, PlainViT
from dtpclip.registry import Size, register_family

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class LiteBlock(Block):
    """Compact Transformers' encoder layer: x = norm2(x + attn(norm1(x))); x = x + mlp(x)."""

    norm2_feeds_residual = True  # RepQ cannot fold scales into norm2 (see dtpclip.encoders.ptq)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = self.norm2(x)
        return x + self.drop_path2(self.ls2(self.mlp(x)))


class ViTLite(PlainViT):
    """ViT-Lite as a timm VisionTransformer with the encoder contract (class token pooling)."""

    mergeable = False  # its blocks are LiteBlocks, not timm's

    def __init__(self, **kwargs):
        defaults = dict(pre_norm=False, qkv_bias=False, class_token=True, global_pool="token", num_classes=10,
                        norm_layer=partial(nn.LayerNorm, eps=1e-5), block_fn=LiteBlock, attn_drop_rate=0.1,
                        drop_path_rate=0.1)
        super().__init__(**{**defaults, **kwargs})


# ViT-Lite's own architecture, so its size row lives here rather than in the shared size table.
LITE_6_4_32 = Size("vit_6_4_32", "Lite-6-4-32", dict(depth=6, num_heads=4, embed_dim=256, mlp_ratio=2.0, patch_size=4,
                                                     img_size=32),
                   pretrained_cfg=dict(num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD))
register_family("vit", ViTLite, "{size}", sizes=[LITE_6_4_32], feature_cfg=VIT_FEATURE_CFG)
