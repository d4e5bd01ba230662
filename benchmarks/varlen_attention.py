"""Attention of one DTP batch three ways: scores computed against the sum(n_i^2) the images need, and time.

The batch is DTP-ViT-B/16 4x's (batch 256 by default): a class token plus segment counts drawn
as a training batch samples them (1 + Binomial(L - 1, prior) per image). One attention call
(12 heads of 64), forward + backward, on q, k, v laid out as each path lays them out:

  varlen   the flat run, FlashAttention varlen (CUDA, fp16/bf16 only)
  buckets  the flat run, one dense SDPA per distinct length (varlen.py's path elsewhere)
  padded   [B, H, N_max, hd] with a [B, 1, 1, N_max] key mask (the reference path)

'packed' is the layout before varlen.py (NaViT rows of at most L + 1 tokens, block-diagonal mask);
its scores are counted (rows x capacity^2, with the partition's lower bound on capacity), not run.

    python benchmarks/varlen_attention.py [--device cuda --precision bf16] [--batch-size 256]
"""
import math

import torch
import torch.nn.functional as F

from dtpclip.cli import add_json_output, make_parser, measure_and_report, parse_args
from dtpclip.encoders.varlen import VarlenBatch
from dtpclip.measure import interleaved_median_times

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sampled_lengths(batch: int, patches: int, prior: float, generator: torch.Generator) -> torch.Tensor:
    boundaries = torch.rand(batch, patches - 1, generator=generator) < prior
    return boundaries.sum(1) + 2  # segments (the trailing one included) + the class token


def measure(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.precision]
    generator = torch.Generator().manual_seed(0)
    lengths = sampled_lengths(args.batch_size, args.patches, args.compression, generator)
    host = lengths.tolist()
    layout = VarlenBatch.plan(lengths.to(device), host, max(host))
    total, longest, full = sum(host), max(host), args.patches + 1
    rows = math.ceil(total / full)
    scores = {"needed": sum(n * n for n in host), "padded": args.batch_size * longest ** 2,
              "packed (before)": rows * math.ceil(total / rows) ** 2}
    def leaves(*shape):
        return [torch.randn(shape, generator=generator).to(device, dtype).requires_grad_() for _ in range(3)]

    q, k, v = leaves(1, args.heads, total, args.head_dim)
    padded = leaves(args.batch_size, args.heads, longest, args.head_dim)
    mask = (torch.arange(longest) < lengths[:, None]).to(device)[:, None, None, :]
    steps = {"buckets": lambda: layout._bucket_attention(q, k, v, 0.0, None).sum().backward(),
             "padded": lambda: F.scaled_dot_product_attention(*padded, attn_mask=mask).sum().backward()}
    if layout.uses_flash(q, 0.0):
        steps["varlen"] = lambda: layout.attention(q, k, v).sum().backward()
    times = interleaved_median_times(steps, device, warmup=2, repeats=args.repeats)
    return {"images": args.batch_size, "tokens": total, "distinct_lengths": len(layout.buckets), "scores": scores,
            "ms": {name: seconds * 1e3 for name, seconds in times.items()}}


def report(results: dict, args) -> None:
    scores, needed = results["scores"], results["scores"]["needed"]
    print(f"{results['images']} images, {results['tokens']} tokens, {results['distinct_lengths']} distinct lengths; "
          f"{args.device}, {args.precision}; attention scores per head")
    for name, count in scores.items():
        print(f"  {name:16s} {count / 1e6:7.2f} M  ({count / needed:.2f}x needed)")
    base = results["ms"]["padded"]
    for name, ms in results["ms"].items():
        print(f"  {name:16s} {ms:8.2f} ms fwd+bwd  ({base / ms:.2f}x padded's speed)")


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--patches", type=int, default=196, help="patches before pooling (B/16 at 224: 196)")
    parser.add_argument("--compression", type=float, default=0.25, help="the boundary prior")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=list(DTYPES))
    add_json_output(parser)
    measure_and_report(parse_args(parser, argv), measure, report)


if __name__ == "__main__":
    main()
