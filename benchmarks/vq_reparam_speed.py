"""VQ-ViT token-wise reparametrization: parameters, MACs and forward time before vs after, side by side.

The seed's model (vqvit_small_patch16_224, FSQ levels [3, 3, 3, 3], timm's ImageNet layout with the
1000-class head) against the plain ViT-S/16 it starts from: the plain ViT, the VQ-ViT as trained
(quantizers + expand + the full layers) and the reparametrized VQ-ViT (table lookups), all on one
batch, eval mode, no gradients, timed round-robin (dtpclip.measure). Untrained weights: the
reparametrized forward equals the trained form's, so speed does not depend on training.

'GMACs' count everything fvcore sees (attention matmuls included; table lookups are free);
'seed GMACs' leaves out the two attention matmuls (q k^T and attn v) as the seed's validate.py does.
Ratios are the plain ViT's figure / the row's.

    OMP_NUM_THREADS=1 python benchmarks/vq_reparam_speed.py [--batch-size 8] [--threads 1]
"""

import timm
import torch

from dtpclip.cli import make_parser, run_benchmark
from dtpclip.encoders.vit import TIMM_IMAGENET_LAYOUT
from dtpclip.flops import count_macs
from dtpclip.measure import interleaved_median_times


def build(levels) -> dict:
    torch.manual_seed(0)
    plain = timm.create_model("plain_vit_small_patch16_224", **TIMM_IMAGENET_LAYOUT).eval()
    torch.manual_seed(0)
    vq = timm.create_model("vqvit_small_patch16_224", levels=levels, **TIMM_IMAGENET_LAYOUT).eval()
    torch.manual_seed(0)
    reparam = timm.create_model("vqvit_small_patch16_224", levels=levels, **TIMM_IMAGENET_LAYOUT).eval()
    reparam.load_state_dict(vq.state_dict())
    return {"ViT-S/16": plain, "VQ-ViT-S/16": vq, "VQ-ViT-S/16 reparam": reparam.reparameterize()}


def attention_matmul_macs(model) -> float:
    """q k^T and attn v per image: depth * N^2 * 2D (the seed's cal_qkvMatDot_FLOPs)."""
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    return len(model.blocks) * tokens ** 2 * 2 * model.embed_dim


def measure(args) -> dict:
    models = build(args.levels)
    images = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    results = {}
    with torch.no_grad():
        outputs = {name: model(images) for name, model in models.items()}
        for name, model in models.items():
            macs = count_macs(model, images[:1]).total
            results[name] = {"params": sum(p.numel() for p in model.parameters()), "gmacs": macs / 1e9,
                             "seed_gmacs": (macs - attention_matmul_macs(model)) / 1e9}
        times = interleaved_median_times({n: (lambda m=m: m(images)) for n, m in models.items()},
                                         torch.device("cpu"), repeats=args.repeats)
    for name, seconds in times.items():
        results[name]["forward_ms"] = seconds * 1e3
    results["max_abs_diff_reparam"] = float((outputs["VQ-ViT-S/16"] - outputs["VQ-ViT-S/16 reparam"]).abs().max())
    return results


def report(results: dict, args) -> None:
    base = results["ViT-S/16"]
    print(f"batch {args.batch_size}, cpu, {torch.get_num_threads()} thread(s), fp32, levels {args.levels}; "
          "x = ViT-S/16 / row")
    print(f"{'model':22s} {'params':>11s} {'paramx':>6s} {'GMACs':>6s} {'seedGMACs':>9s} {'MACx':>5s} "
          f"{'ms':>8s} {'timex':>6s}")
    for name in ("ViT-S/16", "VQ-ViT-S/16", "VQ-ViT-S/16 reparam"):
        r = results[name]
        print(f"{name:22s} {r['params']:11,d} {base['params'] / r['params']:6.2f} {r['gmacs']:6.3f} "
              f"{r['seed_gmacs']:9.3f} {base['gmacs'] / r['gmacs']:5.2f} {r['forward_ms']:8.1f} "
              f"{base['forward_ms'] / r['forward_ms']:6.2f}")
    vq, rep = results["VQ-ViT-S/16"], results["VQ-ViT-S/16 reparam"]
    print(f"reparam speedup over the trained form: {vq['forward_ms'] / rep['forward_ms']:.2f}x; "
          f"max |logit difference| {results['max_abs_diff_reparam']:.2e}")


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--levels", type=int, nargs="+", default=[3, 3, 3, 3], help="FSQ levels")
    parser.add_argument("--repeats", type=int, default=5)
    run_benchmark(parser, argv, measure, report)


if __name__ == "__main__":
    main()
