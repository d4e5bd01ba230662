"""W8A8 on integer kernels against fp32 and fake quantization: ViT-B/32 tower inference, side by side.

One process, one set of weights: the fp32 encoder, its RepQ W8A8 PTQ (fake quantization, calibrated on
`--calib-images` seeded random images), and that PTQ lowered to int8 kernels (`lower_to_int8`: oneDNN on
CPU, torchao on CUDA). Eval-mode forwards without gradients, timed round-robin. Also timed: one fc1 GEMM
of the tower's shape (tokens of the batch x 768 -> 3072), fp32 nn.Linear against the int8 kernel alone, which
bounds what the whole tower can gain (attention, norms and the patch embedding stay float or fake).
The relative errors of the pooled outputs put the kernels' own error (int8 vs fake) beside W8A8's (fake vs fp32).

    python benchmarks/int8_speed.py [--model plain_vit_base_patch32_224] [--batch-size 32] [--threads 1]
"""
import copy

import torch

from dtpclip.cli import make_parser, run_benchmark
from dtpclip.encoders.int8 import Int8Linear, lower_to_int8, resolve_backend
from dtpclip.encoders.ptq import apply_ptq
from dtpclip.factory import create_encoder
from dtpclip.measure import interleaved_median_times


def _gemm_times(model, images, device, repeats) -> dict:
    """fp32 vs int8 time of the first block's fc1 on the batch's tokens (its real calibrated parameters)."""
    fc1 = model.blocks[0].mlp.fc1
    float_fc1 = torch.nn.Linear(fc1.in_features, fc1.out_features).to(device).eval()
    float_fc1.load_state_dict({"weight": fc1.weight_quant(fc1.weight), "bias": fc1.bias})
    tokens = torch.randn(images.shape[0] * (model.patch_embed.num_patches + model.num_prefix_tokens),
                         fc1.in_features, device=device)
    int8_fc1 = Int8Linear(fc1, resolve_backend("auto", device))
    with torch.no_grad():
        return interleaved_median_times({"fp32": lambda: float_fc1(tokens), "int8": lambda: int8_fc1(tokens)},
                                        device, repeats=repeats)


def measure(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    floating = create_encoder(args.model).to(device).eval()
    size = floating.patch_embed.img_size
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randn(args.calib_images, 3, *size, generator=generator).to(device)]
    images = torch.randn(args.batch_size, 3, *size, generator=generator).to(device)
    fake = apply_ptq(copy.deepcopy(floating), 8, 8, calibration)
    int8 = lower_to_int8(copy.deepcopy(fake))
    with torch.no_grad():
        reference = fake.encode(images).pooled
        agreement = float((int8.encode(images).pooled - reference).norm() / reference.norm())
        fake_error = float((reference - floating.encode(images).pooled).norm() / reference.norm())
        times = interleaved_median_times({name: (lambda m=m: m(images)) for name, m in
                                          (("fp32", floating), ("fake W8A8", fake), ("int8 W8A8", int8))},
                                         device, repeats=args.repeats)
    return {"model": args.model, "batch_size": args.batch_size, "device": args.device,
            "threads": torch.get_num_threads(), "kernel": int8.blocks[0].mlp.fc1.backend, "seconds": times,
            "fc1_seconds": _gemm_times(fake, images, device, args.repeats), "agreement": agreement,
            "fake_error": fake_error}


def report(result: dict, args) -> None:
    times, gemm = result["seconds"], result["fc1_seconds"]
    print(f"{result['model']}, batch {result['batch_size']}, {result['device']}, {result['threads']} threads, "
          f"int8 kernel: {result['kernel']}; speed-up = fp32 time / time (median of {args.repeats}, round-robin)")
    for name, seconds in times.items():
        print(f"  {name:10s} {seconds * 1e3:9.1f} ms   {times['fp32'] / seconds:5.2f}x")
    print(f"  fc1 GEMM alone: fp32 {gemm['fp32'] * 1e3:.1f} ms, int8 {gemm['int8'] * 1e3:.1f} ms, "
          f"{gemm['fp32'] / gemm['int8']:.2f}x")
    print(f"  relative error of the pooled output: int8 vs fake W8A8 {result['agreement']:.2e}, "
          f"fake W8A8 vs fp32 {result['fake_error']:.2e}")


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="plain_vit_base_patch32_224", help="registry ViT")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--calib-images", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    run_benchmark(parser, argv, measure, report)


if __name__ == "__main__":
    main()
