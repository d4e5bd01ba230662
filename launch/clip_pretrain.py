"""CLIP pretraining of any registry encoder: `accelerate launch launch/clip_pretrain.py [flags]`.

With no flags: a small DTP-ViT CLIP on the built-in demo shards (generated on first use),
zero-shot evaluated on the demo eval set after each epoch. `--config run.yaml` takes the same
keys as the flags. Multi-node: `accelerate launch --num_machines N --machine_rank R
--main_process_ip HOST --main_process_port PORT --num_processes TOTAL launch/clip_pretrain.py ...`.
"""
import logging
import os

os.environ["DTPCLIP_DEFER_IMPORTS"] = "1"  # parse before the heavy imports: --help and argument errors at once
from dtpclip.cli import add_dataclass_arguments, dataclass_from_args, make_parser, parse_args, run_main  # noqa: E402
from dtpclip.train_config import TrainConfig  # noqa: E402

del os.environ["DTPCLIP_DEFER_IMPORTS"]


def main(argv=None) -> dict:
    parser = make_parser(__doc__.splitlines()[0], "accelerate launch launch/clip_pretrain.py")
    add_dataclass_arguments(parser, TrainConfig)
    cfg = dataclass_from_args(TrainConfig, parse_args(parser, argv))
    from dtpclip.training import train  # the heavy part, after the arguments are known good

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train(cfg)


if __name__ == "__main__":
    run_main(main)
