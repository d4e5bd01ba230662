"""TokenLearner-ViT: a ViT that learns a few tokens part-way and runs its remaining blocks on them.

Ryoo et al. 2021, "TokenLearner: What Can 8 Learned Tokens Do for Images and Videos?", the v1.1
module of google-research/scenic (projects/token_learner/model.py, `TokenLearnerModuleV11`):
LayerNorm (eps 1e-6), an MLP (bottleneck 64, tanh-approximated GELU as flax's, dropout) giving one
spatial map per learned token, a softmax over positions, and each learned token the map-weighted sum
of the un-normalised input tokens. As in scenic's `EncoderMod`, the module runs right before block
`learner_layer` (default half the depth), which already runs on the learned tokens.

Our ViTs may carry a class token (scenic's TokenLearner ViTs pool with 'gap' and have none): it is
kept beside the learned tokens and learns nothing of the module; the maps read the patches only.
"""
from functools import partial
from typing import Tuple

import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.models._manipulate import checkpoint_seq

from dtpclip.encoders.vit import TOKEN_FEATURE_CFG, PlainViT, register_vit_family


class TokenLearner(nn.Module):
    """[B, N, D] -> learned tokens [B, S, D] and their spatial maps [B, S, N] (each a softmax over N)."""

    def __init__(self, dim: int, num_tokens: int, bottleneck_dim: int = 64, dropout: float = 0.0):
        super().__init__()
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, bottleneck_dim, num_tokens, act_layer=partial(nn.GELU, approximate="tanh"), drop=dropout)
        for linear in (self.mlp.fc1, self.mlp.fc2):  # scenic's MlpBlock init
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        maps = self.mlp(self.norm(x)).transpose(1, 2).softmax(-1)
        return maps @ x, maps


class TokenLearnerViT(PlainViT):
    """num_tokens: S, the learned tokens (8 and 16 named); learner_layer: the first block that runs on them
    (None: half the depth); bottleneck_dim: the maps' MLP width. The blocks are the plain ViT's, so plain ViT
    and CLIP weights load unchanged; only the TokenLearner is new."""

    fresh_parameter_prefixes = ("token_learner.",)
    mergeable = False  # its token set changes part-way; merging is for the plain blocks

    def __init__(self, num_tokens: int = 8, learner_layer: int = None, bottleneck_dim: int = 64, **kwargs):
        super().__init__(**kwargs)
        depth = len(self.blocks)
        self.learner_layer = depth // 2 if learner_layer is None else learner_layer
        if not 0 < self.learner_layer < depth:
            raise ValueError(f"learner_layer must be in [1, depth - 1] = [1, {depth - 1}], got {learner_layer}")
        self.token_learner = TokenLearner(self.embed_dim, num_tokens, bottleneck_dim, kwargs.get("drop_rate", 0.0))

    @property
    def grid_layers(self) -> int:
        return self.learner_layer

    def _run(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_seq(blocks, x)
        return blocks(x)

    def _patch_stage(self, images: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(images))))
        return self._run(self.blocks[: self.learner_layer], x)

    def forward_features(self, images: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("TokenLearner-ViT changes its tokens part-way: attn_mask / is_causal cannot be given")
        x = self._patch_stage(images)
        learned, _ = self.token_learner(x[:, self.num_prefix_tokens:])
        x = torch.cat([x[:, : self.num_prefix_tokens], learned], dim=1)
        return self.norm(self._run(self.blocks[self.learner_layer:], x))

    @torch.no_grad()
    def token_groups(self, images: torch.Tensor):
        """(the learned token each patch weighs most in [B, H, W], None)."""
        x = self._patch_stage(images)
        _, maps = self.token_learner(x[:, self.num_prefix_tokens:])
        return maps.argmax(1).view(-1, *self.patch_embed.grid_size), None

    def settings(self) -> dict:
        return {"num_tokens": self.token_learner.mlp.fc2.out_features, "learner_layer": self.learner_layer}


register_vit_family("tokenlearner", TokenLearnerViT, "tokenlearner_vit_{size}", "TokenLearner-ViT-{tag}",
                    feature_cfg=TOKEN_FEATURE_CFG,
                    variants={"": {}, "8tok": {"num_tokens": 8}, "16tok": {"num_tokens": 16}})
