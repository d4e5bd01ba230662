"""Command-line text to values: `key=value` pairs read as timm's --model-kwargs reads them, and the
names some flags choose among (their modules import them from here).

Pure Python (no torch), so argument parsing and `--help` run before any heavy import.
"""
import ast
from typing import Iterable

_WORDS = {"true": True, "false": False, "none": None, "null": None}


def parse_value(text: str):
    """A Python literal (timm's --model-kwargs rule), else the string; 'true' / 'false' / 'none' also count."""
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_kwargs(items: Iterable[str], what: str = "--model-kwargs") -> dict:
    """['compression=0.2', 'pre_layers=3'] -> {'compression': 0.2, 'pre_layers': 3}."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what}: expected key=value, got {item!r}")
        kwargs[key.strip().replace("-", "_")] = parse_value(value.strip())
    return kwargs


QUANT_SCOPES = ("linear", "linear+attn")  # what LSQ quantizes: the blocks' Linears, or also attention
LSQ_GRAD_SCALES = ("paper", "lsq-net")  # N of LSQ's step gradient scale for activations: an example's, the batch's
LOGIT_LOSSES = ("logit", "dkd")  # logit distillation: KD, decoupled KD
FEATURE_LOSSES = ("cos", "mse")  # block-feature distillation
# which features feature KD compares: every block's output; the last embedding (the head's input, the ViT-Lite
# study's "logits + last embedding"); each block's residual stream after attention and after the MLP
FEATURE_LAYERS = ("blocks", "last", "attn_and_block")
