"""LLaVA alignment step with a ViT-B/32 tower vs DTP-ViT-B/32 10x: visual-token ratio beside the speed-up.

One step = frozen tower forward, projector, tiny Llama forward + backward (projector trained),
AdamW step: the stage-1 step of llava_bridge.align without DeepSpeed's engine, so the numbers
are the model's compute. Both towers are fresh (no weights needed) and get the same LM, batch
and captions. DTP's default eval rule keeps each image's expected boundary count, so the
fresh DTP tower pools at its 10x prior as a trained one does. Steps are timed round-robin (dtpclip.measure),
medians reported.

    OMP_NUM_THREADS=1 python benchmarks/llava_speed.py [--batch-size 16] [--repeats 5] [--device cuda --precision bf16]
"""
import torch

from dtpclip.cli import make_parser, run_benchmark
from dtpclip.measure import autocast, interleaved_median_times, peak_memory_bytes
from llava_bridge.align import token_loss
from llava_bridge.build import build_vision_tower
from llava_bridge.conversation import IMAGE_TOKEN_INDEX
from llava_bridge.demo_lm import LM_CONFIG
from llava_bridge.model import LlavaModel
from transformers import LlamaConfig, LlamaForCausalLM

TOWERS = ["plain_vit_base_patch32_224", "dtp_vit_base_patch32_224_10x"]


def make_step(model, batch, precision_context):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    counts = []

    def step():
        with precision_context:
            logits, labels, visual = model(**batch)
            loss = token_loss(logits, labels, 1)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        counts.append(sum(visual) / len(visual))
    return step, counts


def measure(args) -> dict:
    """{tower: tokens per image, median step seconds, samples/s, peak MiB} for the towers, baseline first."""
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    towers = {name: build_vision_tower(name, None, -1, "patch") for name in args.towers}
    size = next(iter(towers.values())).encoder.patch_embed.img_size
    images = torch.randn(args.batch_size, 3, *size, generator=generator)
    input_ids = torch.randint(4, 1000, (args.batch_size, args.text_tokens + 2), generator=generator)
    input_ids[:, 0], input_ids[:, 1] = 1, IMAGE_TOKEN_INDEX
    batch = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
             "labels": input_ids.masked_fill(input_ids < 0, -100).to(device),
             "images": images.to(device)}
    steps, counts, memory = {}, {}, {}
    for name, tower in towers.items():
        torch.manual_seed(0)
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=1000, **LM_CONFIG)).requires_grad_(False)
        model = LlavaModel(tower, lm, "mlp2x_gelu").to(device).train()
        steps[name], counts[name] = make_step(model, batch, autocast(device, args.precision))
        memory[name] = peak_memory_bytes(steps[name], device)
    times = interleaved_median_times(steps, device, warmup=1, repeats=args.repeats)
    return {name: {"tokens_per_image": sum(counts[name]) / len(counts[name]), "step_s": times[name],
                   "samples_per_s": args.batch_size / times[name],
                   "peak_mb": memory[name] / 2**20 if memory[name] is not None else None} for name in towers}


def report(results: dict, args) -> None:
    base = results[args.towers[0]]
    print(f"batch {args.batch_size}, {args.text_tokens} caption tokens, {args.device}, {args.precision}, "
          f"{torch.get_num_threads()} threads, tiny Llama (hidden {LM_CONFIG['hidden_size']}, "
          f"{LM_CONFIG['num_hidden_layers']} layers); median of {args.repeats} interleaved steps")
    print(f"{'tower':30s} {'vis tok/img':>11s} {'token ratio':>11s} {'step s':>8s} {'samples/s':>9s} "
          f"{'speedup':>7s} {'peak MiB':>8s}")
    for name, r in results.items():
        peak = f"{r['peak_mb']:8.0f}" if r["peak_mb"] is not None else f"{'n/a':>8s}"
        print(f"{name:30s} {r['tokens_per_image']:11.1f} {base['tokens_per_image'] / r['tokens_per_image']:10.1f}x "
              f"{r['step_s']:8.3f} {r['samples_per_s']:9.1f} {base['step_s'] / r['step_s']:6.2f}x {peak}")


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--towers", nargs="+", default=TOWERS, help="registry encoders, baseline first")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=24, help="caption tokens per sample")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    run_benchmark(parser, argv, measure, report)


if __name__ == "__main__":
    main()
