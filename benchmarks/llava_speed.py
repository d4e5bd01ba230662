"""LLaVA alignment step with a ViT-B/32 tower vs DTP-ViT-B/32 10x: visual-token ratio beside the speed-up.

One step = frozen tower forward, projector, tiny Llama forward + backward (projector trained),
AdamW step: the stage-1 step of llava_bridge.align without DeepSpeed's engine, so the numbers
are the model's compute. Both towers are fresh (no weights needed) and get the same LM, batch
and captions. DTP's default eval rule keeps each image's expected boundary count, so the
fresh DTP tower pools at its 10x prior as a trained one does. Steps are timed round-robin (dtpclip.measure),
medians reported.

    OMP_NUM_THREADS=1 python benchmarks/llava_speed.py [--batch-size 16] [--repeats 5] [--device cuda]
"""
import torch

from dtpclip.cli import make_parser, parse_args
from dtpclip.measure import interleaved_median_times, peak_memory_bytes
from llava_bridge.align import token_loss
from llava_bridge.build import build_vision_tower
from llava_bridge.conversation import IMAGE_TOKEN_INDEX
from llava_bridge.demo_lm import LM_CONFIG
from llava_bridge.model import LlavaModel
from transformers import LlamaConfig, LlamaForCausalLM

TOWERS = {"ViT-B/32": "plain_vit_base_patch32_224", "DTP-ViT-B/32 10x": "dtp_vit_base_patch32_224_10x"}


def make_step(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    counts = []

    def step():
        logits, labels, visual = model(**batch)
        token_loss(logits, labels, 1)[0].backward()
        optimizer.step()
        optimizer.zero_grad()
        counts.append(sum(visual) / len(visual))
    return step, counts


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=24, help="caption tokens per sample")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parse_args(parser, argv)
    device = torch.device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, 224, 224, generator=generator)
    input_ids = torch.randint(4, 1000, (args.batch_size, args.text_tokens + 2), generator=generator)
    input_ids[:, 0], input_ids[:, 1] = 1, IMAGE_TOKEN_INDEX
    batch = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
             "labels": input_ids.masked_fill(input_ids < 0, -100).to(device),
             "images": images.to(device)}
    steps, counts, memory = {}, {}, {}
    for label, name in TOWERS.items():
        tower = build_vision_tower(name, None, -1, "patch")
        torch.manual_seed(0)
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=1000, **LM_CONFIG)).requires_grad_(False)
        model = LlavaModel(tower, lm, "mlp2x_gelu").to(device).train()
        steps[label], counts[label] = make_step(model, batch)
        memory[label] = peak_memory_bytes(steps[label], device)
    times = interleaved_median_times(steps, device, warmup=1, repeats=args.repeats)
    base = next(iter(TOWERS))
    tokens = {label: sum(c) / len(c) for label, c in counts.items()}
    print(f"batch {args.batch_size}, {args.text_tokens} caption tokens, {device.type}, {torch.get_num_threads()} "
          f"threads, tiny Llama (hidden {LM_CONFIG['hidden_size']}, {LM_CONFIG['num_hidden_layers']} layers); "
          f"median of {args.repeats} interleaved steps")
    print(f"{'tower':18s} {'vis tok/img':>11s} {'token ratio':>11s} {'step s':>8s} {'samples/s':>9s} "
          f"{'speedup':>7s} {'peak MiB':>8s}")
    for label in TOWERS:
        peak = f"{memory[label] / 2**20:8.0f}" if memory[label] is not None else f"{'n/a':>8s}"
        print(f"{label:18s} {tokens[label]:11.1f} {tokens[base] / tokens[label]:10.1f}x {times[label]:8.3f} "
              f"{args.batch_size / times[label]:9.1f} {times[base] / times[label]:6.2f}x {peak}")


if __name__ == "__main__":
    main()
