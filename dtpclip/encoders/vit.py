"""Plain ViT: timm's VisionTransformer in the CLIP layout, with the encoder contract added.

CLIP-style (pre-norm, LayerNorm eps 1e-5, no patch-embed bias, exact GELU) like timm's
`vit_*_clip_*` models, so open_clip VisionTransformer weights load through timm's own converter
and reproduce open_clip's visual output.
"""
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import VisionTransformer

from dtpclip.checkpoint import encoder_state_from_clip
from dtpclip.encoders.output import EncoderOutput
from dtpclip.registry import register_family

# timm's own ViTs' feature config: `features_only=True` goes through `forward_intermediates`
VIT_FEATURE_CFG = dict(out_indices=3, feature_cls="getter")
# Families whose later blocks hold no patch grid give their features as token lists
TOKEN_FEATURE_CFG = dict(VIT_FEATURE_CFG, output_fmt="NLC")
# fc_norm=False: the final norm stays on the tokens (open_clip's ln_post) whatever the pooling.
CLIP_VIT_DEFAULTS = dict(pre_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-5), fc_norm=False, num_classes=0)
# timm's ImageNet ViT layout (vit_small_patch16_224: no pre-norm, patch-embed bias, LayerNorm eps 1e-6,
# 1000-class head), the one the VQ-ViT seed fine-tunes from: pass as kwargs to load such checkpoints, or
# `profile --layout timm` to count as timm's models are counted.
TIMM_IMAGENET_LAYOUT = dict(pre_norm=False, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=1000)
LAYOUTS = {"clip": {}, "timm": TIMM_IMAGENET_LAYOUT}

_AUX_OUTPUT_SINK: ContextVar[Optional[List[EncoderOutput]]] = ContextVar("dtpclip_aux_output_sink", default=None)


@contextmanager
def collecting_aux_losses() -> Iterator[List[EncoderOutput]]:
    """Inside it, training through `forward()` appends each `encode()` output (its aux_loss and stats) to the
    yielded list instead of warning that the aux loss is dropped: the hook a foreign training loop's loss
    (open_clip_train's, see dtpclip.open_clip_train) adds them through."""
    outputs: List[EncoderOutput] = []
    token = _AUX_OUTPUT_SINK.set(outputs)
    try:
        yield outputs
    finally:
        _AUX_OUTPUT_SINK.reset(token)


class PlainViT(VisionTransformer):
    """The plain ViT every other family is checked against (identity tests), and the contract's defaults.

    The contract beyond `encode` (each optional for a family; these are the defaults):
      fresh_parameter_prefixes  parameters a CLIP checkpoint cannot hold (they keep their init)
      mergeable                 token merging (ToMe, LGTM) may patch its blocks
      quantizable               low-bit quantization (LSQ, PTQ) may patch its blocks' Linears and attention
      grid_layers               leading blocks whose output is the patch grid (NCHW `forward_intermediates`);
                                past them timm's feature API gives the tokens the blocks really hold (NLC)
      token_groups(images)      which output token each patch ends in, for the visualiser
      settings()                its efficiency knobs, for the registry and comparison tables
      has_aux_loss              `encode` returns a loss term training must add, which `forward` cannot return
                                (in training it hands it to `collecting_aux_losses`, or warns that it is dropped)
      set_reduction_strength(s) how much of its token reduction it does, 0 (none) to 1 (its target), for a
                                training schedule (`--reduction-anneal`); by default there is none to anneal
    """

    fresh_parameter_prefixes: Tuple[str, ...] = ()
    mergeable = True
    quantizable = True
    has_aux_loss = False

    def __init__(self, **kwargs):
        super().__init__(**{**CLIP_VIT_DEFAULTS, "global_pool": "token", **kwargs})

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """timm's init, except that the class token and its position embedding start at zero
        (pre-norm would blow timm's 1e-6 class token up into one vector every image shares)."""
        super().init_weights(mode, needs_reset)
        if self.cls_token is not None:
            with torch.no_grad():
                self.cls_token.zero_()
                if self.pos_embed is not None and not self.no_embed_class:
                    self.pos_embed[:, : self.num_prefix_tokens].zero_()

    def encode(self, images) -> EncoderOutput:
        tokens = self.forward_features(images)
        return EncoderOutput.dense(tokens, self.forward_head(tokens, pre_logits=True))

    def forward(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        """timm's forward; in training, for an encoder with an aux loss, through `encode` so the loss is handed on."""
        if not (self.has_aux_loss and self.training and torch.is_grad_enabled()):
            return super().forward(images, **kwargs)
        out = self.encode(images)
        sink = _AUX_OUTPUT_SINK.get()
        if sink is None:
            warnings.warn(f"{type(self).__name__} is training through forward(), which cannot return its aux_loss "
                          "(e.g. DTP's boundary loss), so nothing trains it: train through encode(), as dtpclip's "
                          "loop does (launch/clip_pretrain.py), or through `python -m dtpclip.open_clip_train`",
                          stacklevel=2)
        else:
            sink.append(out)
        return self.head(out.pooled)

    @property
    def grid_layers(self) -> int:
        """How many leading blocks still output the patch grid (timm's NCHW feature maps exist for those)."""
        return len(self.blocks)

    def forward_intermediates(self, x: torch.Tensor, indices=None, return_prefix_tokens: bool = False,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, output_dict: bool = False):
        """timm's per-block features (timm's signature and outputs), as `forward_features` computes them: each
        taken block's output is caught by a hook, so a family that changes its tokens between blocks (ToMe's
        merges, a pruning step) gives the tokens its blocks really hold. NCHW maps only for blocks that keep
        the grid. `stop_early` is accepted and runs all blocks."""
        take = self.check_feature_format(indices, output_fmt)
        taken = {}
        hooks = [self.blocks[i].register_forward_hook(lambda module, args, out, i=i: taken.__setitem__(i, out))
                 for i in take]
        try:
            final = self.forward_features(x)
        finally:
            for hook in hooks:
                hook.remove()
        taken = {i: self.norm(t) if norm else t for i, t in taken.items()}
        return self.assemble_intermediates(x, take, taken, {}, final, return_prefix_tokens, output_fmt,
                                           intermediates_only, output_dict)

    def check_feature_format(self, indices, output_fmt: str) -> List[int]:
        """The absolute block indices `indices` takes; a ValueError if NCHW maps are asked of gridless blocks."""
        take, _ = feature_take_indices(len(self.blocks), indices)
        gridless = [i for i in take if i >= self.grid_layers]
        if output_fmt == "NCHW" and gridless:
            raise ValueError(f"blocks {gridless} of {type(self).__name__} hold a changed token set, not the "
                             f"{tuple(self.patch_embed.grid_size)} patch grid: ask for output_fmt='NLC' (token lists)")
        return take

    def assemble_intermediates(self, images, take: List[int], taken: dict, masks: dict, final: torch.Tensor,
                               return_prefix_tokens: bool, output_fmt: str, intermediates_only: bool,
                               output_dict: bool):
        """timm's outputs of `forward_intermediates` from block index -> tokens [B, N, D] (prefix first) and, where
        padded, block index -> token mask [B, N]; the dict output also holds 'image_intermediates_mask'."""
        prefix = self.num_prefix_tokens
        intermediates = [taken[i][:, prefix:] for i in take]
        prefix_tokens = [taken[i][:, :prefix] for i in take]
        patch_masks = [masks[i][:, prefix:] if i in masks else
                       torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) for i, t in zip(take, intermediates)]
        if output_fmt == "NCHW":
            height, width = self.patch_embed.dynamic_feat_size(images.shape[-2:])
            intermediates = [t.reshape(len(t), height, width, -1).permute(0, 3, 1, 2).contiguous()
                             for t in intermediates]
        if output_dict:
            result = {"image_intermediates": intermediates, "image_intermediates_mask": patch_masks}
            if return_prefix_tokens and prefix:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = final
            return result
        if return_prefix_tokens and prefix:
            intermediates = list(zip(intermediates, prefix_tokens))
        return intermediates if intermediates_only else (final, intermediates)

    @torch.no_grad()
    def token_groups(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(output token of each patch [B, H, W], boundaries [B, H, W] or None): here every patch its own."""
        height, width = self.patch_embed.grid_size
        return torch.arange(height * width).expand(len(images), -1).reshape(-1, height, width), None

    def settings(self) -> dict:
        return {}

    def set_reduction_strength(self, strength: float) -> None:
        raise ValueError(f"{type(self).__name__} has no token reduction to anneal; DTP-ViT (gumbel boundaries) has")


def find_vit(model: nn.Module, transform: str) -> VisionTransformer:
    """The timm ViT an in-place transform patches: the model itself, or the visual trunk of an
    open_clip CLIP / TimmModel; a TypeError naming `transform` otherwise."""
    candidates = [model, getattr(model, "trunk", None), getattr(getattr(model, "visual", None), "trunk", None)]
    vit = next((m for m in candidates if isinstance(m, VisionTransformer)), None)
    if vit is None:
        raise TypeError(f"{transform} patches a timm VisionTransformer (a registry ViT or the visual trunk of a "
                        f"dtpclip CLIP); got {type(model).__name__}")
    return vit


def register_vit_family(family: str, model_cls, name: str, clip_name: Optional[str],
                        feature_cfg: dict = VIT_FEATURE_CFG, **kwargs):
    """`register_family` for a ViT-based family: CLIP checkpoints load through `encoder_state_from_clip`, and
    timm's `features_only=True` works as for timm's own ViTs (their feature config; TOKEN_FEATURE_CFG where
    later blocks hold no grid)."""
    return register_family(family, model_cls, name, clip_name, pretrained_filter_fn=encoder_state_from_clip,
                           feature_cfg=feature_cfg, **kwargs)


register_vit_family("vit", PlainViT, "plain_vit_{size}", "PlainViT-{tag}")
