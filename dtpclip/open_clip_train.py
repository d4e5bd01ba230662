"""python -m dtpclip.open_clip_train [open_clip_train flags] [--aux-loss-weight W]: open_clip_train's own `main`,
with dtpclip's encoders registered and each encoder's aux loss (DTP's boundary loss, VQ-ViT's dict loss) added
to its loss, so it trains the objective dtpclip's loop does. open_clip_train alone trains ClipLoss only, and a DTP
tower drifts off its boundary rate.

The aux loss joins open_clip_train's loss dict as "aux_loss" (weighted): it is in the total it backpropagates and
in its log lines, tensorboard and wandb. The encoder's stats (DTP: boundary_ratio, tokens_per_image) are averaged
over each logging interval and logged on a line of their own ("encoder stats: ...").

    python -m dtpclip.open_clip_train     # demo: DTP-ViT-Ti-16-64-4x on the demo shards, dtpclip's demo recipe
    python -m dtpclip.open_clip_train --model DTP-ViT-B-32-4x --dataset-type webdataset \\
        --train-data '/data/laion/{00000..41455}.tar' --train-num-samples 400000000 --precision amp_bf16 ...

Without --train-data it trains on the built-in demo shards with dtpclip's demo recipe (TrainConfig's defaults,
logs under <runs root>/open_clip_train); any flag given wins. Every other flag is open_clip_train's.
"""
import argparse
import sys
from dataclasses import fields
from typing import List, Optional, Sequence

from dtpclip.train_config import TrainConfig

_AUX_WEIGHT = next(f for f in fields(TrainConfig) if f.name == "aux_loss_weight")


def make_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dtpclip.open_clip_train", add_help=False,
                                     description="open_clip_train with dtpclip's encoders registered and their aux "
                                                 "losses in its objective")
    parser.add_argument("--aux-loss-weight", type=float, default=_AUX_WEIGHT.default,
                        help=f"{_AUX_WEIGHT.metadata['help']} (default: {_AUX_WEIGHT.default})")
    return parser


def demo_flags(cuda: bool) -> List[str]:
    """open_clip_train flags for dtpclip's demo run: the demo shards and TrainConfig's recipe."""
    from dtpclip.checkpointing import runs_root
    from dtpclip.demo_data import DemoConfig, ensure_demo_data
    recipe = TrainConfig()
    return ["--train-data", ensure_demo_data().train_shards, "--train-num-samples", str(DemoConfig().num_train),
            "--dataset-type", "webdataset", "--model", recipe.model, "--batch-size", str(recipe.batch_size),
            "--epochs", str(recipe.epochs), "--lr", str(recipe.lr), "--warmup", str(recipe.warmup_steps),
            "--wd", str(recipe.weight_decay), "--beta1", str(recipe.beta1), "--beta2", str(recipe.beta2),
            "--eps", str(recipe.eps), "--grad-clip-norm", str(recipe.grad_clip), "--workers", str(recipe.workers),
            "--seed", str(recipe.seed), "--log-every-n-steps", str(recipe.log_every),
            "--precision", "amp_bf16" if cuda else "fp32", "--logs", str(runs_root() / "open_clip_train")]


def main(argv: Optional[Sequence[str]] = None) -> None:
    ours, theirs = make_arg_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(theirs):
        print(make_arg_parser().format_help().replace("usage:", "dtpclip's flag, then open_clip_train's:\n", 1))
    from open_clip_train.params import parse_args as parse_open_clip_train_args
    parse_open_clip_train_args(list(theirs))  # --help and bad flags answered here, before torch is imported
    import torch
    import open_clip_train.main as open_clip_train_main

    from dtpclip import clip, encoders  # noqa: F401  (our names, for timm and open_clip)
    from dtpclip.encoders.vit import collecting_aux_losses
    from dtpclip.open_clip_loss import WithAuxLoss
    if not any(flag.split("=")[0] == "--train-data" for flag in theirs):
        theirs = demo_flags(torch.cuda.is_available()) + list(theirs)
    plain_create_loss = open_clip_train_main.create_loss
    with collecting_aux_losses() as handed:
        open_clip_train_main.create_loss = lambda args: WithAuxLoss.for_run(plain_create_loss(args), handed,
                                                                           ours.aux_loss_weight, args)
        try:
            open_clip_train_main.main(list(theirs))
        finally:
            open_clip_train_main.create_loss = plain_create_loss


if __name__ == "__main__":
    from dtpclip.cli import run_main
    run_main(main)
