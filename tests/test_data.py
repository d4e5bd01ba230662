"""dtpclip.data: shard specs, the train loader (splitting, determinism, resume), robustness."""

import functools
import itertools
import http.server
import io
import json
import logging
import runpy
import threading
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from dtpclip.data import SampleCounts, count_samples, expand_shards, iter_samples, make_train_loader

NUM_SHARDS, PER_SHARD = 8, 12


def jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (i * 37 % 256, i * 11 % 256, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


def sample(i: int) -> dict:
    return {"__key__": f"{i:06d}", "jpg": jpeg(i), "txt": f"sample {i}".encode()}


def write_shard(path, samples) -> str:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def ids(captions: list[str]) -> torch.Tensor:
    """A 'tokenizer' that returns each caption's sample id, so tests can see which samples came."""
    return torch.tensor([int(c.split()[-1]) for c in captions])


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255


def batch_ids(loader) -> list[int]:
    return [i for _, tokens in loader for i in tokens.tolist()]


@pytest.fixture
def shard_dir(tmp_path):
    """8 shards of 12 samples (ids 0..95, caption 'sample {id}') with an open_clip sizes.json."""
    directory = tmp_path / "shards"
    directory.mkdir()
    for s in range(NUM_SHARDS):
        write_shard(directory / f"{s:05d}.tar", [sample(s * PER_SHARD + i) for i in range(PER_SHARD)])
    (directory / "sizes.json").write_text(json.dumps({f"{s:05d}.tar": PER_SHARD for s in range(NUM_SHARDS)}))
    return directory


# --- shard specs -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["", [], None, " :: "])
def test_empty_spec_is_an_error_before_training(spec):
    with pytest.raises(ValueError, match="shard spec is empty"):
        make_train_loader(spec, to_tensor, ids, 4)


def test_missing_shards_are_named_in_the_error(shard_dir, tmp_path):
    with pytest.raises(ValueError, match=r"no shards match '.*/x/\{0\.\.3\}\.tar' \(4 path\(s\) expanded"):
        expand_shards(str(tmp_path / "x" / "{0..3}.tar"))
    with pytest.raises(ValueError, match=r"1 of 9 shard\(s\) of .* are missing: .*/00008\.tar"):
        expand_shards(str(shard_dir / "{00000..00008}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no shards match .*empty.*holds no .tar file"):
        expand_shards(tmp_path / "empty")


def test_spec_forms_name_the_same_shards(shard_dir):
    expected = [str(shard_dir / f"{s:05d}.tar") for s in range(NUM_SHARDS)]
    assert expand_shards(str(shard_dir / "{00000..00007}.tar")) == expected
    assert expand_shards(shard_dir) == expected
    assert expand_shards(str(shard_dir / "*.tar")) == expected
    assert expand_shards([shard_dir / "00000.tar", str(shard_dir / "{00001..00007}.tar")]) == expected
    assert expand_shards(f"{shard_dir}/{{00000..00003}}.tar::{shard_dir}/{{00004..00007}}.tar") == expected
    assert expand_shards("pipe:cat s{0..2}.tar") == ["pipe:cat s0.tar", "pipe:cat s1.tar", "pipe:cat s2.tar"]


def test_epoch_size_comes_from_sizes_json_or_img2dataset_stats(shard_dir):
    urls = expand_shards(shard_dir)
    assert count_samples(urls) == NUM_SHARDS * PER_SHARD
    (shard_dir / "sizes.json").unlink()
    for s in range(NUM_SHARDS):
        (shard_dir / f"{s:05d}_stats.json").write_text(json.dumps({"count": 13, "successes": PER_SHARD - 1}))
    assert count_samples(urls) == NUM_SHARDS * (PER_SHARD - 1)
    (shard_dir / "00003_stats.json").unlink()
    assert count_samples(urls) is None
    assert count_samples(["pipe:cat x.tar"]) is None
    with pytest.raises(ValueError, match="cannot tell how many samples .* pass samples_per_epoch"):
        make_train_loader(shard_dir, to_tensor, ids, 4)


def test_bad_loader_arguments_are_errors_naming_them(shard_dir):
    with pytest.raises(ValueError, match="8 shard\\(s\\) in .* cannot feed 2 rank\\(s\\) x 5 worker\\(s\\)"):
        make_train_loader(shard_dir, to_tensor, ids, 4, world_size=2, rank=1, num_workers=5)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        make_train_loader(shard_dir, to_tensor, ids, 4, world_size=2, rank=2)
    with pytest.raises(ValueError, match="samples_per_epoch=7 is less than one batch per reader"):
        make_train_loader(shard_dir, to_tensor, ids, 4, num_workers=2, samples_per_epoch=7)
    loader = make_train_loader(shard_dir, to_tensor, ids, 4, num_workers=0)
    with pytest.raises(ValueError, match="skip_batches=25: expected 0 <= skip_batches <= 24"):
        loader.set_epoch(0, skip_batches=25)
    loader.set_epoch(0, skip_batches=24)  # a checkpoint taken at the end of the epoch
    assert len(loader) == 0 and list(loader) == []


def test_jpg_png_and_webp_samples_with_json_are_read(tmp_path):
    samples = []
    for i, fmt in enumerate(["JPEG", "PNG", "WEBP"]):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 6), (40 * i, 0, 0)).save(buffer, fmt)
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        samples.append({"__key__": f"k{i}", ext: buffer.getvalue(), "txt": f"sample {i}".encode(),
                        "json": json.dumps({"index": i}).encode()})
    path = write_shard(tmp_path / "mixed.tar", samples)
    read = list(iter_samples(path))
    assert [(s.image_ext, s.image.size, s.meta["index"]) for s in read] == [
        ("jpg", (8, 6), 0), ("png", (8, 6), 1), ("webp", (8, 6), 2)]
    loader = make_train_loader(path, to_tensor, ids, 3, num_workers=0, samples_per_epoch=3)
    images, tokens = next(iter(loader))
    assert images.shape == (3, 3, 6, 8) and sorted(tokens.tolist()) == [0, 1, 2]


# --- splitting, determinism, resume ------------------------------------------------------------

def test_an_epoch_reads_every_sample_once_across_ranks_and_workers(shard_dir):
    seen = []
    for rank in range(2):
        loader = make_train_loader(shard_dir, to_tensor, ids, 4, num_workers=2, rank=rank, world_size=2,
                                   shuffle_buffer=20, seed=3)
        assert (len(loader), loader.num_batches, loader.samples_per_epoch) == (12, 12, 96)
        images, _ = next(iter(loader))
        assert images.shape == (4, 3, 16, 16)
        seen.append(batch_ids(loader))
    assert len(set(seen[0])) == len(set(seen[1])) == 48
    assert sorted(seen[0] + seen[1]) == list(range(96))


def test_order_is_fixed_by_seed_and_epoch(shard_dir):
    def order(seed, epoch, workers=0):
        return batch_ids(make_train_loader(shard_dir, to_tensor, ids, 4, num_workers=workers,
                                           shuffle_buffer=30, seed=seed, epoch=epoch))

    first = order(0, 0)
    assert sorted(first) == list(range(96)) and first != list(range(96))
    assert order(0, 0) == first
    assert order(0, 1) != first and order(1, 0) != first
    loader = make_train_loader(shard_dir, to_tensor, ids, 4, num_workers=2, shuffle_buffer=30)
    loader.set_epoch(1)
    assert batch_ids(loader) == order(0, 1, workers=2)


def test_resume_skips_batches_and_yields_the_same_augmented_batches(shard_dir):
    augment = open_clip.image_transform(12, is_train=True)  # random resized crop: RNG-dependent
    loader = make_train_loader(shard_dir, augment, ids, 4, num_workers=2, shuffle_buffer=30, seed=5)
    loader.set_epoch(2)
    full = list(loader)
    loader.set_epoch(2, skip_batches=5)
    assert len(loader) == 24 - 5
    resumed = list(loader)
    assert len(resumed) == 19
    for (images, tokens), (want_images, want_tokens) in zip(resumed, full[5:]):
        assert torch.equal(tokens, want_tokens) and torch.equal(images, want_images)


def test_loading_leaves_the_callers_rng_untouched(shard_dir):
    augment = open_clip.image_transform(12, is_train=True)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    list(make_train_loader(shard_dir, augment, ids, 4, num_workers=0, shuffle_buffer=10))
    assert torch.equal(torch.rand(3), expected)


def test_resampled_epochs_have_the_requested_length(shard_dir):
    def epoch(seed):
        loader = make_train_loader(shard_dir, to_tensor, ids, 4, num_workers=0, resampled=True,
                                   samples_per_epoch=40, shuffle_buffer=10, seed=seed)
        assert len(loader) == 10 and loader.samples_per_epoch == 40
        return batch_ids(loader)

    first = epoch(0)
    assert len(first) == 40 and set(first) <= set(range(96))
    assert epoch(0) == first and epoch(1) != first


# --- robustness --------------------------------------------------------------------------------

@pytest.fixture
def broken_shards(tmp_path):
    """[A, C, B, D]: A breaks off inside its 7th image (6 whole samples), C is an empty file,
    B starts with an undecodable image, a sample without caption and one without image, then
    7 good samples; D has 8 good samples."""
    a = write_shard(tmp_path / "a.tar", [sample(i) for i in range(100, 110)])
    with open(a, "rb") as file:
        data = file.read()
    cut = data.index(b"000106.jpg") + 512 + 100  # 100 bytes into the 7th sample's image data
    with open(a, "wb") as file:
        file.write(data[:cut])
    c = tmp_path / "c.tar"
    c.write_bytes(b"")
    bad = [{"__key__": "b0", "jpg": b"\xff\xd8 not a jpeg", "txt": b"sample 900"},
           {"__key__": "b1", "jpg": jpeg(901)},
           {"__key__": "b2", "txt": b"sample 902"}]
    b = write_shard(tmp_path / "b.tar", bad + [sample(i) for i in range(200, 207)])
    d = write_shard(tmp_path / "d.tar", [sample(i) for i in range(300, 308)])
    return [a, str(c), b, d]


def test_corrupt_shards_are_skipped_and_counted_exactly(broken_shards, caplog):
    loader = make_train_loader(broken_shards, to_tensor, ids, 1, num_workers=0, samples_per_epoch=21,
                               shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="dtpclip.data"):
        got = batch_ids(loader)
    assert got == list(range(100, 106)) + list(range(200, 207)) + list(range(300, 308))
    counts = loader.counts.snapshot()
    assert counts.seen == 6 + 10 + 8
    assert counts.skipped == {"missing_image": 1, "missing_caption": 1, "missing_label": 0, "undecodable_image": 1,
                              "unreadable_shard": 1, "truncated_shard": 1}
    assert "epoch 0: skipped 3 of 24 samples seen (missing_image=1, missing_caption=1, undecodable_image=1); " \
           "bad shards: unreadable_shard=1, truncated_shard=1" in caplog.text
    assert "skipping sample 'b0' of" in caplog.text and "c.tar: unreadable_shard" in caplog.text


def test_skip_counts_are_exact_with_worker_processes(broken_shards):
    # worker 0 reads A then B (6 + 3 bad + 2 good), worker 1 reads C then D (8 good)
    loader = make_train_loader(broken_shards, to_tensor, ids, 1, num_workers=2, samples_per_epoch=16,
                               shuffle_buffer=0)
    assert sorted(batch_ids(loader)) == sorted([*range(100, 106), 200, 201, *range(300, 308)])
    counts = loader.counts.snapshot()
    assert (counts.seen, counts.skipped_samples) == (19, 3)
    assert counts.skipped["truncated_shard"] == counts.skipped["unreadable_shard"] == 1


def test_a_tar_cut_anywhere_is_counted_and_keeps_the_samples_before_the_cut(tmp_path):
    path = write_shard(tmp_path / "s.tar", [sample(i) for i in range(5)])
    with open(path, "rb") as file:
        data = file.read()
    everything = [f"{i:06d}" for i in range(5)]
    assert [s.key for s in iter_samples(path)] == everything
    end_of_data = data.rindex(b"sample 4") + len(b"sample 4")  # then only zero padding follows
    for cut in range(100, len(data), 97):  # inside headers, image data, padding, end blocks
        with open(path, "wb") as file:
            file.write(data[:cut])
        counts = SampleCounts()
        keys = [s.key for s in iter_samples(path, counts)]
        got = counts.snapshot()
        assert keys == everything[:len(keys)], cut
        assert got.seen == len(keys) + got.skipped_samples, cut
        if cut < end_of_data:
            assert got.skipped["truncated_shard"] + got.skipped["unreadable_shard"] == 1, cut
        else:
            assert keys == everything, cut


# --- URLs --------------------------------------------------------------------------------------

def test_pipe_and_http_urls_read_like_local_paths(shard_dir):
    local = [s.key for s in iter_samples(str(shard_dir / "{00000..00001}.tar"))]
    assert len(local) == 2 * PER_SHARD
    assert [s.key for s in iter_samples(f"pipe:cat {shard_dir}/{{00000..00001}}.tar")] == local
    handler = functools.partial(QuietHandler, directory=str(shard_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{{00000..00001}}.tar"
        assert [s.key for s in iter_samples(url)] == local
    finally:
        server.shutdown()


def test_the_benchmark_compares_pipelines_that_deliver_the_same_samples(shard_dir):
    benchmark = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "data_throughput.py"),
                               run_name="imported")
    plain = benchmark["plain_webdataset"](str(shard_dir), to_tensor, ids, 4, 0, 10)
    ours = make_train_loader(shard_dir, to_tensor, ids, 4, num_workers=0, shuffle_buffer=10)
    plain_batches = list(itertools.islice(iter(plain), len(ours)))
    assert [b[0].shape for b in plain_batches] == [b[0].shape for b in ours]
    assert sorted(i for _, t in plain_batches for i in t.tolist()) == sorted(batch_ids(ours)) == list(range(96))
