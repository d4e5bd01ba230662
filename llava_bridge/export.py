"""Export a trained model as a Hugging Face directory that loads offline:

    python -m llava_bridge.export --checkpoint RUN/final --out DIR [--format auto|stock|remote]

stock (auto's choice where the model allows it: a plain-ViT tower read at select_layer <= -2, the
mlp2x_gelu projector; llava_bridge.stock_export): transformers' own LlavaForConditionalGeneration and
LlavaProcessor, so `pipeline("image-text-to-text", model=DIR)` answers with no dtpclip installed.
remote (every other tower: DTP, merged, quantized): config.json with auto_map to the model code,
copied into DIR with every module it needs (llava_bridge.remote_code; torch, transformers and timm
are all it imports), model.safetensors and the tokenizer, for
`AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)`; input ids carry
IMAGE_TOKEN_INDEX (-200) placeholders (llava_bridge.conversation), pixel_values one image per placeholder.
"""
from dtpclip.cli import early_args, make_parser, parse_args, run_main


def make_arg_parser():
    parser = make_parser(__doc__.splitlines()[0], "python -m llava_bridge.export")
    parser.add_argument("--checkpoint", required=True, help="a llava_align run directory or its final/")
    parser.add_argument("--out", required=True, help="export directory (must not exist yet, or be empty)")
    parser.add_argument("--format", default="auto", choices=("auto", "stock", "remote"),
                        help="stock transformers LLaVA, remote code, or auto: stock where the model allows it")
    return parser


# `python -m`: the arguments are parsed here, before the heavy imports below (fast --help)
ARGS = early_args(make_arg_parser, __name__)

import os  # noqa: E402  (after the early parse, as every import below)
import shutil
from pathlib import Path
from typing import Tuple

from llava_bridge.hf_model import DtpLlavaConfig, DtpLlavaForConditionalGeneration
from llava_bridge.remote_code import write_remote_code
from llava_bridge.stock_export import export_stock, stock_refusal


def export_hf(model, tokenizer, template, config: dict, out_dir, form: str = "auto") -> Tuple[Path, str]:
    """Write `model` (a LlavaModel) with the build `config` (llava_config.json's keys) to `out_dir`, which must
    not exist yet (or be empty), as `form` (see the module doc); the export is staged beside it and renamed
    into place when complete. Returns (the directory, the form written)."""
    out_dir = Path(out_dir)
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir())):
        raise FileExistsError(f"--out {str(out_dir)!r} already exists ({'a file' if out_dir.is_file() else 'not empty'})"
                              ": choose a new export directory")
    refusal = stock_refusal(model, config)
    if form == "stock" and refusal:
        raise ValueError(f"this model cannot be exported as stock LLaVA: {refusal}; use --format remote")
    form = "remote" if form == "auto" and refusal else "stock" if form == "auto" else form
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    if form == "stock":
        export_stock(model, tokenizer, template, config, staging)
    else:
        export_remote(model, tokenizer, config, staging)
    if out_dir.is_dir():
        out_dir.rmdir()
    os.replace(staging, out_dir)
    return out_dir, form


def export_remote(model, tokenizer, config: dict, out_dir: Path) -> None:
    text = model.language_model.config.to_dict()
    hf_config = DtpLlavaConfig(
        encoder=config["encoder"], model_kwargs=config.get("model_kwargs", {}), tower_structure=config["tower_structure"],
        select_layer=config["select_layer"], select_feature=config["select_feature"],
        projector=config["projector"], lm_config=text, max_sequence_length=config.get("max_length"))
    hf = DtpLlavaForConditionalGeneration(hf_config)
    hf.model.load_state_dict(model.state_dict())
    hf.save_pretrained(out_dir)
    entry = write_remote_code(out_dir)
    hf_config.auto_map = {"AutoConfig": f"{entry}.{DtpLlavaConfig.__name__}",
                          "AutoModelForImageTextToText": f"{entry}.{DtpLlavaForConditionalGeneration.__name__}"}
    hf_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def main(argv=None, args=None) -> Path:
    from llava_bridge.build import load_trained
    args = args or parse_args(make_arg_parser(), argv)
    model, tokenizer, template, config = load_trained(args.checkpoint)
    out, form = export_hf(model, tokenizer, template, config, args.out, args.format)
    how = ('pipeline("image-text-to-text", model=DIR), no dtpclip needed' if form == "stock" else
           "AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)")
    print(f"exported to {out} as {form} LLaVA: {how}")
    return out


if __name__ == "__main__":
    run_main(main, args=ARGS)
