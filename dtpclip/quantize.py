"""python -m dtpclip.quantize: RepQ-style post-training quantization (+ QwT) of a checkpoint's encoder.

Calibrates on `--calib-images` (32, RepQ-ViT's count) images (with `--qwt`, QwT fits its compensation
on `--qwt-images`, 512 as its ImageNet script, the first 32 of them shared) and writes a dtpclip checkpoint
directory (model.safetensors + config.json with the model name, its kwargs, the transforms applied
and the "quantization" structure) that `python -m dtpclip.zeroshot`, `dtpclip.classify` and
`dtpclip.profile` load as they load any checkpoint (`dtpclip.factory.restore_structure`).
A CLIP checkpoint is quantized in its visual tower (the text tower stays float); an encoder
without a CLIP (e.g. vit_6_4_32 from classify) is quantized on its own. `--transform` specs
(e.g. `tome:r=4`) are applied first, in order, then `ptq:w=W,a=A[,qwt=true]`.

    python -m dtpclip.quantize                       # the latest demo CLIP at W4A4, demo train images
    python -m dtpclip.quantize --checkpoint RUN --w-bits 4 --a-bits 4 --qwt --calib-data DIR --out OUT
    python -m dtpclip.zeroshot --checkpoint OUT

Calibration data: an eval-set directory (CLIP_benchmark wds or ImageFolder) or a webdataset shard
spec (dtpclip.data: brace pattern, list file); see `dtpclip.calibration`.
"""
from dtpclip.cli import add_model_kwargs, add_transform, early_args, make_parser, parse_args, run_main


def make_arg_parser():
    parser = make_parser(__doc__.splitlines()[0], "python -m dtpclip.quantize")
    parser.add_argument("--model", default=None,
                        help="our open_clip or registry name; None: the checkpoint's config.json")
    parser.add_argument("--checkpoint", default=None, help="CLIP / encoder checkpoint file, checkpoint directory "
                        "or run directory; None: the latest demo checkpoint")
    add_model_kwargs(parser)
    add_transform(parser)
    parser.add_argument("--w-bits", type=int, default=4, help="weight bits (per output channel)")
    parser.add_argument("--a-bits", type=int, default=4,
                        help="activation bits (log-sqrt(2) for attention probabilities)")
    parser.add_argument("--qwt", action="store_true", help="add QwT linear compensation per block")
    parser.add_argument("--calib-data", default=None,
                        help="eval-set directory or train shard spec; None: the demo's train shards")
    parser.add_argument("--calib-split", default="test", help="split folder of an eval-set --calib-data")
    parser.add_argument("--calib-images", type=int, default=32, help="images the quantizers calibrate on (RepQ-ViT's 32)")
    parser.add_argument("--qwt-images", type=int, default=512,
                        help="with --qwt: images QwT fits its compensation on (its ImageNet script's 512; the first "
                             "--calib-images of them also calibrate the quantizers)")
    parser.add_argument("--batch-size", type=int, default=16, help="calibration images per forward")
    parser.add_argument("--device", default=None, help="torch device (None: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="which calibration images are picked")
    parser.add_argument("--eval-data", default=None,
                        help="zero-shot eval set of the quantized CLIP ('none': skip); None: the demo eval set when "
                             "quantizing the latest demo checkpoint, else skip")
    parser.add_argument("--out", default=None,
                        help="output checkpoint directory (must not hold a checkpoint yet); None: "
                             "quantized_w<W>a<A>[_qwt]_<source> (default_out)")
    return parser


# `python -m`: the arguments are parsed here, before the heavy imports below (fast --help)
ARGS = early_args(make_arg_parser, __name__)

import json  # noqa: E402  (after the early parse, as every import below)
import time
from pathlib import Path

import open_clip

from dtpclip.calibration import calibration_batches, default_calibration_source
from dtpclip.checkpoint import WEIGHTS_FILE, save_checkpoint_dir
from dtpclip.clip import create_clip_and_transforms, encoder_transforms
from dtpclip.encoders.quant import quant_config
from dtpclip.evaluate import demo_eval_dir, resolve_model
from dtpclip.factory import apply_transforms, create_encoder
from dtpclip.measure import default_device
from dtpclip.registry import encoder_info
from dtpclip.zeroshot import run_zero_shot


def build_model(name: str, weights, model_kwargs: dict):
    """(model to save, its registry encoder, eval preprocess, name to save under): a CLIP when `name`
    has one, else the bare encoder."""
    info = encoder_info(name)
    if info.clip_name:
        model, _, preprocess = create_clip_and_transforms(info.clip_name, str(weights), model_kwargs)
        return model, model.visual.trunk, preprocess, info.clip_name
    encoder = create_encoder(info.name, checkpoint=weights, **model_kwargs)
    return encoder, encoder, encoder_transforms(encoder)[1], info.name


def default_out(weights: Path, tag: str) -> Path:
    """Beside the source: `<tag>_<checkpoint dir>` in its run directory (outside its checkpoints/, which
    training prunes), or `<tag>_<file stem>` beside a checkpoint file."""
    if weights.name == WEIGHTS_FILE:
        home = weights.parent.parent
        return (home.parent if home.name == "checkpoints" else home) / f"{tag}_{weights.parent.name}"
    return weights.parent / f"{tag}_{weights.stem}"


def main(argv=None, args=None) -> dict:
    args = args or parse_args(make_arg_parser(), argv)
    args.device = args.device or default_device()
    source = resolve_model(args.checkpoint, args.model, args.model_kwargs)
    new_specs = [*args.transforms, f"ptq:w={args.w_bits},a={args.a_bits},qwt={args.qwt},repq_images={args.calib_images}"]
    images = max(args.calib_images, args.qwt_images) if args.qwt else args.calib_images
    calib = args.calib_data or default_calibration_source()
    tag = f"quantized_w{args.w_bits}a{args.a_bits}" + ("_qwt" if args.qwt else "")
    out = args.out or default_out(Path(source.weights), tag)

    start = time.perf_counter()
    model, encoder, preprocess, saved_as = build_model(source.name, source.weights, source.model_kwargs)
    model.to(args.device).eval()
    batches = calibration_batches(new_specs, calib, preprocess, images, args.batch_size, args.device,
                                  args.calib_split, args.seed)
    apply_transforms(encoder, new_specs, batches)
    config = {"model": saved_as, "model_kwargs": source.model_kwargs,
              "transforms": [*source.config.get("transforms", []), *new_specs],  # the saved ones came with the weights
              "quantization": quant_config(encoder), "source_checkpoint": str(source.weights),
              "calib_data": str(calib), "calib_images": min(args.calib_images, sum(len(b) for b in batches)),
              **({"qwt_images": sum(len(b) for b in batches)} if args.qwt else {})}
    out = save_checkpoint_dir(model, out, config)
    result = {**config, "out": str(out), "seconds": time.perf_counter() - start}
    eval_data = args.eval_data or (demo_eval_dir() if args.checkpoint is None else "none")
    if eval_data != "none" and saved_as == encoder_info(saved_as).clip_name:
        scores = run_zero_shot(model, open_clip.get_tokenizer(saved_as), eval_data, preprocess, device=args.device)
        result.update(eval_data=str(eval_data), zeroshot_top1=scores["top1"], zeroshot_top5=scores["top5"])
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_main(main, args=ARGS)
