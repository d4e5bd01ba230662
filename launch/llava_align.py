"""LLaVA-style projector alignment of any registry encoder: `deepspeed launch/llava_align.py [flags]`.

With no flags: stage 1 on the built-in demo (the latest demo CLIP's DTP-ViT tower, or a fresh one
with a warning; a tiny Llama built offline in the cache; the demo LLaVA json) on CPU in a few
minutes. `--stage finetune --pretrain-projector RUN/final` for stage 2; `--deepspeed-config
launch/configs/zero3.json` for ZeRO-3; `--config run.yaml` takes the same keys as the flags.
Also runs as `python launch/llava_align.py` (a world of one) and under torchrun.
"""
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `deepspeed launch/...` from a checkout

from dtpclip.cli import add_dataclass_arguments, dataclass_from_args, make_parser, parse_args, run_main  # noqa: E402
from llava_bridge.align import AlignConfig, train  # noqa: E402


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0], "deepspeed launch/llava_align.py")
    add_dataclass_arguments(parser, AlignConfig)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                        help="set by the deepspeed launcher (the rank is read from LOCAL_RANK)")
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train(dataclass_from_args(AlignConfig, args))


if __name__ == "__main__":
    run_main(main)
