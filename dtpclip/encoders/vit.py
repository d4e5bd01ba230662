"""Plain ViT: timm's VisionTransformer in the CLIP layout, with the encoder contract added.

CLIP-style (pre-norm, LayerNorm eps 1e-5, no patch-embed bias, exact GELU) like timm's
`vit_*_clip_*` models, so open_clip VisionTransformer weights load through timm's own converter
and reproduce open_clip's visual output.
"""
import warnings
from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from dtpclip.checkpoint import encoder_state_from_clip
from dtpclip.encoders.output import EncoderOutput
from dtpclip.registry import register_family

# timm's own ViTs' feature config: `features_only=True` goes through `forward_intermediates`
VIT_FEATURE_CFG = dict(out_indices=3, feature_cls="getter")
# fc_norm=False: the final norm stays on the tokens (open_clip's ln_post) whatever the pooling.
CLIP_VIT_DEFAULTS = dict(pre_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-5), fc_norm=False, num_classes=0)


class PlainViT(VisionTransformer):
    """The plain ViT every other family is checked against (identity tests), and the contract's defaults.

    The contract beyond `encode` (each optional for a family; these are the defaults):
      fresh_parameter_prefixes  parameters a CLIP checkpoint cannot hold (they keep their init)
      mergeable                 token merging (ToMe, LGTM) may patch its blocks
      quantizable               low-bit quantization (LSQ, PTQ) may patch its blocks' Linears and attention
      hidden_layers_readable    `hidden_tokens(images, layer)` gives block `layer`'s tokens (LLaVA's
                                select_layer); False where the token set changes inside the trunk
      token_groups(images)      which output token each patch ends in, for the visualiser
      settings()                its efficiency knobs, for the registry and comparison tables
      has_aux_loss              `encode` returns a loss term training must add, which `forward` cannot return
    """

    fresh_parameter_prefixes: Tuple[str, ...] = ()
    mergeable = True
    quantizable = True
    hidden_layers_readable = True
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
        self.warn_if_aux_loss_dropped()
        return super().forward(images, **kwargs)

    def warn_if_aux_loss_dropped(self) -> None:
        """Training through `forward` (what open_clip's timm tower calls) drops `encode`'s aux_loss: say so."""
        if self.has_aux_loss and self.training and torch.is_grad_enabled():
            warnings.warn(f"{type(self).__name__} is training through forward(), which cannot return its aux_loss "
                          "(e.g. DTP's boundary loss), so nothing trains it: train through encode(), as dtpclip's "
                          "loop does (launch/clip_pretrain.py)", stacklevel=3)

    def forward_intermediates(self, *args, **kwargs):
        """timm's per-block features, where they exist: not for encoders whose token set changes inside the
        trunk (`hidden_layers_readable = False`), whose inherited version would run the blocks unpooled."""
        if not self.hidden_layers_readable:
            raise NotImplementedError(f"{type(self).__name__} changes its token set inside the trunk, so it has no "
                                      "per-block feature maps: use encode() (tokens and token_mask)")
        return super().forward_intermediates(*args, **kwargs)

    def hidden_tokens(self, images: torch.Tensor, layer: int) -> torch.Tensor:
        """Tokens after the first `layer` blocks, before the final norm (CLIP's hidden_states[layer])."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(images))))
        for block in self.blocks[:layer]:
            x = block(x)
        return x

    @torch.no_grad()
    def token_groups(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(output token of each patch [B, H, W], boundaries [B, H, W] or None): here every patch its own."""
        height, width = self.patch_embed.grid_size
        return torch.arange(height * width).expand(len(images), -1).reshape(-1, height, width), None

    def settings(self) -> dict:
        return {}


def find_vit(model: nn.Module, transform: str) -> VisionTransformer:
    """The timm ViT an in-place transform patches: the model itself, or the visual trunk of an
    open_clip CLIP / TimmModel; a TypeError naming `transform` otherwise."""
    candidates = [model, getattr(model, "trunk", None), getattr(getattr(model, "visual", None), "trunk", None)]
    vit = next((m for m in candidates if isinstance(m, VisionTransformer)), None)
    if vit is None:
        raise TypeError(f"{transform} patches a timm VisionTransformer (a registry ViT or the visual trunk of a "
                        f"dtpclip CLIP); got {type(model).__name__}")
    return vit


def register_vit_family(family: str, model_cls, name: str, clip_name: Optional[str], **kwargs):
    """`register_family` for a ViT-based family: CLIP checkpoints load through `encoder_state_from_clip`, and
    timm's `features_only=True` works as for timm's own ViTs (its feature config)."""
    return register_family(family, model_cls, name, clip_name, pretrained_filter_fn=encoder_state_from_clip,
                           feature_cfg=VIT_FEATURE_CFG, **kwargs)


register_vit_family("vit", PlainViT, "plain_vit_{size}", "PlainViT-{tag}")
