"""dtpclip: efficient vision encoders (dynamic token pooling, token merging, quantization)
for CLIP pretraining, LLaVA-style alignment and zero-shot / classification evaluation.

Importing the package registers every encoder with timm and with open_clip. Entry points parse
their arguments first (fast --help): `python -m dtpclip.<command>`, and the launchers through
DTPCLIP_DEFER_IMPORTS, import what they use after parsing, which registers it then.
"""
import importlib
import os
import sys

if sys.argv[:1] != ["-m"] and not os.environ.get("DTPCLIP_DEFER_IMPORTS"):
    from dtpclip import clip, encoders  # noqa: F401  (timm and open_clip registration)

_API = {
    "EncoderOutput": "dtpclip.encoders.output", "apply_transforms": "dtpclip.factory",
    "create_encoder": "dtpclip.factory", **{name: "dtpclip.registry" for name in (
        "EncoderInfo", "Size", "encoder_info", "list_encoders", "list_transforms", "register_family",
        "register_transform")},
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dtpclip' has no attribute {name!r}")
