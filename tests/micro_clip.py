"""CLIPs small enough to train for a few steps in a test (ViT / DTP-ViT 32 wide, 1-layer text), registered
through the documented API (`dtpclip.register_family`), and a launcher entry that knows them, for tests
that run training in a subprocess."""
import sys

import dtpclip
from dtpclip.encoders.dtp import DTPViT
from dtpclip.encoders.dynamic_vit import DynamicViT
from dtpclip.encoders.vit import PlainViT
from dtpclip.registry import SIZES

MICRO = dtpclip.Size(
    "micro_patch8_64", "Micro", {**SIZES["tiny_patch8_64"].vit, "embed_dim": 32, "depth": 4, "num_heads": 2},
    {"embed_dim": 32, "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}})


def register_micro_clip(family: str = "dtp") -> str:
    """Register the micro encoder of `family` ('dtp', 'vit' or 'dynamic') and its CLIP; returns the CLIP's name."""
    model_cls = {"dtp": DTPViT, "vit": PlainViT, "dynamic": DynamicViT}[family]
    info, = dtpclip.register_family(family, model_cls, f"{family}_vit_{{size}}", f"{family.upper()}-Micro-test",
                                    sizes=[MICRO])
    return info.clip_name


if __name__ == "__main__":  # python tests/micro_clip.py <launcher flags>
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "launch"))
    register_micro_clip()
    from clip_pretrain import main
    main(sys.argv[1:])
