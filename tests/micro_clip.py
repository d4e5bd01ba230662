"""CLIPs small enough to train for a few steps in a test (ViT / DTP-ViT 32 wide, 1-layer text), and
a launcher entry that knows them, for tests that run training in a subprocess."""
import sys

from open_clip.factory import _MODEL_CONFIGS
from timm.models import register_model

import dtpclip  # noqa: F401
from dtpclip.encoders.dtp import DTPViT
from dtpclip.encoders.vit import PlainViT, build_vit_family

MICRO = {"embed_dim": 32, "depth": 4, "num_heads": 2}


def dtp_vit_micro_patch8_64(pretrained=False, **kwargs):
    return build_vit_family(DTPViT, "dtp_vit_tiny_patch8_64", "tiny_patch8_64", pretrained,
                            **{**MICRO, "compression": 0.25, **kwargs})


def plain_vit_micro_patch8_64(pretrained=False, **kwargs):
    return build_vit_family(PlainViT, "plain_vit_tiny_patch8_64", "tiny_patch8_64", pretrained, **{**MICRO, **kwargs})


def register_micro_clip(family: str = "dtp") -> str:
    """Register the micro encoder of `family` ('dtp' or 'vit') and its CLIP; returns the CLIP's name."""
    encoder = {"dtp": dtp_vit_micro_patch8_64, "vit": plain_vit_micro_patch8_64}[family]
    register_model(encoder)
    name = f"{family.upper()}-Micro-test"
    _MODEL_CONFIGS[name] = {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": encoder.__name__, "timm_pool": "", "timm_proj": "linear", "image_size": 64},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    return name


if __name__ == "__main__":  # python tests/micro_clip.py <launcher flags>
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "launch"))
    register_micro_clip()
    from clip_pretrain import main
    main(sys.argv[1:])
