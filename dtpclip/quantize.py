"""python -m dtpclip.quantize: RepQ-style post-training quantization (+ QwT) of a checkpoint's encoder.

Calibrates on `--calib-images` (32, RepQ-ViT's count) images and writes a dtpclip checkpoint
directory (model.safetensors + config.json with the model name and its "quantization": method,
bits, qwt) that `python -m dtpclip.zeroshot`, `dtpclip.classify` and `dtpclip.profile` load as
they load any checkpoint (dtpclip.checkpoint.restore_quantization rebuilds the quantized modules).
A CLIP checkpoint is quantized in its visual tower (the text tower stays float); an encoder
without a CLIP (e.g. vit_6_4_32 from classify) is quantized on its own.

    python -m dtpclip.quantize                       # the latest demo CLIP at W4A4, demo train images
    python -m dtpclip.quantize --checkpoint RUN --w-bits 4 --a-bits 4 --qwt --calib-data DIR --out OUT
    python -m dtpclip.zeroshot --checkpoint OUT

Calibration data: an eval-set directory (CLIP_benchmark wds or ImageFolder) or a webdataset shard
spec (dtpclip.data: brace pattern, list file); see `calibration_images`.
"""
import itertools
import json
import time
from pathlib import Path
from typing import Callable, List

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset, IterableDataset

from dtpclip.cli import make_parser, parse_args, run_main
from dtpclip.evaluate import (CONFIG_FILE, WEIGHTS_FILE, demo_eval_dir, latest_demo_checkpoint,
                              model_name, registry_name, resolve_checkpoint)
from dtpclip.registry import encoder_info


def calibration_images(source, preprocess: Callable, count: int = 32, split: str = "test",
                       seed: int = 0) -> torch.Tensor:
    """`count` preprocessed images [count, 3, H, W]: a seeded random pick from an eval-set directory
    (among its first 8 x count images when it streams, as class-sorted wds sets do), or the first
    images of train shards (a dtpclip.data spec: brace pattern, list, a directory of .tar files
    without an eval set's classnames.txt)."""
    from dtpclip.data import iter_samples
    from dtpclip.evalsets import CLASSNAMES_FILE, load_eval_set

    if count < 1:
        raise ValueError(f"--calib-images must be at least 1, got {count}")
    generator = torch.Generator().manual_seed(seed)
    path = Path(str(source)).expanduser()
    if path.is_dir() and ((path / CLASSNAMES_FILE).is_file() or not any(path.glob("*.tar"))):
        dataset: Dataset = load_eval_set(path, preprocess, split).dataset
        if isinstance(dataset, IterableDataset):
            pool = [image for image, _ in itertools.islice(dataset, 8 * count)]
            images = [pool[int(i)] for i in torch.randperm(len(pool), generator=generator)[:count]]
        else:
            images = [dataset[int(i)][0] for i in torch.randperm(len(dataset), generator=generator)[:count]]
    else:
        images = [preprocess(s.image.convert("RGB")) for s in itertools.islice(iter_samples(str(source)), count)]
    if not images:
        raise ValueError(f"--calib-data {str(source)!r} has no images (expected an eval-set directory or shards)")
    return torch.stack(images)


def build_model(name: str, weights):
    """(model to save, its registry encoder, eval preprocess, name to save under): a CLIP when `name`
    has one, else the bare encoder."""
    from dtpclip.classify import transforms_for
    from dtpclip.clip import create_clip_and_transforms
    from dtpclip.registry import create_encoder

    info = encoder_info(registry_name(name))
    if info.clip_name:
        model, _, preprocess = create_clip_and_transforms(info.clip_name, pretrained=str(weights))
        return model, model.visual.trunk, preprocess, info.clip_name
    encoder = create_encoder(info.name, checkpoint=weights)
    return encoder, encoder, transforms_for(encoder)[1], info.name


def save_checkpoint_dir(model: torch.nn.Module, out_dir, config: dict) -> Path:
    """model.safetensors + config.json in `out_dir`: a dtpclip checkpoint directory every CLI loads."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return out


def default_out(weights: Path, tag: str) -> Path:
    """Beside the source: `<tag>_<checkpoint dir>` in its run directory (outside the step_* directories
    that training prunes), or `<tag>_<file stem>` beside a checkpoint file."""
    if weights.name == WEIGHTS_FILE:
        return weights.parent.parent / f"{tag}_{weights.parent.name}"
    return weights.parent / f"{tag}_{weights.stem}"


def make_arg_parser():
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="our open_clip or registry name; None: the checkpoint's config.json")
    parser.add_argument("--checkpoint", default=None, help="CLIP / encoder checkpoint file, checkpoint directory "
                        "or run directory; None: the latest demo checkpoint")
    parser.add_argument("--w-bits", type=int, default=4, help="weight bits (per output channel)")
    parser.add_argument("--a-bits", type=int, default=4,
                        help="activation bits (log-sqrt(2) for attention probabilities)")
    parser.add_argument("--qwt", action="store_true", help="add QwT linear compensation per block")
    parser.add_argument("--calib-data", default=None,
                        help="eval-set directory or train shard spec; None: the demo's train shards")
    parser.add_argument("--calib-split", default="test", help="split folder of an eval-set --calib-data")
    parser.add_argument("--calib-images", type=int, default=32, help="calibration images")
    parser.add_argument("--batch-size", type=int, default=16, help="calibration images per forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--seed", type=int, default=0, help="which calibration images are picked")
    parser.add_argument("--out", default=None,
                        help="output checkpoint directory; None: quantized_w<W>a<A>[_qwt]_<source> (default_out)")
    return parser


def main(argv=None) -> dict:
    from dtpclip.encoders.ptq import apply_ptq
    from dtpclip.encoders.quant import quant_config

    args = parse_args(make_arg_parser(), argv)
    weights, saved_name = resolve_checkpoint(args.checkpoint) if args.checkpoint else latest_demo_checkpoint()
    name = model_name(args.model, saved_name, args.checkpoint or weights)
    calib = args.calib_data or demo_eval_dir().parent / "train"  # the demo's train shards
    tag = f"quantized_w{args.w_bits}a{args.a_bits}" + ("_qwt" if args.qwt else "")
    out = args.out or default_out(Path(weights), tag)

    start = time.perf_counter()
    model, encoder, preprocess, saved_as = build_model(name, weights)
    model.to(args.device).eval()
    images = calibration_images(calib, preprocess, args.calib_images, args.calib_split, args.seed)
    batches: List[torch.Tensor] = [b.to(args.device) for b in images.split(args.batch_size)]
    apply_ptq(encoder, args.w_bits, args.a_bits, batches, qwt=args.qwt)
    config = {"model": saved_as, "quantization": quant_config(encoder), "source_checkpoint": str(weights),
              "calib_data": str(calib), "calib_images": len(images)}
    out = save_checkpoint_dir(model, out, config)
    result = {**config, "out": str(out), "seconds": time.perf_counter() - start}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_main(main)
