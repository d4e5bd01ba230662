"""CLIP train step end to end, data loader included: ViT vs DTP CLIPs on the same shards.

One step = the next batch from dtpclip's train loader (webdataset shards of 256 px JPEGs decoded
and transformed by open_clip's train transform in worker processes), the contrastive loss plus
the encoder's aux loss through `ContrastiveModel`, backward, fused AdamW. What the launcher runs,
minus accelerate, logging and checkpoints. Models run one after the other on the same shards
(their loaders cannot be interleaved), after `--warmup` untimed steps each; samples/s over the
timed steps, and the ratio to the first model.

    python benchmarks/clip_step.py [--models ViT-B-32 DTP-ViT-B-32-10x]
                                   [--device cuda --precision bf16 --batch-size 256]
"""
import tempfile
import time
from itertools import islice
from pathlib import Path

import open_clip
import torch

from data_throughput import laion_like_shards
from dtpclip.cli import add_json_output, make_parser, measure_and_report, parse_args
from dtpclip.clip import create_clip_and_transforms
from dtpclip.data import make_train_loader
from dtpclip.measure import autocast, synchronize
from dtpclip.training import ContrastiveModel, param_groups

MODELS = ["ViT-B-32", "DTP-ViT-B-32-10x"]


def samples_per_second(name: str, shards: str, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    clip, preprocess, _ = create_clip_and_transforms(name)
    model = ContrastiveModel(clip).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)
    loss_fn = open_clip.ClipLoss()
    loader = make_train_loader(shards, preprocess, open_clip.get_tokenizer(name), args.batch_size,
                               num_workers=args.workers, resampled=True,
                               samples_per_epoch=args.batch_size * (args.warmup + args.steps + 1))
    batches = iter(loader)

    def step(images, texts):
        with autocast(device, args.precision):
            image_features, text_features, scale, aux_loss, _, _ = model(images.to(device), texts.to(device))
            loss = loss_fn(image_features, text_features, scale) + aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for images, texts in islice(batches, args.warmup):
        step(images, texts)
    synchronize(device)
    start = time.perf_counter()
    for images, texts in islice(batches, args.steps):
        step(images, texts)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"samples_per_s": args.steps * args.batch_size / seconds, "step_s": seconds / args.steps}


def measure(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        shards = laion_like_shards(Path(tmp), 4, args.batch_size * (args.warmup + args.steps + 1) // 4 + 1)
        return {name: samples_per_second(name, shards, args) for name in args.models}


def report(results: dict, args) -> None:
    base = results[args.models[0]]
    print(f"batch {args.batch_size}, {args.device}, {args.precision}, {args.workers} loader workers, "
          f"{args.steps} timed steps after {args.warmup}")
    print(f"{'model':24s} {'samples/s':>10s} {'step s':>8s} {'speedup':>7s}")
    for name, r in results.items():
        print(f"{name:24s} {r['samples_per_s']:10.1f} {r['step_s']:8.3f} "
              f"{r['samples_per_s'] / base['samples_per_s']:6.2f}x")


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="open_clip / dtpclip CLIP names, baseline first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model (loader start, kernels)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    add_json_output(parser)
    measure_and_report(parse_args(parser, argv), measure, report)


if __name__ == "__main__":
    main()
