"""Export a trained model as a Hugging Face directory that loads offline:

    python -m llava_bridge.export --checkpoint RUN/final --out DIR
    AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)

The directory holds config.json (auto_map to the copied hf_model.py), model.safetensors and the
tokenizer. Input ids carry IMAGE_TOKEN_INDEX (-200) placeholders (llava_bridge.conversation),
pixel_values one image per placeholder.
"""
from dtpclip.cli import early_args, make_parser, parse_args, run_main


def make_arg_parser():
    parser = make_parser(__doc__.splitlines()[0], "python -m llava_bridge.export")
    parser.add_argument("--checkpoint", required=True, help="a llava_align run directory or its final/")
    parser.add_argument("--out", required=True, help="export directory (must not exist yet, or be empty)")
    return parser


# `python -m`: the arguments are parsed here, before the heavy imports below (fast --help)
ARGS = early_args(make_arg_parser, __name__)

import os  # noqa: E402  (after the early parse, as every import below)
import shutil
from pathlib import Path

from llava_bridge.hf_model import DtpLlavaConfig, DtpLlavaForConditionalGeneration


def export_hf(model, tokenizer, config: dict, out_dir) -> Path:
    """Write `model` (a LlavaModel) with the build `config` (llava_config.json's keys) to `out_dir`, which must
    not exist yet (or be empty); the export is staged beside it and renamed into place when complete."""
    out_dir = Path(out_dir)
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir())):
        raise FileExistsError(f"--out {str(out_dir)!r} already exists ({'a file' if out_dir.is_file() else 'not empty'})"
                              ": choose a new export directory")
    final, out_dir = out_dir, out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(out_dir, ignore_errors=True)
    text = model.language_model.config.to_dict()
    hf_config = DtpLlavaConfig(
        encoder=config["encoder"], model_kwargs=config.get("model_kwargs", {}), tower_structure=config["tower_structure"],
        select_layer=config["select_layer"], select_feature=config["select_feature"],
        projector=config["projector"], lm_config=text, max_sequence_length=config.get("max_length"))
    DtpLlavaConfig.register_for_auto_class()
    DtpLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    hf = DtpLlavaForConditionalGeneration(hf_config)
    hf.model.load_state_dict(model.state_dict())
    hf.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if final.is_dir():
        final.rmdir()
    os.replace(out_dir, final)
    return final


def main(argv=None, args=None) -> Path:
    from llava_bridge.build import load_trained
    args = args or parse_args(make_arg_parser(), argv)
    model, tokenizer, _, config = load_trained(args.checkpoint)
    out = export_hf(model, tokenizer, config, args.out)
    print(f"exported to {out}")
    return out


if __name__ == "__main__":
    run_main(main, args=ARGS)
