"""python -m dtpclip.export [--checkpoint RUN] --out DIR: a checkpoint in the Hub layouts open_clip and timm load.

A dtpclip checkpoint directory (model.safetensors + a training config.json) is not one: timm's `local-dir:`
reads that config.json as its own, open_clip's wants open_clip_config.json. `save_pretrained` writes both
layouts side by side, each with its library's own writer (`save_for_hf`):

    open_clip_config.json + open_clip_model.safetensors   the CLIP, for open_clip (a CLIP checkpoint only)
    config.json + model.safetensors                        the image encoder, for timm

so, with `import dtpclip` (our names), `open_clip.create_model_and_transforms('local-dir:DIR')` and
`timm.create_model('local-dir:DIR', pretrained=True)` load it; uploaded as it is, `hf-hub:org/name` does too.

    python -m dtpclip.export --out exported/dtp4x                   # the newest demo run's CLIP
    python -m dtpclip.export --checkpoint runs/my-run --out exported/my-run
"""
from dtpclip.cli import early_args, make_parser, parse_args, run_main


def make_arg_parser():
    parser = make_parser(__doc__.splitlines()[0], "python -m dtpclip.export")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file, checkpoint dir or run dir (default: the newest demo run's)")
    parser.add_argument("--model", default=None,
                        help="the checkpoint's model, where no config.json beside it says (open_clip_train's .pt)")
    parser.add_argument("--out", required=True, help="a new directory for the exported model")
    return parser


# `python -m`: the arguments are parsed here, before the heavy imports below (fast --help)
ARGS = early_args(make_arg_parser, __name__)

from pathlib import Path  # noqa: E402  (after the early parse, as every import below)

import open_clip
import torch.nn as nn
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
from open_clip.push_to_hf_hub import save_config_for_hf
from safetensors.torch import save_file
from timm.models import save_for_hf as save_timm_for_hf

from dtpclip.checkpoint import read_state_dict
from dtpclip.clip import create_clip_and_transforms, open_clip_config
from dtpclip.encoders.quant import quant_config
from dtpclip.evaluate import resolve_model
from dtpclip.factory import create_encoder
from dtpclip.registry import encoder_info

# constructor args timm records that any build of the name sets for itself
_BUILD_ARGS = ("num_classes", "global_pool", "img_size", "in_chans")


def is_clip(model: nn.Module) -> bool:
    return hasattr(model, "visual") and hasattr(getattr(model.visual, "trunk", None), "encode")


def check_rebuildable(encoder: nn.Module) -> None:
    """timm and open_clip rebuild a model from its name and constructor args: refuse an encoder changed after
    construction (a transform, quantization), whose weights would load into a model that computes otherwise."""
    if quant_config(encoder) is not None:
        raise ValueError("a quantized encoder is not rebuilt from its name by timm or open_clip: load it with "
                         "dtpclip (its checkpoint) instead")
    architecture = encoder.pretrained_cfg["architecture"]
    built = encoder_info(architecture).settings(**constructor_args(encoder))
    if built != encoder.settings():
        raise ValueError(f"this {architecture} was changed after construction (settings {encoder.settings()}, "
                         f"its name and args build {built}), e.g. by a transform: timm and open_clip would "
                         "rebuild it without that; load it with dtpclip instead")


def constructor_args(encoder: nn.Module) -> dict:
    """The kwargs the encoder was built with beyond its name (timm records them)."""
    return {k: v for k, v in getattr(encoder, "_model_args", {}).items() if k not in _BUILD_ARGS}


def save_open_clip_layout(model: nn.Module, info, out: Path) -> None:
    """open_clip's `save_for_hf`, which assumes a Hugging Face tokenizer: CLIP's own (SimpleTokenizer) has no
    files, and open_clip's loader falls back to it when the config names none."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / HF_SAFE_WEIGHTS_NAME))
    save_config_for_hf(model, out / HF_CONFIG_NAME, model_config=open_clip_config(info))
    tokenizer = open_clip.get_tokenizer(info.clip_name)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)


def save_pretrained(model: nn.Module, directory) -> Path:
    """Write a dtpclip CLIP (both layouts; its image tower for timm) or a registry encoder (timm's layout) to
    `directory`, a new or empty one; returns it."""
    out = Path(directory).expanduser()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{str(out)!r} is not empty: export into a new directory")
    encoder = model.visual.trunk if is_clip(model) else model
    check_rebuildable(encoder)
    if is_clip(model):
        args = constructor_args(encoder)
        if args:
            raise ValueError(f"open_clip builds the image tower by name only, without constructor args {args}: "
                             "train a named variant (python -m dtpclip.models lists them), or export the encoder")
        save_open_clip_layout(model, encoder_info(encoder.pretrained_cfg["architecture"]), out)
    save_timm_for_hf(encoder, out, safe_serialization=True)
    return out


def main(argv=None, args=None):
    args = args or parse_args(make_arg_parser(), argv)
    source = resolve_model(args.checkpoint, args.model)
    if source.config.get("transforms") or source.config.get("quantization"):
        raise ValueError(f"checkpoint {str(source.weights)!r} holds an encoder changed after construction "
                         f"({source.config.get('transforms') or 'quantized'}): timm and open_clip rebuild models "
                         "by name and args only; load it with dtpclip")
    if any(key.startswith("visual.") for key in read_state_dict(source.weights)):
        model = create_clip_and_transforms(source.name, str(source.weights), source.model_kwargs)[0]
    else:
        model = create_encoder(source.name, str(source.weights), **source.model_kwargs)
    out = save_pretrained(model.eval(), args.out)
    print(f"exported {source.name} to {out}: open_clip / timm 'local-dir:{out}' (with import dtpclip)")


if __name__ == "__main__":
    run_main(main, args=ARGS)
