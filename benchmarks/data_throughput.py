"""Train-data throughput: dtpclip.data.make_train_loader against a plain webdataset pipeline
with the same decode, transforms, tokenizer, shuffle buffer, batching and worker count.

The reference is the pipeline open_clip_train builds, written with webdataset's stock stages
(SimpleShardList, split_by_worker, tarfile_to_samples, shuffle, decode('pilrgb'), to_tuple,
map_tuple, batched); open_clip_train itself is not importable with webdataset > 0.2.86.
What ours adds per sample: skip counting in shared memory, a per-sample seeded transform
(exact resume), and the end-of-tar check. Two scenarios, both run side by side:

  laion  256 px JPEG shards (what laion_to_shards.py writes) -> open_clip train transform at 224
  demo   the built-in 64 px demo shards -> open_clip train transform at 64

    python benchmarks/data_throughput.py [--batches 40 --workers 2 --batch-size 64]
"""

import argparse
import io
import json
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import open_clip
import torch
import webdataset as wds
from PIL import Image

from dtpclip.data import expand_shards, make_train_loader
from dtpclip.demo_data import DemoConfig, ensure_demo_data


def laion_like_shards(directory: Path, shards: int, per_shard: int) -> str:
    """256x256 JPEGs of smooth random colour fields (about LAION's bytes per image) + captions."""
    rng = np.random.default_rng(0)
    sizes = {}
    for s in range(shards):
        with wds.TarWriter(str(directory / f"{s:05d}.tar"), encoder=False) as sink:
            for i in range(per_shard):
                coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((256, 256), Image.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=90)
                sink.write({"__key__": f"{s:05d}{i:04d}", "jpg": buffer.getvalue(),
                            "txt": f"a photo of item {i} in shard {s}".encode()})
        sizes[f"{s:05d}.tar"] = per_shard
    (directory / "sizes.json").write_text(json.dumps(sizes))
    return str(directory / f"{{00000..{shards - 1:05d}}}.tar")


def plain_webdataset(spec, preprocess, tokenizer, batch_size, workers, shuffle_buffer):
    def collate(batch):
        images, captions = zip(*batch)
        return torch.stack(images), tokenizer(list(captions))

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(expand_shards(spec)),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(shuffle_buffer, max(1, shuffle_buffer // 5)),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.to_tuple("jpg;png;webp", "txt"),
        wds.map_tuple(preprocess, lambda caption: caption),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    ).repeat()
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers)


def samples_per_second(loader, batches: int, warmup: int) -> float:
    iterator = iter(loader)
    for _ in islice(iterator, warmup):  # worker start-up and shuffle-buffer fill
        pass
    start, count = time.perf_counter(), 0
    for images, _ in islice(iterator, batches):
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=4, help="untimed batches per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per pipeline (median kept)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    args = parser.parse_args(argv)

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with tempfile.TemporaryDirectory() as tmp:
        needed = (args.batches + args.warmup) * args.batch_size
        demo = ensure_demo_data(Path(tmp) / "demo", DemoConfig(num_train=4000, num_eval=10))
        scenarios = {
            "laion 256px -> 224": (laion_like_shards(Path(tmp), 4, needed // 4 + 1), 224),
            "demo 64px -> 64": (demo.train_shards, 64),
        }
        print(f"batch {args.batch_size}, {args.workers} workers, {args.batches} timed batches, "
              f"shuffle buffer {args.shuffle_buffer}, torch threads {torch.get_num_threads()}")
        print(f"{'scenario':<20} {'dtpclip.data':>14} {'plain wds':>12} {'ratio':>7}   range of runs (ours, plain)")
        for name, (spec, size) in scenarios.items():
            preprocess = open_clip.image_transform(size, is_train=True)
            runs = {"ours": [], "plain": []}
            for _ in range(args.rounds):
                ours = make_train_loader(spec, preprocess, tokenizer, args.batch_size, num_workers=args.workers,
                                         resampled=True, samples_per_epoch=needed * 2,
                                         shuffle_buffer=args.shuffle_buffer)
                runs["ours"].append(samples_per_second(ours, args.batches, args.warmup))
                plain = plain_webdataset(spec, preprocess, tokenizer, args.batch_size, args.workers,
                                         args.shuffle_buffer)
                runs["plain"].append(samples_per_second(plain, args.batches, args.warmup))
            ours_rate, plain_rate = statistics.median(runs["ours"]), statistics.median(runs["plain"])
            spread = "  ".join(f"{min(r):.0f}-{max(r):.0f}" for r in runs.values())
            ratio = ours_rate / plain_rate
            print(f"{name:<20} {ours_rate:>10.0f} /s {plain_rate:>8.0f} /s {ratio:>7.2f}   {spread}")


if __name__ == "__main__":
    main()
