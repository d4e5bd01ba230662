"""python -m dtpclip.profile: parameters, MACs, peak memory, step time and throughput of an encoder.

What is measured is the visual half of our CLIPs: the registry encoder plus the CLIP projection
to the joint embedding (`--embed-dim 0` for the bare encoder). MACs are counted per image on a
real forward (for DTP: with its actual boundaries, whose ratio is reported beside them).
"""
from dtpclip.cli import add_model_kwargs, add_transform, early_args, make_parser, parse_args, run_main

DEFAULT_MODEL = "dtp_vit_base_patch32_224_10x"


def make_arg_parser():
    parser = make_parser(__doc__.splitlines()[0], "python -m dtpclip.profile")
    parser.add_argument("--model", default=None, help=f"registry or open_clip encoder name (None: {DEFAULT_MODEL}; "
                        "with --pareto: the checkpoint's open_clip name)")
    parser.add_argument("--checkpoint", default=None, help="CLIP or encoder weights on disk (with --pareto: the "
                        "CLIP the --sweep transforms patch: file, checkpoint dir or run dir)")
    add_model_kwargs(parser)
    add_transform(parser)
    parser.add_argument("--sweep", nargs="+", default=None, metavar="SPEC",
                        help="transform specs, each applied alone on top of --transform and profiled (with --pareto: "
                             "evaluated), e.g. tome:r=2 tome:r=4 lgtm:r=4")
    parser.add_argument("--image-size", type=int, default=None, help="input size (None: the model's)")
    parser.add_argument("--layout", default="clip", choices=("clip", "timm"),
                        help="clip: our CLIP towers' layout; timm: timm's ImageNet ViT (no pre-norm, LayerNorm eps "
                             "1e-6, a 1000-class head), as timm's and the VQ-ViT seed's figures count it")
    parser.add_argument("--batch-size", type=int, default=8, help="images per timed step")
    parser.add_argument("--embed-dim", type=int, default=None,
                        help="CLIP projection width (None: the size's CLIP; 0 for the bare encoder)")
    parser.add_argument("--train", action="store_true", help="also time forward+backward and its memory")
    parser.add_argument("--device", default=None, help="torch device (None: cuda when available, else cpu)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="autocast dtype of the timed steps (MACs do not depend on it)")
    parser.add_argument("--flops-images", type=int, default=4, help="images the MACs are averaged over")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--calib-data", default=None, help="calibration images of a transform that calibrates "
                        "(eval-set directory or shards); None: the demo's train shards")
    parser.add_argument("--pareto", default=None, metavar="DIR",
                        help="write pareto.json + pareto.png to DIR: zero-shot top-1 vs GMACs of the --sweep on "
                        "--checkpoint, and of the --points checkpoints")
    parser.add_argument("--points", nargs="*", default=[],
                        help="with --pareto: more trained CLIP checkpoints (e.g. DTP-ViT runs), one point each")
    parser.add_argument("--eval-data", default=None, help="with --pareto: eval set (None: the demo eval set)")
    return parser


# `python -m`: the arguments are parsed here, before the heavy imports below (fast --help)
ARGS = early_args(make_arg_parser, __name__)

import json  # noqa: E402  (after the early parse, as every import below)
from pathlib import Path
from typing import List, Optional

import open_clip

import torch
import torch.nn as nn

from dtpclip.calibration import calibration_batches
from dtpclip.clip import clip_embed_dim, create_clip_and_transforms
from dtpclip.evalsets import load_eval_set
from dtpclip.evaluate import clip_name, demo_eval_dir, registry_name, resolve_model
from dtpclip.clip import encoder_transforms
from dtpclip.encoders.vit import LAYOUTS
from dtpclip.factory import apply_transforms, create_encoder
from dtpclip.flops import count_macs
from dtpclip.measure import autocast, default_device, median_time, peak_memory_bytes
from dtpclip.pareto import TRAINED, accuracy_point, transform_sweep, write_pareto
from dtpclip.registry import encoder_info, parse_transform


class VisualTower(nn.Module):
    """A registry encoder followed by the CLIP projection, as open_clip's timm-tower head applies it."""

    def __init__(self, encoder: nn.Module, embed_dim: int):
        super().__init__()
        self.encoder = encoder
        self.proj = nn.Linear(encoder.num_features, embed_dim, bias=False) if embed_dim else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.encoder(images))

    def train_loss(self, images: torch.Tensor) -> torch.Tensor:
        """A stand-in objective with the encoder's aux loss, so backward covers what training does."""
        out = self.encoder.encode(images)
        return self.proj(out.pooled).float().square().mean() + out.aux_loss


def build_visual_tower(name: str, checkpoint: Optional[str] = None, embed_dim: Optional[int] = None,
                       **encoder_kwargs) -> VisualTower:
    """`embed_dim` None: the CLIP embedding width of the encoder's size."""
    encoder = create_encoder(name, checkpoint=checkpoint, **encoder_kwargs)
    if embed_dim is None:  # encoders without a CLIP (e.g. ViT-Lite) are profiled bare
        size = encoder_info(name).size
        embed_dim = clip_embed_dim(size) if size.text_tower is not None else 0
    return VisualTower(encoder, embed_dim)


def _floats(stats: dict) -> dict:
    return {k: round(float(v), 4) for k, v in stats.items()}


class TowerSteps:
    """A tower on a fixed batch: the forward and train steps that get timed, and their MACs."""

    def __init__(self, tower: VisualTower, batch_size: int, device: str = "cpu", precision: str = "fp32",
                 seed: int = 0):
        self.device = torch.device(device)
        self.tower = tower.to(self.device)
        self.seed = seed
        size = tower.encoder.patch_embed.img_size
        self.images = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(seed)).to(self.device)
        self.autocast = autocast(self.device, precision)

    def forward(self) -> torch.Tensor:
        """Inference: eval mode, no gradients."""
        self.tower.eval()
        with torch.no_grad(), self.autocast:
            return self.tower(self.images)

    def train_step(self) -> None:
        """Forward + backward in train mode (no optimizer: its cost does not depend on the tokens)."""
        self.tower.train()
        self.tower.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.tower.train_loss(self.images)
        loss.backward()

    def macs(self, train: bool, images: int = 4) -> dict:
        """MACs per image (G) and the encoder's stats, in train or eval mode, on the first `images`."""
        self.tower.train(train)
        prefix = "train_" if train else ""
        torch.manual_seed(self.seed)
        count = count_macs(self.tower, self.images[:images])
        torch.manual_seed(self.seed)
        with torch.no_grad(), self.autocast:
            stats = self.tower.encoder.encode(self.images[:images]).stats
        return {f"{prefix}gmacs": count.total / 1e9, f"{prefix}gmacs_attention_free": count.attention_free / 1e9,
                f"{prefix}gmacs_without_attention_matmuls": count.without_attention_matmuls / 1e9,
                f"{prefix}stats": _floats(stats)}


def profile_tower(tower: VisualTower, batch_size: int = 8, train: bool = False, device: str = "cpu",
                  precision: str = "fp32", flops_images: int = 4, warmup: int = 2, repeats: int = 5,
                  seed: int = 0) -> dict:
    """Every figure the profiler prints, as a dict (times in ms, memory in MB, MACs in G)."""
    steps = TowerSteps(tower, batch_size, device, precision, seed)
    result = {
        "device": steps.device.type, "precision": precision, "batch_size": batch_size,
        "image_size": list(steps.images.shape[-2:]),
        "params_m": sum(p.numel() for p in tower.parameters()) / 1e6,
        "encoder_params_m": sum(p.numel() for p in tower.encoder.parameters()) / 1e6,
        **steps.macs(train=False, images=flops_images),
    }
    result["forward_ms"] = median_time(steps.forward, steps.device, warmup, repeats) * 1e3
    result["forward_images_per_s"] = batch_size / result["forward_ms"] * 1e3
    result["forward_peak_mb"] = _mb(peak_memory_bytes(steps.forward, steps.device))
    if train:
        result.update(steps.macs(train=True, images=flops_images))
        result["train_step_ms"] = median_time(steps.train_step, steps.device, warmup, repeats) * 1e3
        result["train_images_per_s"] = batch_size / result["train_step_ms"] * 1e3
        tower.zero_grad(set_to_none=True)
        result["train_peak_mb"] = _mb(peak_memory_bytes(steps.train_step, steps.device))
    return result


def _mb(n: Optional[int]) -> Optional[float]:
    return None if n is None else n / 2**20


def format_profile(name: str, result: dict) -> str:
    lines = [name]
    for key, value in result.items():
        if key == "model":
            continue
        if isinstance(value, float):
            value = f"{value:.5g}"
        lines.append(f"  {key:28s} {value}")
    return "\n".join(lines)


def run_label(checkpoint) -> str:
    """A checkpoint's run, to tell two points of one model apart: the run directory's name."""
    path = Path(checkpoint)
    run = path if (path / "latest").exists() else path.parent if path.is_file() else path
    return run.parent.parent.name if run.parent.name == "checkpoints" else run.name


def pareto_main(args) -> List[dict]:
    """The --pareto job: load each CLIP, sweep the transforms on the first, write json + png."""
    if args.checkpoint is None:
        raise ValueError("--pareto needs --checkpoint: the CLIP (e.g. a plain ViT) the --sweep transforms patch")
    data = args.eval_data or demo_eval_dir()
    checkpoints = [args.checkpoint, *args.points]
    sources = [resolve_model(c, args.model if i == 0 else None, args.model_kwargs if i == 0 else None)
               for i, c in enumerate(checkpoints)]
    for spec in args.sweep or []:
        parse_transform(spec)
    names = [clip_name(source.name) for source in sources]  # every name and spec checked before any compute
    eval_sets, points = {}, []
    for i, (checkpoint, source, name) in enumerate(zip(checkpoints, sources, names)):
        clip, _, preprocess = create_clip_and_transforms(source.name, str(source.weights), source.model_kwargs,
                                                         device=args.device)
        tokenizer = open_clip.get_tokenizer(name)
        eval_set = eval_sets.setdefault(name, load_eval_set(data, preprocess))
        label = name + ("" if names.count(name) == 1 else f" ({run_label(checkpoint)})")
        new = [accuracy_point(clip, tokenizer, eval_set, label, TRAINED, device=args.device)]
        if i == 0 and args.sweep:
            calibration = calibration_batches(args.sweep, args.calib_data, preprocess, device=args.device)
            new += transform_sweep(clip, tokenizer, eval_set, args.sweep, name, calibration, args.device)
        for p in new:
            print(f"{p['label']:40s} {p['gmacs']:.4f} GMACs  top-1 {100 * p['top1']:.1f}%")
        points += new
    paths = write_pareto(points, args.pareto, f"Zero-shot top-1 against compute on {Path(data).name}")
    print(f"wrote {paths['json']} and {paths['png']}")
    return points


def main(argv=None, args=None):
    args = args or parse_args(make_arg_parser(), argv)
    args.device = args.device or default_device()
    if args.pareto:
        return pareto_main(args)
    name, kwargs = args.model or DEFAULT_MODEL, args.model_kwargs
    if args.checkpoint:  # its config names the model and its kwargs
        source = resolve_model(args.checkpoint, args.model, args.model_kwargs)
        name, kwargs = registry_name(source.name), source.model_kwargs
    kwargs = {**LAYOUTS[args.layout], **kwargs, **({"img_size": args.image_size} if args.image_size else {})}
    results = []
    for spec in args.sweep or [None]:
        tower = build_visual_tower(name, args.checkpoint, args.embed_dim, **kwargs)
        specs = args.transforms + ([spec] if spec else [])
        calibration = calibration_batches(specs, args.calib_data, encoder_transforms(tower.encoder)[1])
        apply_transforms(tower.encoder, specs, calibration)
        label = " ".join([name, *specs])
        result = {"model": label, **profile_tower(
            tower, args.batch_size, args.train, args.device, args.precision, args.flops_images, repeats=args.repeats)}
        print(json.dumps(result, indent=2) if args.json else format_profile(label, result))
        results.append(result)
    return results[0] if len(results) == 1 else results


if __name__ == "__main__":
    run_main(main, args=ARGS)
