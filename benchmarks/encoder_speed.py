"""ViT-B/32 against DTP-ViT-B/32 at 2x/4x/10x: MACs, step time and peak memory, side by side.

Every variant runs on the same batch in one process; ratios are baseline / variant, so a 3x
FLOP ratio with a 3x step-time ratio means the MACs saved became time saved ('realised' = 1).
Train = forward + backward (train mode: DTP samples its boundaries, at about its prior rate);
infer = eval-mode forward without gradients. The models are untrained, so DTP also samples its
boundaries in eval mode (`eval_sampling`): a trained predictor pools at about its prior, an
untrained one thresholded at 0.5 would keep almost nothing.

    python benchmarks/encoder_speed.py [--batch-size 32] [--device cuda --precision bf16 --batch-size 256]
"""
import json

import torch

from dtpclip.cli import make_parser, parse_args
from dtpclip.profile import build_visual_tower, profile_tower

VARIANTS = ["plain_vit_base_patch32_224", "dtp_vit_base_patch32_224_2x",
            "dtp_vit_base_patch32_224_4x", "dtp_vit_base_patch32_224_10x"]


def ratio(base, value):
    return float("nan") if not base or not value else base / value


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help="baseline first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the raw figures to this file")
    args = parse_args(parser, argv)

    results = {}
    for name in args.variants:
        torch.manual_seed(0)
        tower = build_visual_tower(name, **({"eval_sampling": True} if name.startswith("dtp") else {}))
        results[name] = profile_tower(tower, args.batch_size, train=True, device=args.device,
                                      precision=args.precision, warmup=1, repeats=args.repeats)
        del tower

    base = results[args.variants[0]]
    header = (f"{'model':32s} {'mode':5s} {'GMACs':>6s} {'FLOPx':>6s} {'ms':>8s} {'timex':>6s} "
              f"{'realised':>8s} {'peakMB':>8s} {'memx':>6s} {'bnd':>5s}")
    print(f"batch {args.batch_size}, {args.device}, {args.precision}; x = baseline / variant")
    print(header)
    for name, r in results.items():
        for mode, macs, ms, mem, stats in (
            ("train", "train_gmacs", "train_step_ms", "train_peak_mb", "train_stats"),
            ("infer", "gmacs", "forward_ms", "forward_peak_mb", "stats"),
        ):
            flop_x, time_x = ratio(base[macs], r[macs]), ratio(base[ms], r[ms])
            print(f"{name:32s} {mode:5s} {r[macs]:6.3f} {flop_x:6.2f} {r[ms]:8.1f} {time_x:6.2f} "
                  f"{time_x / flop_x:8.2f} {r[mem] or float('nan'):8.1f} {ratio(base[mem], r[mem]):6.2f} "
                  f"{r[stats].get('boundary_ratio', 1.0):5.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
