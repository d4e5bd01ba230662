"""CLIP pretraining of any registry encoder: `accelerate launch launch/clip_pretrain.py [flags]`.

With no flags: a small DTP-ViT CLIP on the built-in demo shards (generated on first use),
zero-shot evaluated on the demo eval set after each epoch. `--config run.yaml` takes the same
keys as the flags. Multi-node: `accelerate launch --num_machines N --machine_rank R
--main_process_ip HOST --main_process_port PORT --num_processes TOTAL launch/clip_pretrain.py ...`.
"""
import logging

from dtpclip.cli import add_dataclass_arguments, dataclass_from_args, make_parser, parse_args, run_main
from dtpclip.training import TrainConfig, train


def main(argv=None) -> dict:
    parser = make_parser(__doc__.splitlines()[0], "accelerate launch launch/clip_pretrain.py")
    add_dataclass_arguments(parser, TrainConfig)
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train(dataclass_from_args(TrainConfig, args))


if __name__ == "__main__":
    run_main(main)
