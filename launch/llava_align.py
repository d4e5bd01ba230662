"""LLaVA-style projector alignment of any registry encoder: `deepspeed launch/llava_align.py [flags]`.

With no flags: stage 1 on the built-in demo (the latest demo CLIP's DTP-ViT tower, or a fresh one
with a warning; a tiny Llama built offline in the cache; the demo LLaVA json) on CPU in a few
minutes. `--stage finetune --pretrain-projector RUN/final` for stage 2; `--deepspeed-config
launch/configs/zero3.json` for ZeRO-3; `--config run.yaml` takes the same keys as the flags.
Also runs as `python launch/llava_align.py` (a world of one) and under torchrun.
"""
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `deepspeed launch/...` from a checkout
os.environ["DTPCLIP_DEFER_IMPORTS"] = "1"  # parse before the heavy imports: --help and argument errors at once
from dtpclip.cli import add_dataclass_arguments, dataclass_from_args, make_parser, parse_args, run_main  # noqa: E402
from llava_bridge.align_config import AlignConfig  # noqa: E402

del os.environ["DTPCLIP_DEFER_IMPORTS"]


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0], "deepspeed launch/llava_align.py")
    add_dataclass_arguments(parser, AlignConfig)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                        help="set by the deepspeed launcher (the rank is read from LOCAL_RANK)")
    cfg = dataclass_from_args(AlignConfig, parse_args(parser, argv))
    from llava_bridge.align import train  # the heavy part, after the arguments are known good

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train(cfg)


if __name__ == "__main__":
    run_main(main)
