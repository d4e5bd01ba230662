"""The device benchmark suite: every speed claim of DTP and token merging, one run, one JSON + markdown table.

Sections (each a benchmark of this folder, run in this process with the profile's settings):
  encoders   encoder_speed.py: ViT-B/32 vs DTP 2x/4x/10x and ViT-B/16 vs DTP 4x, train and inference:
             FLOP ratio, time ratio, realised (time / FLOP ratio), peak-memory ratio
  attention  varlen_attention.py: the B/16 4x batch's attention, scores computed vs needed, per path
  merge      merge_speed.py: ToMe and LGTM at r = 8/13/16 on ViT-B/16, throughput vs FLOP ratio
  llava      llava_speed.py: the LLaVA alignment step with plain vs DTP towers
  clip       clip_step.py: the CLIP train step end to end with the data loader
  int8       int8_speed.py: ViT-B/32 fp32 vs W8A8 fake quantization vs W8A8 on int8 kernels (torchao on CUDA)
Profiles: 'gpu' (default where CUDA is: bf16, batch 256; under 8 minutes on one H200 is the budget),
'cpu' (`--cpu`: fp32, batch 32, this project's CPU goal) and `--cpu --small` (tiny models, a few
images: what the test suite runs, so the script cannot rot). Goals of the GPU issue are checked
at the end of the table.

    bash benchmarks/gpu_suite.sh [--cpu] [--small] [--out DIR]
"""
import argparse
import json
import math
import time
from datetime import datetime
from pathlib import Path

import torch

import clip_step
import encoder_speed
import int8_speed
import llava_speed
import merge_speed
import varlen_attention
from dtpclip.cli import make_parser, parse_args

FULL = {
    "encoders": {"groups": [["plain_vit_base_patch32_224", "dtp_vit_base_patch32_224_2x",
                             "dtp_vit_base_patch32_224_4x", "dtp_vit_base_patch32_224_10x"],
                            ["plain_vit_base_patch16_224", "dtp_vit_base_patch16_224_4x"]], "repeats": 5},
    "attention": {"patches": 196, "compression": 0.25, "heads": 12, "head_dim": 64, "repeats": 5},
    "merge": {"models": ["plain_vit_base_patch16_224"], "r": [8, 13, 16], "lgtm": True, "repeats": 5},
    "llava": {"towers": llava_speed.TOWERS, "batch_size": 32, "text_tokens": 24, "repeats": 5},
    "clip": {"models": clip_step.MODELS, "steps": 10, "warmup": 3, "workers": 8},
    "int8": {"model": "plain_vit_base_patch32_224", "calib_images": 32, "repeats": 5},
}
SMALL = {
    "encoders": {"groups": [["plain_vit_tiny_patch16_64", "dtp_vit_tiny_patch16_64_4x"]], "repeats": 1},
    "attention": {"patches": 16, "compression": 0.25, "heads": 3, "head_dim": 64, "repeats": 1},
    "merge": {"models": ["plain_vit_tiny_patch16_64"], "r": [2], "lgtm": True, "repeats": 1},
    "llava": {"towers": ["plain_vit_tiny_patch16_64", "dtp_vit_tiny_patch16_64_4x"], "batch_size": 2,
              "text_tokens": 8, "repeats": 1},
    "clip": {"models": ["PlainViT-Ti-16-64", "DTP-ViT-Ti-16-64-4x"], "steps": 1, "warmup": 1, "workers": 0},
    "int8": {"model": "plain_vit_tiny_patch16_64", "calib_images": 4, "repeats": 1},
}
# The GPU issue's goals: (what, model, mode, figure, bound), the figure of its row against its group's baseline.
GOALS = [("DTP-ViT-B/32 10x train step realised", "dtp_vit_base_patch32_224_10x", "train", "realised", 0.85),
         ("DTP-ViT-B/16 4x train step realised", "dtp_vit_base_patch16_224_4x", "train", "realised", 0.85)]
MEMORY_GOAL = ("DTP-ViT-B/32 10x training peak / ViT-B/32's", "dtp_vit_base_patch32_224_10x", 0.40)


def ratio(base: float, value: float) -> float:
    return base / value if base and value else float("nan")


def encoder_rows(group_results: dict) -> list:
    """encoder_speed's figures as rows with the ratios to the group's first model."""
    names = list(group_results)
    base, rows = group_results[names[0]], []
    for name in names:
        r = group_results[name]
        for mode, macs, step in (("train", "train_gmacs", "train_step"), ("infer", "gmacs", "forward")):
            flop_x, time_x = ratio(base[macs], r[macs]), ratio(base[f"{step}_ms"], r[f"{step}_ms"])
            rows.append({"model": name, "baseline": names[0], "mode": mode, "gmacs": r[macs], "flop_x": flop_x,
                         "ms": r[f"{step}_ms"], "time_x": time_x, "realised": time_x / flop_x,
                         "peak_mb": r[f"{step}_peak_mb"], "memory_x": ratio(r[f"{step}_peak_mb"],
                                                                             base[f"{step}_peak_mb"])})
    return rows


def run_sections(profile: dict, device: str, precision: str, batch: int) -> dict:
    common = {"device": device, "precision": precision}
    results = {}
    started = time.perf_counter()
    groups = profile["encoders"]["groups"]
    results["encoders"] = [row for group in groups for row in encoder_rows(encoder_speed.measure(argparse.Namespace(
        variants=group, batch_size=batch, repeats=profile["encoders"]["repeats"], **common)))]
    results["attention"] = varlen_attention.measure(argparse.Namespace(
        batch_size=batch, **profile["attention"], **common))
    results["merge"] = merge_speed.measure(argparse.Namespace(batch_size=batch, **profile["merge"], **common))
    results["llava"] = llava_speed.measure(argparse.Namespace(**profile["llava"], **common))
    results["clip"] = clip_step.measure(argparse.Namespace(batch_size=batch, **profile["clip"], **common))
    results["int8"] = int8_speed.measure(argparse.Namespace(batch_size=batch, device=device, **profile["int8"]))
    results["seconds"] = time.perf_counter() - started
    return results


def goal_lines(encoders: list) -> list:
    rows = {(r["model"], r["mode"]): r for r in encoders}
    lines = []
    for what, model, mode, figure, bound in GOALS:
        if (model, mode) in rows:
            value = rows[model, mode][figure]
            lines.append(f"- {what}: {value:.2f} (goal >= {bound}) {'met' if value >= bound else 'NOT met'}")
    what, model, bound = MEMORY_GOAL
    if (model, "train") in rows:
        value = 1.0 / rows[model, "train"]["memory_x"]
        lines.append(f"- {what}: {value:.2f} (goal <= {bound}) {'met' if value <= bound else 'NOT met'}")
    return lines


def table(header: list, rows: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(results: dict, context: str) -> str:
    lines = [f"# dtpclip device suite\n\n{context}\n",
             "## Encoders (x = baseline / model; realised = time x / FLOP x)\n"]
    lines += table(["model", "vs", "mode", "GMACs", "FLOP x", "ms", "time x", "realised", "peak MB", "memory x"],
                   [[r["model"], r["baseline"], r["mode"], fmt(r["gmacs"], ".3f"), fmt(r["flop_x"]),
                     fmt(r["ms"], ".1f"),
                     fmt(r["time_x"]), fmt(r["realised"]), fmt(r["peak_mb"], ".0f"), fmt(r["memory_x"])]
                    for r in results["encoders"]])
    attention = results["attention"]
    needed = attention["scores"]["needed"]
    lines += [f"\n## Attention of one DTP batch ({attention['images']} images, {attention['tokens']} tokens)\n"]
    lines += table(["layout", "scores (M per head)", "x needed"],
                   [[name, fmt(count / 1e6), fmt(count / needed)] for name, count in attention["scores"].items()])
    lines += [""] + table(["path", "fwd+bwd ms", "speed x padded"],
                          [[name, fmt(ms), fmt(attention["ms"]["padded"] / ms)]
                           for name, ms in attention["ms"].items()])
    lines += ["\n## Token merging (x = merged / baseline throughput)\n"]
    lines += table(["model", "method", "tokens", "GMACs", "FLOP x", "images/s", "speed x", "realised"],
                   [[r["model"], r["method"], str(r["tokens"]), fmt(r["gmacs"], ".3f"), fmt(r["flop_x"]),
                     fmt(r["images_per_s"], ".1f"), fmt(r["speed_x"]), fmt(r["realised"])] for r in results["merge"]])
    llava = results["llava"]
    base = next(iter(llava.values()))
    lines += ["\n## LLaVA alignment step\n"]
    lines += table(["tower", "visual tokens / image", "token ratio", "step s", "speed x", "peak MB"],
                   [[name, fmt(r["tokens_per_image"], ".1f"), fmt(base["tokens_per_image"] / r["tokens_per_image"]),
                     fmt(r["step_s"], ".3f"), fmt(base["step_s"] / r["step_s"]), fmt(r["peak_mb"], ".0f")]
                    for name, r in llava.items()])
    clip = results["clip"]
    base = next(iter(clip.values()))
    lines += ["\n## CLIP train step with the data loader\n"]
    lines += table(["model", "samples/s", "step s", "speed x"],
                   [[name, fmt(r["samples_per_s"], ".1f"), fmt(r["step_s"], ".3f"),
                     fmt(r["samples_per_s"] / base["samples_per_s"])] for name, r in clip.items()])
    int8 = results["int8"]
    lines += [f"\n## W8A8 on integer kernels ({int8['model']}, {int8['kernel']}; x = fp32 time / time)\n"]
    lines += table(["model", "ms", "speed x"], [[name, fmt(seconds * 1e3, ".1f"), fmt(int8["seconds"]["fp32"] / seconds)]
                                                for name, seconds in int8["seconds"].items()])
    gemm = int8["fc1_seconds"]
    lines += [f"\nfc1 GEMM alone: {fmt(gemm['fp32'] / gemm['int8'])}x; pooled output relative error: int8 vs fake "
              f"{fmt(int8['agreement'], '.1e')}, fake vs fp32 {fmt(int8['fake_error'], '.1e')}"]
    goals = goal_lines(results["encoders"])
    lines += ["\n## Goals\n"] + (goals or ["- (the goals are set for the full-size encoders)"])
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (fp32, batch 32)")
    parser.add_argument("--small", action="store_true", help="tiny models and a few images (the test's profile)")
    parser.add_argument("--out", default=None,
                        help="directory for suite.json and suite.md "
                             "(default: benchmarks/results/suite-<device>-<time>)")
    args = parse_args(parser, argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device here: pass --cpu (and --small for the quick run)")
    device, precision = ("cpu", "fp32") if args.cpu else ("cuda", "bf16")
    batch = 4 if args.small else 32 if args.cpu else 256
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = f"suite-{device}{'-small' if args.small else ''}-{stamp}"
    out = Path(args.out or Path(__file__).parent / "results" / folder)
    if (out / "suite.json").exists():
        parser.error(f"--out {str(out)!r} already holds a suite run: pass a new directory")
    out.mkdir(parents=True, exist_ok=True)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = run_sections(SMALL if args.small else FULL, device, precision, batch)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    context = (f"{name}, {precision}, batch {batch}, torch {torch.__version__}; {results['seconds']:.0f} s in all; "
               f"{datetime.now():%Y-%m-%d %H:%M}")
    results["context"] = context
    (out / "suite.json").write_text(json.dumps(results, indent=2))
    (out / "suite.md").write_text(markdown(results, context))
    print(markdown(results, context))
    print(f"written: {out / 'suite.json'}, {out / 'suite.md'}")


if __name__ == "__main__":
    main()
