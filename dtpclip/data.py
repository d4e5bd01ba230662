"""Webdataset pipelines: shard specs, robust sample reading, the CLIP train loader, LLaVA export.

One code path serves the laptop demo (dtpclip.demo_data) and LAION-400M on many nodes.
webdataset is used as a library: brace expansion, `gopen` (local paths, pipe:, http(s) via
curl; s3 as 'pipe:aws s3 cp s3://bucket/shard.tar -'), its tar iterator and sample grouping,
its shuffle buffer; it works on both webdataset lines (0.2.86, the ceiling open_clip_train pins,
and the newest). open_clip_train's data module is not used: its group_by_keys_nothrow fails with
KeyError 'fname' on the end-of-shard markers webdataset emits after 0.2.86. The epoch logic follows
open_clip_train/data.py (`get_wds_dataset`): a fixed number of batches per worker, so every rank runs the same number
of steps, and resampling with replacement for `--dataset-resampled --train-num-samples`.

Broken data is skipped, not fatal: undecodable images, samples without image or caption, shards
that cannot be opened or that break off (truncated tars) are skipped and counted by reason in
a `SampleCounts` shared by all DataLoader workers; the loader logs skipped / seen each epoch.
Two cases stop the run with an error naming the shards, since no batch can be made: a spec that
names no shard (before training starts), and a reader none of whose shards holds a usable sample.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import random
import re
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence, Union

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from webdataset.tariterators import group_by_keys, tar_file_iterator

log = logging.getLogger(__name__)

ShardSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# shard reasons count shards: unreadable = not one sample could be read, truncated = it broke
# off after some samples (those are kept); the others count samples.
SKIP_REASONS = ("missing_image", "missing_caption", "missing_label", "undecodable_image",
                "unreadable_shard", "truncated_shard")
SHARD_REASONS = ("unreadable_shard", "truncated_shard")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
_SHARD_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError)


# ---------------------------------------------------------------------------------------------
# shard specs

def _is_url(name: str) -> bool:
    """pipe:..., http://..., file://... (a single letter before ':' is a Windows drive)."""
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:", name) is not None


def _expand_local(piece: str) -> list[str]:
    path = os.path.expanduser(piece)
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.tar")))
        if not found:
            raise ValueError(f"no shards match {piece!r}: the directory holds no .tar file")
        return found
    expanded = wds.shardlists.expand_urls(path)
    found, missing = [], []
    for name in expanded:
        if glob.has_magic(name):
            matches = sorted(glob.glob(name))
        else:
            matches = [name] if os.path.isfile(name) else []
        found.extend(matches)
        if not matches:
            missing.append(name)
    if not found:
        raise ValueError(f"no shards match {piece!r} ({len(expanded)} path(s) expanded, none exists)")
    if missing:
        listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(f"{len(missing)} of {len(expanded)} shard(s) of {piece!r} are missing: {listed}")
    return found


def expand_shards(spec: ShardSpec) -> list[str]:
    """The shard URLs a spec names, in order; a spec naming nothing is an error naming it.

    A spec is a string or a list of them. A string may join several with '::' (as open_clip's
    --train-data does); each is a brace pattern ('shards/{00000..00099}.tar'), a glob, a
    directory (its *.tar, sorted), a path, or a URL webdataset opens (pipe:, http(s)://).
    Local paths must all exist; URLs are opened only when read.
    """
    pieces = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec or [])
    pieces = [part.strip() for piece in pieces for part in str(piece).split("::")]
    if not pieces or not all(pieces):
        raise ValueError(f"shard spec is empty ({spec!r}): expected a brace pattern, a list, "
                         "a directory or a URL of .tar shards")
    urls = []
    for piece in pieces:
        urls.extend(wds.shardlists.expand_urls(piece) if _is_url(piece) else _expand_local(piece))
    return urls


def _read_json(path: str):
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def count_samples(urls: Sequence[str]) -> int | None:
    """Samples in local shards, from the metadata beside them: open_clip's sizes.json
    ({shard name: count}), else img2dataset's {shard}_stats.json ('successes').
    None when a shard has neither (always for URLs)."""
    total, sizes = 0, {}
    for url in urls:
        if _is_url(url):
            return None
        directory, name = os.path.split(url)
        if directory not in sizes:
            sizes[directory] = _read_json(os.path.join(directory, "sizes.json")) or {}
        if name in sizes[directory]:
            total += int(sizes[directory][name])
            continue
        stats = _read_json(re.sub(r"\.tar$", "_stats.json", url))
        if not (isinstance(stats, dict) and "successes" in stats):
            return None
        total += int(stats["successes"])
    return total


# ---------------------------------------------------------------------------------------------
# counting skips

@dataclass(frozen=True)
class DataCounts:
    """A snapshot of samples read from shards (`seen`) and skips by reason."""

    seen: int
    skipped: dict[str, int]

    @property
    def skipped_samples(self) -> int:
        return sum(n for reason, n in self.skipped.items() if reason not in SHARD_REASONS)

    def __sub__(self, other: DataCounts) -> DataCounts:
        return DataCounts(self.seen - other.seen, {k: n - other.skipped[k] for k, n in self.skipped.items()})

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}={n}" for k, n in self.skipped.items() if n and k not in SHARD_REASONS)
        shards = ", ".join(f"{k}={n}" for k, n in self.skipped.items() if n and k in SHARD_REASONS)
        text = f"skipped {self.skipped_samples} of {self.seen} samples seen"
        return text + (f" ({reasons})" if reasons else "") + (f"; bad shards: {shards}" if shards else "")


class SampleCounts:
    """Seen / skipped counters in shared memory: DataLoader workers add, the main process reads,
    so the counts are exact with any num_workers. Each skip is logged (the first of each reason
    per process as a warning naming the sample and shard, later ones at debug level)."""

    def __init__(self, reasons: Sequence[str] = SKIP_REASONS):
        self.reasons = tuple(reasons)
        self._values = multiprocessing.Array("q", 1 + len(self.reasons))
        self._warned: set[str] = set()

    def add_seen(self) -> None:
        with self._values.get_lock():
            self._values[0] += 1

    def skip(self, reason: str, where: str, error: BaseException | None = None) -> None:
        with self._values.get_lock():
            self._values[1 + self.reasons.index(reason)] += 1
        message = f"skipping {where}: {reason}" + (f" ({type(error).__name__}: {error})" if error else "")
        if reason in self._warned:
            log.debug(message)
        else:
            self._warned.add(reason)
            log.warning("%s; further %s skips are logged at debug level", message, reason)

    def snapshot(self) -> DataCounts:
        with self._values.get_lock():
            values = list(self._values)
        return DataCounts(values[0], dict(zip(self.reasons, values[1:])))


# ---------------------------------------------------------------------------------------------
# reading samples

def _cut_short(url: str) -> bool:
    """Whether a local tar lacks the two zero blocks that end every tar: tarfile reads a header
    cut in half as the end of the archive, so only this catches such a cut."""
    if _is_url(url):
        return False
    with open(url, "rb") as file:
        file.seek(max(0, os.path.getsize(url) - 1024))
        tail = file.read()
    return len(tail) < 1024 or tail.count(0) != len(tail)


def _tar_files(stream, url: str, errors: list) -> Iterator[dict]:
    """The files of a tar stream; an error ends them (recorded in `errors`) instead of raising,
    so the sample being grouped when the tar breaks off is still yielded."""
    try:
        for file in tar_file_iterator(stream):
            yield dict(file, __url__=url)
    except _SHARD_ERRORS as error:
        errors.append(error)


def read_shard(url: str, counts: SampleCounts) -> Iterator[dict]:
    """The samples of one shard (dicts of raw bytes by extension, with __key__ and __url__),
    grouped by webdataset. A shard that cannot be opened, or that breaks off, is counted and
    ends there: every sample read before the break is kept, and the one being read is judged
    on the files that arrived (e.g. counted as missing its caption)."""
    read, errors = 0, []
    try:
        stream = wds.gopen(url)
    except _SHARD_ERRORS as error:
        counts.skip("unreadable_shard", url, error)
        return
    try:
        for sample in group_by_keys(_tar_files(stream, url, errors)):
            counts.add_seen()
            read += 1
            yield sample
    except _SHARD_ERRORS as error:  # from grouping, e.g. a file name twice in a row
        errors.append(error)
    finally:
        with contextlib.suppress(*_SHARD_ERRORS):  # a pipe's exit status was reported above
            stream.close()
    if not errors and _cut_short(url):
        errors.append(EOFError("the end-of-archive blocks are missing: the tar was cut short"))
    if errors:
        counts.skip("truncated_shard" if read else "unreadable_shard", url, errors[0])


def image_extension(sample: dict) -> str | None:
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)


def decode_image(data: bytes, counts: SampleCounts, where: str) -> Image.Image | None:
    """The RGB image, or None (counted) when the bytes do not decode."""
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except DECODE_ERRORS as error:
        counts.skip("undecodable_image", where, error)
        return None


def sample_name(key: str, url: str) -> str:
    """How logs and skip messages name a sample."""
    return f"sample {key!r} of {url}"


class _Record(NamedTuple):
    key: str
    url: str
    image_ext: str
    image_bytes: bytes
    caption: str
    meta: bytes | None

    @property
    def where(self) -> str:
        return sample_name(self.key, self.url)


def _caption_records(url: str, counts: SampleCounts) -> Iterator[_Record]:
    """The samples of a shard that have an image and a non-empty caption (.txt)."""
    for sample in read_shard(url, counts):
        ext = image_extension(sample)
        caption = sample.get("txt", b"").decode("utf-8", "replace").strip()
        where = sample_name(sample["__key__"], url)
        if ext is None:
            counts.skip("missing_image", where)
        elif not caption:
            counts.skip("missing_caption", where)
        else:
            yield _Record(sample["__key__"], url, ext, sample[ext], caption, sample.get("json"))


@dataclass(frozen=True)
class Sample:
    """One decoded caption sample; `meta` is its .json (img2dataset: url, extra columns...)."""

    key: str
    url: str
    caption: str
    image: Image.Image
    image_ext: str
    image_bytes: bytes
    meta: dict


def iter_samples(spec: ShardSpec, counts: SampleCounts | None = None) -> Iterator[Sample]:
    """Every usable sample of a spec, in order, in this process: for inspection and exports.
    Skips are counted in `counts` (pass one to read them)."""
    counts = counts if counts is not None else SampleCounts()
    for url in expand_shards(spec):
        for record in _caption_records(url, counts):
            image = decode_image(record.image_bytes, counts, record.where)
            if image is not None:
                try:
                    meta = json.loads(record.meta) if record.meta else {}
                except ValueError:
                    meta = {}
                yield Sample(record.key, url, record.caption, image, record.image_ext, record.image_bytes, meta)


# ---------------------------------------------------------------------------------------------
# the train loader

def _seed_int(text: str) -> int:
    """A 62-bit seed from a string, the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's CPU generator and `random` for one transform, then restore both: the
    augmentation of a sample depends on its position in the stream only, not on which samples
    ran before (so skipped batches need no transform) nor on the caller's RNG."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        yield
    random.setstate(state)


class _TrainStream(IterableDataset):
    """The batches of one rank; each DataLoader worker reads its own share of the shards.

    Batch i of the rank comes from worker role i % num_workers (the DataLoader asks workers in
    turn). To skip the first N batches, worker w plays role (w + N) % num_workers, so the
    resumed order equals the uninterrupted one.
    """

    def __init__(self, urls, preprocess, tokenizer, batch_size, worker_batches, rank, world_size,
                 resampled, shuffle_buffer, seed, counts, state):
        super().__init__()
        self.urls, self.preprocess, self.tokenizer = urls, preprocess, tokenizer
        self.batch_size, self.worker_batches = batch_size, worker_batches
        self.rank, self.world_size, self.resampled = rank, world_size, resampled
        self.shuffle_buffer, self.seed, self.counts, self.state = shuffle_buffer, seed, counts, state

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        epoch, skip = self.state[0], self.state[1]
        role = (worker + skip) % workers
        skipped = len(range(role, skip, workers))  # batches i < skip with i % workers == role
        stream = f"{self.seed}:{epoch}:{self.rank}:{role}"
        samples = self._transformed(self._records(epoch, role, workers, stream), skipped * self.batch_size,
                                    _seed_int(stream))
        for _ in range(self.worker_batches - skipped):  # no read-ahead past the last batch
            yield self._collate(list(itertools.islice(samples, self.batch_size)))

    def _shards(self, epoch: int, rep: int, role: int, workers: int, stream: str) -> list[str]:
        if self.resampled:  # with replacement, about one pass worth per repetition
            rng = random.Random(f"resample:{stream}:{rep}")
            return [rng.choice(self.urls) for _ in range(max(1, len(self.urls) // (self.world_size * workers)))]
        order = list(self.urls)
        if self.shuffle_buffer > 0:  # the same permutation on every rank, then split by node
            random.Random(f"shards:{self.seed}:{epoch}:{rep}").shuffle(order)
        return order[self.rank::self.world_size][role::workers]

    def _records(self, epoch: int, role: int, workers: int, stream: str) -> Iterator[_Record]:
        """Endless: passes over this reader's shards repeat until the epoch's batches are made.
        Each pass is shuffled on its own, so an epoch as long as the data reads each sample once."""
        for rep in itertools.count():
            urls = self._shards(epoch, rep, role, workers, stream)
            records = (record for url in urls for record in _caption_records(url, self.counts))
            if self.shuffle_buffer > 0:
                records = wds.shuffle(self.shuffle_buffer, max(1, self.shuffle_buffer // 5),
                                      rng=random.Random(f"shuffle:{stream}:{rep}"))(records)
            produced = False
            for record in records:
                produced = True
                yield record
            if not produced:
                raise ValueError(f"rank {self.rank} reader {role}: no usable sample in its {len(urls)} "
                                   f"shard(s) ({urls[0]}, ...); see the skip warnings above")

    def _transformed(self, records: Iterable[_Record], skip: int, base_seed: int):
        index = 0  # position among decodable samples: what the transform seed depends on
        for record in records:
            image = decode_image(record.image_bytes, self.counts, record.where)
            if image is None:
                continue
            if index >= skip:
                with _seeded(base_seed + index):
                    tensor = self.preprocess(image)
                yield tensor, record.caption
            index += 1

    def _collate(self, batch):
        images, captions = zip(*batch)
        return torch.stack(images), self.tokenizer(list(captions))


class TrainLoader:
    """One rank's train batches (images [B, 3, H, W], token ids [B, L]), an epoch at a time.

    Like open_clip's DataInfo: `num_batches` per epoch is fixed and equal on every rank;
    `samples_per_epoch` = num_batches x batch_size x world_size. `counts` are cumulative;
    each finished epoch logs its skipped / seen.

    Exact resume: the batches of an epoch depend only on (spec, seed, epoch, rank, world_size,
    num_workers, batch_size, shuffle_buffer). `set_epoch(e, skip_batches=n)` makes the next
    iteration start at batch n of epoch e, yielding the same batches the uninterrupted epoch
    would have from there on; the skipped part is still read and decoded (to know which
    samples were usable) but not transformed, tokenized, collated or sent from the workers.
    """

    def __init__(self, dataloader: DataLoader, state, counts: SampleCounts, num_batches: int,
                 samples_per_epoch: int):
        self.dataloader, self._state, self.counts = dataloader, state, counts
        self.num_batches, self.samples_per_epoch = num_batches, samples_per_epoch

    @property
    def epoch(self) -> int:
        return self._state[0]

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if not 0 <= skip_batches <= self.num_batches:
            raise ValueError(f"skip_batches={skip_batches}: expected 0 <= skip_batches <= {self.num_batches} "
                             "(the batches in an epoch)")
        self._state[0], self._state[1] = epoch, skip_batches

    def __len__(self) -> int:
        return self.num_batches - self._state[1]

    def __iter__(self):
        before = self.counts.snapshot()
        yield from self.dataloader
        delta = self.counts.snapshot() - before
        (log.warning if any(delta.skipped.values()) else log.info)("epoch %d: %s", self.epoch, delta)


def make_train_loader(
    spec: ShardSpec,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    batch_size: int,
    *,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    resampled: bool = False,
    samples_per_epoch: int | None = None,
    shuffle_buffer: int = 5000,
    seed: int = 0,
    epoch: int = 0,
    pin_memory: bool = False,
) -> TrainLoader:
    """The CLIP train loader of one rank over webdataset shards of image + .txt caption.

    `preprocess` maps a PIL image to a tensor (open_clip's train transform); `tokenizer` maps
    a list of captions to [B, L] ids (open_clip.get_tokenizer(...)). rank / world_size come
    from the caller (e.g. accelerate); do not pass the loader through accelerator.prepare.

    Without `resampled`, each epoch shuffles the shard list (seed, epoch) and splits it by rank,
    then by worker, so it needs >= world_size x num_workers shards; readers that run out start
    another pass. `samples_per_epoch` defaults to the count in sizes.json or img2dataset's
    stats. With `resampled` (open_clip's --dataset-resampled), shards are drawn with
    replacement and `samples_per_epoch` (--train-num-samples) sets the epoch length.
    `shuffle_buffer=0` turns shuffling off (shards in spec order, samples in shard order).
    """
    urls = expand_shards(spec)
    if batch_size < 1 or num_workers < 0 or not 0 <= rank < world_size:
        raise ValueError(f"batch_size={batch_size}, num_workers={num_workers}, rank={rank}, world_size="
                         f"{world_size}: expected batch_size >= 1, num_workers >= 0, 0 <= rank < world_size")
    workers = max(1, num_workers)
    if not resampled and len(urls) < world_size * workers:
        raise ValueError(f"{len(urls)} shard(s) in {spec!r} cannot feed {world_size} rank(s) x {workers} "
                         "worker(s), one shard each at least: use resampled=True, fewer workers or more shards")
    if samples_per_epoch is None:
        samples_per_epoch = count_samples(urls)
        if samples_per_epoch is None:
            raise ValueError(f"cannot tell how many samples {spec!r} holds (no sizes.json or img2dataset "
                             "*_stats.json beside the shards): pass samples_per_epoch")
    worker_batches = samples_per_epoch // (batch_size * world_size * workers)
    if worker_batches < 1:
        raise ValueError(f"samples_per_epoch={samples_per_epoch} is less than one batch per reader: "
                         f"batch_size {batch_size} x {world_size} rank(s) x {workers} worker(s)")
    counts, state = SampleCounts(), multiprocessing.Array("q", [epoch, 0])
    stream = _TrainStream(urls, preprocess, tokenizer, batch_size, worker_batches, rank, world_size,
                          resampled, shuffle_buffer, seed, counts, state)
    # a private generator: the DataLoader draws its worker seeds from it, not from the caller's RNG
    generator = torch.Generator().manual_seed(_seed_int(f"loader:{seed}:{rank}"))
    dataloader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                            persistent_workers=num_workers > 0, generator=generator)
    num_batches = worker_batches * workers
    return TrainLoader(dataloader, state, counts, num_batches, num_batches * batch_size * world_size)


# ---------------------------------------------------------------------------------------------
# LLaVA layout

LLAVA_PROMPTS = (  # brief-description instructions in the style of LLaVA's 558K pretraining set
    "Give a brief description of the image.",
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Summarize the visual content of the image.",
    "Write a short caption for the picture.",
    "Render a clear and concise summary of the photo.",
)


def export_llava_pretrain(spec: ShardSpec, out_dir: str | os.PathLike, *, json_name: str = "pretrain.json") -> Path:
    """Caption shards as LLaVA 558K-style pretraining data; returns the json path.

    Writes out_dir/images/{shard}/{key}.{ext} (the shard's image bytes, not re-encoded) and
    out_dir/{json_name}: a list of {"id", "image" (relative to images/), "conversations":
    [{"from": "human", "value": instruction with "<image>"}, {"from": "gpt", "value": caption}]}.
    The instruction and the side of <image> are picked from the key, deterministically.
    """
    out_dir = Path(out_dir)
    records, counts = [], SampleCounts()
    for sample in iter_samples(spec, counts):
        relative = f"{Path(sample.url).name.removesuffix('.tar')}/{sample.key}.{sample.image_ext}"
        path = out_dir / "images" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sample.image_bytes)
        pick = zlib.crc32(sample.key.encode())
        prompt = LLAVA_PROMPTS[pick % len(LLAVA_PROMPTS)]
        human = f"{prompt}\n<image>" if (pick // len(LLAVA_PROMPTS)) & 1 else f"<image>\n{prompt}"
        records.append({"id": sample.key, "image": relative, "conversations": [
            {"from": "human", "value": human}, {"from": "gpt", "value": sample.caption}]})
    if not records:
        raise ValueError(f"no usable sample in {spec!r} to export ({counts.snapshot()})")
    target = out_dir / json_name
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(records))
    os.replace(tmp, target)
    return target
