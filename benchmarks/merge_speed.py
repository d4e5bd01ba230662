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

from dtpclip.cli import make_parser, parse_args
from dtpclip.encoders.merge import apply_lgtm, apply_tome, merged_token_counts, remove_tome
from dtpclip.flops import count_macs
from dtpclip.measure import synchronize
from dtpclip.factory import create_encoder

SWEEPS = {
    "plain_vit_base_patch16_224": [4, 8, 13, 16],
    "plain_vit_base_patch32_224": [2, 3, 4],
}


def _autocast(device: torch.device, precision: str):
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


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
        with torch.no_grad(), _autocast(device, precision):
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


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SWEEPS), help="registry ViTs (sweeps: B/16, B/32)")
    parser.add_argument("--r", nargs="+", type=int, default=None, help="r values > 0 (default: each model's sweep)")
    parser.add_argument("--lgtm", action="store_true", help="also DFE + LGTM rows (2 dense, 2 local layers)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 keeps ratios stable on a shared CPU (0: torch's default)")
    args = parse_args(parser, argv)
    device = torch.device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)

    print(f"batch {args.batch_size}, {device.type}, {args.precision}, {torch.get_num_threads()} threads; "
          f"FLOPx = base MACs / MACs, speedx = images/s / base images/s, realised = speedx / FLOPx")
    print(f"{'model':28s} {'method':10s} {'tokens':>6s} {'GMACs':>7s} {'FLOPx':>6s} {'img/s':>8s} "
          f"{'speedx':>6s} {'realised':>8s}")
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
            speed = args.batch_size / statistics.median(t_merged)
            print(f"{name:28s} {method + f' r={r}':10s} {tokens:6d} {macs / 1e9:7.3f} {flop_x:6.2f} {speed:8.2f} "
                  f"{speed_x:6.2f} {speed_x / flop_x:8.2f}", flush=True)
        remove_tome(model)
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        speed = args.batch_size / statistics.median(base_times) if base_times else float("nan")
        print(f"{name:28s} {'baseline':10s} {tokens:6d} {base_macs / 1e9:7.3f} {1:6.2f} {speed:8.2f} "
              f"{1:6.2f} {1:8.2f}   (all baseline steps)", flush=True)
        del model


if __name__ == "__main__":
    main()
