"""Plain ViT: timm's VisionTransformer in the CLIP layout, with the encoder contract added.

CLIP-style (pre-norm, LayerNorm eps 1e-5, no patch-embed bias, exact GELU) like timm's
`vit_*_clip_*` models, so open_clip VisionTransformer weights load through timm's own converter
and reproduce open_clip's visual output.
"""
from functools import partial

import torch
import torch.nn as nn
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer

from dtpclip.checkpoint import encoder_state_from_clip
from dtpclip.encoders.output import EncoderOutput
from dtpclip.registry import CLIP_TAGS, VIT_SIZES, EncoderInfo, register_encoder

# fc_norm=False: the final norm stays on the tokens (open_clip's ln_post) whatever the pooling.
CLIP_VIT_DEFAULTS = dict(pre_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-5), fc_norm=False, num_classes=0)


class PlainViT(VisionTransformer):
    """The plain ViT every other family is checked against (identity tests)."""

    fresh_parameter_prefixes = ()  # parameters a CLIP checkpoint cannot hold

    def __init__(self, **kwargs):
        super().__init__(**{**CLIP_VIT_DEFAULTS, "global_pool": "token", **kwargs})

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """timm's init, except that the class token and its position embedding start at zero.

        Pre-norm (`norm_pre`, CLIP's ln_pre) scales any small vector to unit size, so timm's 1e-6
        class token becomes one large vector shared by every image: a fresh CLIP's image features
        had cosine 0.99 between images. A zero vector stays zero under LayerNorm, so the class token
        holds only what it gathers from the patches (cosine 0.08-0.16 on demo images), and the demo
        CLIP left its chance plateau sooner: 48-74% zero-shot after ~900 steps against 40-71% (3 seeds).
        """
        super().init_weights(mode, needs_reset)
        if self.cls_token is not None:
            with torch.no_grad():
                self.cls_token.zero_()
                if self.pos_embed is not None and not self.no_embed_class:
                    self.pos_embed[:, : self.num_prefix_tokens].zero_()

    def encode(self, images) -> EncoderOutput:
        tokens = self.forward_features(images)
        return EncoderOutput.dense(tokens, self.forward_head(tokens, pre_logits=True))


def find_vit(model: nn.Module, transform: str) -> VisionTransformer:
    """The timm ViT an in-place transform patches: the model itself, or the visual trunk of an
    open_clip CLIP / TimmModel; a TypeError naming `transform` otherwise."""
    candidates = [model, getattr(model, "trunk", None), getattr(getattr(model, "visual", None), "trunk", None)]
    vit = next((m for m in candidates if isinstance(m, VisionTransformer)), None)
    if vit is None:
        raise TypeError(f"{transform} patches a timm VisionTransformer (a registry ViT or the visual trunk of a "
                        f"dtpclip CLIP); got {type(model).__name__}")
    return vit


def default_cfg(size: str) -> dict:
    """timm pretrained config (data) of a size: input size and CLIP normalisation, no hub weights."""
    img = VIT_SIZES[size]["img_size"]
    return dict(
        url="", num_classes=0, input_size=(3, img, img), pool_size=None, crop_pct=1.0,
        interpolation="bicubic", fixed_input_size=True, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
        first_conv="patch_embed.proj", classifier="head",
    )


def build_vit_family(model_cls, variant: str, size: str, pretrained: bool = False, **kwargs):
    """`build_model_with_cfg` for any of our ViT classes at a registry size; kwargs override the size."""
    return build_model_with_cfg(
        model_cls, variant, pretrained, pretrained_filter_fn=encoder_state_from_clip,
        **{**VIT_SIZES[size], **kwargs},
    )


def _register(size: str) -> None:
    name = f"plain_vit_{size}"
    register_encoder(
        lambda pretrained=False, **kwargs: build_vit_family(PlainViT, name, size, pretrained, **kwargs),
        EncoderInfo(name=name, family="vit", size=size, clip_name=f"PlainViT-{CLIP_TAGS[size]}"),
    )


default_cfgs = generate_default_cfgs({f"plain_vit_{size}": default_cfg(size) for size in VIT_SIZES})
for _size in VIT_SIZES:
    _register(_size)
