"""ViT-B/32 against DTP-ViT-B/32 at 2x/4x/10x: MACs, step time and peak memory, side by side.

Every variant runs on the same batch in one process, timed round-robin (each repetition runs
every variant once), so load from elsewhere on the machine hits all of them alike. Ratios are
baseline / variant: a 3x FLOP ratio with a 3x step-time ratio means the MACs saved became time
saved ('realised' = time ratio / FLOP ratio = 1).

Train = forward + backward (train mode: DTP samples its boundaries, at about its prior rate);
infer = eval-mode forward without gradients; DTP's default eval rule keeps each image's expected
boundary count, so the untrained models pool at their prior as a trained one does. Peak memory is what a step needs
above the weights (activations, and in training the gradients: 'act' subtracts those).

    python benchmarks/encoder_speed.py [--batch-size 32] [--device cuda --precision bf16 --batch-size 256]
"""

import torch

from dtpclip.cli import add_json_output, make_parser, measure_and_report, parse_args
from dtpclip.measure import interleaved_median_times, peak_memory_bytes
from dtpclip.profile import TowerSteps, build_visual_tower

VARIANTS = ["plain_vit_base_patch32_224", "dtp_vit_base_patch32_224_2x",
            "dtp_vit_base_patch32_224_4x", "dtp_vit_base_patch32_224_10x"]


def ratio(base, value):
    return float("nan") if not base or not value else base / value


def measure(args) -> dict:
    steps, results = {}, {}
    for name in args.variants:
        torch.manual_seed(0)
        tower = build_visual_tower(name)
        steps[name] = TowerSteps(tower, args.batch_size, args.device, args.precision)
        grads_mb = sum(p.numel() * p.element_size() for p in tower.parameters()) / 2**20
        results[name] = {**steps[name].macs(train=True), **steps[name].macs(train=False), "grads_mb": grads_mb}
    for mode in ("train_step", "forward"):
        for name in steps:
            peak = peak_memory_bytes(getattr(steps[name], mode), steps[name].device)
            results[name][f"{mode}_peak_mb"] = peak / 2**20 if peak is not None else None
        times = interleaved_median_times({n: getattr(s, mode) for n, s in steps.items()},
                                         steps[args.variants[0]].device, repeats=args.repeats)
        for name, seconds in times.items():
            results[name][f"{mode}_ms"] = seconds * 1e3
    return results


def report(results: dict, args) -> None:
    base = results[args.variants[0]]
    print(f"batch {args.batch_size}, {args.device}, {args.precision}; x = baseline / variant")
    print(f"{'model':30s} {'mode':5s} {'GMACs':>6s} {'FLOPx':>6s} {'ms':>8s} {'timex':>6s} {'realised':>8s} "
          f"{'peakMB':>8s} {'memx':>6s} {'actMB':>7s} {'actx':>6s} {'bnd':>5s}")
    for name, r in results.items():
        for mode, macs, step, stats in (("train", "train_gmacs", "train_step", "train_stats"),
                                        ("infer", "gmacs", "forward", "stats")):
            flop_x, time_x = ratio(base[macs], r[macs]), ratio(base[f"{step}_ms"], r[f"{step}_ms"])
            peak, base_peak = r[f"{step}_peak_mb"], base[f"{step}_peak_mb"]
            act = peak - r["grads_mb"] if mode == "train" and peak else peak
            base_act = base_peak - base["grads_mb"] if mode == "train" and base_peak else base_peak
            print(f"{name:30s} {mode:5s} {r[macs]:6.3f} {flop_x:6.2f} {r[f'{step}_ms']:8.1f} {time_x:6.2f} "
                  f"{time_x / flop_x:8.2f} {peak or float('nan'):8.1f} {ratio(base_peak, peak):6.2f} "
                  f"{act or float('nan'):7.1f} {ratio(base_act, act):6.2f} {r[stats].get('boundary_ratio', 1.0):5.2f}")


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help="baseline first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=5)
    add_json_output(parser)
    args = parse_args(parser, argv)
    measure_and_report(args, measure, report)


if __name__ == "__main__":
    main()
