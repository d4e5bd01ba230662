"""Two optimizer steps of the CLIP loop's step on a fixed global batch, split by rank.

Run with `torchrun --nproc_per_node N tests/dist_contrastive.py OUT.json` (or plain python for
one process); rank 0 writes the rank-averaged losses of both steps to OUT.json.
"""
import json
import sys

import open_clip
import torch
from accelerate import Accelerator

from micro_clip import register_micro_clip
from dtpclip.clip import create_clip_and_transforms
from dtpclip.training import ContrastiveModel, TrainConfig, contrastive_step, param_groups

GLOBAL_BATCH = 8


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    name = register_micro_clip("vit")  # DTP would sample different boundaries when the batch is split
    torch.manual_seed(0)
    clip, _, _ = create_clip_and_transforms(name)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=generator)
    texts = torch.randint(1, 49000, (GLOBAL_BATCH, 24), generator=generator)
    per_rank = GLOBAL_BATCH // accelerator.num_processes
    mine = slice(accelerator.process_index * per_rank, (accelerator.process_index + 1) * per_rank)
    cfg = TrainConfig(aux_loss_weight=1.0, grad_clip=None)
    model = ContrastiveModel(clip)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=accelerator.process_index,
                                 world_size=accelerator.num_processes)
    losses = []
    for _ in range(2):
        terms, _ = contrastive_step(model, loss_fn, images[mine], texts[mine], cfg, accelerator)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(accelerator.reduce((terms["contrastive_loss"] + terms["aux_loss"]).detach(), "mean")))
    if accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump({"losses": losses, "world_size": accelerator.num_processes}, f)


if __name__ == "__main__":
    main(sys.argv[1])
