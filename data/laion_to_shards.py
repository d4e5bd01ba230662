"""LAION parquet (URL and TEXT columns) -> webdataset shards, with img2dataset.

The defaults are the seed's LAION-400M download:

    img2dataset --url_list laion400m-meta --input_format parquet --url_col URL --caption_col TEXT
        --output_format webdataset --output_folder laion400m-data --processes_count 16
        --thread_count 128 --image_size 256
        --save_additional_columns '["NSFW","similarity","LICENSE"]' --enable_wandb False

so `python data/laion_to_shards.py` with no flags runs exactly that. Each shard NNNNN.tar holds
{key}.jpg, {key}.txt (the caption) and {key}.json (url, the additional columns, sizes, status),
next to NNNNN_stats.json, whose "successes" dtpclip.data counts as the epoch size.
Read the result with dtpclip.data.make_train_loader("laion400m-data/{00000..NNNNN}.tar", ...).
"""

import argparse
import glob
import json
import os
from pathlib import Path

# img2dataset imports albumentations, which checks PyPI for a newer version at import time
# (a network call in every worker process); the variable turns that check off.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url-list", default="laion400m-meta", help="parquet file or folder of them")
    parser.add_argument("--output-folder", default="laion400m-data")
    parser.add_argument("--input-format", default="parquet")
    parser.add_argument("--url-col", default="URL")
    parser.add_argument("--caption-col", default="TEXT")
    parser.add_argument("--processes-count", type=int, default=16)
    parser.add_argument("--thread-count", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--resize-mode", default="border", help="img2dataset's resize mode")
    parser.add_argument("--number-sample-per-shard", type=int, default=10_000)
    parser.add_argument("--additional-columns", nargs="*", default=["NSFW", "similarity", "LICENSE"],
                        help="parquet columns copied into each sample's .json")
    parser.add_argument("--timeout", type=int, default=10, help="seconds per download")
    parser.add_argument("--retries", type=int, default=0)
    parser.add_argument("--enable-wandb", action="store_true", help="log the run to Weights & Biases")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from img2dataset import download

    download(
        url_list=args.url_list,
        input_format=args.input_format,
        url_col=args.url_col,
        caption_col=args.caption_col,
        output_format="webdataset",
        output_folder=args.output_folder,
        processes_count=args.processes_count,
        thread_count=args.thread_count,
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        number_sample_per_shard=args.number_sample_per_shard,
        save_additional_columns=args.additional_columns or None,
        timeout=args.timeout,
        retries=args.retries,
        enable_wandb=args.enable_wandb,
    )
    stats = [json.loads(Path(p).read_text()) for p in glob.glob(os.path.join(args.output_folder, "*_stats.json"))]
    successes, count = sum(s["successes"] for s in stats), sum(s["count"] for s in stats)
    print(f"{successes} of {count} samples written to {len(stats)} shard(s) in {args.output_folder}")


if __name__ == "__main__":  # img2dataset starts its workers with 'spawn', which re-imports this file
    main()
