"""ToMe (and DFE + LGTM) r sweeps on ViT-B/16 and ViT-B/32: FLOP ratio beside throughput ratio.

One process, one set of weights per model: the baseline is the unpatched ViT, each row patches
the same model with `apply_tome` (or `apply_lgtm`) at that r. Eval-mode forward without
gradients; each row's speed-up is the median baseline step over the median patched step, timed
alternately (baseline, patched, baseline, ...) so load from other jobs hits both sides. MACs are
counted by fvcore on one image (attention and ToMe's similarity matmul included, see
dtpclip/flops.py). Ratios are variant / baseline for throughput and
baseline / variant for MACs, so 'realised' = throughput ratio / FLOP ratio is 1 when every MAC
saved became time saved. ToMe reports 1.65x throughput for ViT-B/16 at r = 13 (V100, fp16).

    python benchmarks/merge_speed.py [--batch-size 16] [--lgtm] [--device cuda --precision fp16 --batch-size 256]

On CPU it runs one thread by default: with other jobs on the cores, multi-threaded kernels
stall at every barrier and the elementwise merge ops look far slower than they are.
"""
import statistics
import time
from functools import partial

import torch

from dtpclip.cli import make_parser, run_benchmark
from dtpclip.encoders.merge import apply_lgtm, apply_tome, merged_token_counts, remove_tome
from dtpclip.flops import count_macs
from dtpclip.measure import autocast, synchronize
from dtpclip.factory import create_encoder

SWEEPS = {
    "plain_vit_base_patch16_224": [4, 8, 13, 16],
    "plain_vit_base_patch32_224": [2, 3, 4],
}


def _seconds(step, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def measure_interleaved(model, patch, images, device, precision, repeats):
    """(base step times, patched step times), alternating unpatched and patched steps on one model.

    Alternating keeps a shared, drifting machine from favouring either side; patching is a class
    swap, so it costs nothing.
    """
    def forward():
        with torch.no_grad(), autocast(device, precision):
            return model(images)

    base, merged = [], []
    for i in range(repeats + 1):  # the first pair warms up
        remove_tome(model)
        t_base = _seconds(forward, device)
        patch(model)
        t_merged = _seconds(forward, device)
        if i:
            base.append(t_base)
            merged.append(t_merged)
    return base, merged


def measure(args) -> list:
    """One row per (model, method, r) and a baseline row per model: tokens, GMACs, images/s and the ratios."""
    device = torch.device(args.device)
    results = []
    for name in args.models:
        torch.manual_seed(0)
        model = create_encoder(name).to(device).eval()
        size = model.patch_embed.img_size
        images = torch.randn(args.batch_size, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
        rows = [("tome", r) for r in (args.r or SWEEPS.get(name, [4, 8])) if r > 0]
        rows += [("lgtm", r) for _, r in rows] if args.lgtm else []
        remove_tome(model)
        base_macs = count_macs(model, images[:1]).total
        base_times = []
        for method, r in rows:
            patch = partial(apply_tome, r=r) if method == "tome" else partial(apply_lgtm, r=r)
            patch(model)
            macs, tokens = count_macs(model, images[:1]).total, merged_token_counts(model)[-1]
            t_base, t_merged = measure_interleaved(model, patch, images, device, args.precision, args.repeats)
            base_times += t_base
            flop_x = base_macs / macs
            speed_x = statistics.median(t_base) / statistics.median(t_merged)
            results.append({"model": name, "method": f"{method} r={r}", "tokens": tokens, "gmacs": macs / 1e9,
                            "flop_x": flop_x, "images_per_s": args.batch_size / statistics.median(t_merged),
                            "speed_x": speed_x, "realised": speed_x / flop_x})
        remove_tome(model)
        speed = args.batch_size / statistics.median(base_times) if base_times else float("nan")
        results.append({"model": name, "method": "baseline", "tokens": model.patch_embed.num_patches
                        + model.num_prefix_tokens, "gmacs": base_macs / 1e9, "flop_x": 1.0, "images_per_s": speed,
                        "speed_x": 1.0, "realised": 1.0})
        del model
    return results


def report(results: list, args) -> None:
    print(f"batch {args.batch_size}, {args.device}, {args.precision}, {torch.get_num_threads()} threads; "
          f"FLOPx = base MACs / MACs, speedx = images/s / base images/s, realised = speedx / FLOPx "
          f"(baseline images/s: all baseline steps)")
    print(f"{'model':28s} {'method':10s} {'tokens':>6s} {'GMACs':>7s} {'FLOPx':>6s} {'img/s':>8s} "
          f"{'speedx':>6s} {'realised':>8s}")
    for r in results:
        print(f"{r['model']:28s} {r['method']:10s} {r['tokens']:6d} {r['gmacs']:7.3f} {r['flop_x']:6.2f} "
              f"{r['images_per_s']:8.2f} {r['speed_x']:6.2f} {r['realised']:8.2f}")


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SWEEPS), help="registry ViTs (sweeps: B/16, B/32)")
    parser.add_argument("--r", nargs="+", type=int, default=None, help="r values > 0 (default: each model's sweep)")
    parser.add_argument("--lgtm", action="store_true", help="also DFE + LGTM rows (2 dense, 2 local layers)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=3)
    run_benchmark(parser, argv, measure, report)


if __name__ == "__main__":
    main()
