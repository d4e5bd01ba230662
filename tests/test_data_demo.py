"""dtpclip.demo_data: the built-in demo dataset (train shards, eval set, LLaVA export)."""

import collections
import hashlib
import json
import multiprocessing
import re
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from dtpclip.data import iter_samples, make_train_loader
from dtpclip.demo_data import (
    BACKGROUNDS, CLASSNAMES, COLOURS, EVAL_TEMPLATES, MARKER, SIZES, DemoConfig, ensure_demo_data, main,
)
from dtpclip.evalsets import load_eval_set

SMALL = DemoConfig(num_train=400, num_eval=60, shard_size=100)


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in (".lock", MARKER)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_data(tmp_path_factory.mktemp("demo"), SMALL)


@pytest.fixture(scope="module")
def samples(demo):
    return list(iter_samples(demo.train_shards))


def test_generation_is_deterministic(demo, tmp_path):
    again = ensure_demo_data(tmp_path / "again", SMALL)
    assert digests(again.root) == digests(demo.root)
    assert len(digests(demo.root)) > 400  # shards, eval files, llava json and images


def test_generated_once_in_the_directory_the_environment_names(demo, monkeypatch):
    monkeypatch.setenv("DTPCLIP_DEMO_DIR", str(demo.root))
    stamps = {p: p.stat().st_mtime_ns for p in demo.root.rglob("*.tar")}
    assert ensure_demo_data(config=SMALL) == demo
    assert {p: p.stat().st_mtime_ns for p in demo.root.rglob("*.tar")} == stamps


def test_interrupted_or_stale_generation_is_redone(demo, tmp_path):
    root = tmp_path / "demo"
    ensure_demo_data(root, SMALL)
    (root / MARKER).unlink()  # as if killed before the marker was written
    shard = root / "train" / "00000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    ensure_demo_data(root, SMALL)
    assert digests(root) == digests(demo.root)
    other = ensure_demo_data(root, DemoConfig(num_train=200, num_eval=20, shard_size=100, seed=1))
    assert json.loads((root / MARKER).read_text())["config"]["seed"] == 1
    assert other.train_shards.endswith("{00000..00001}.tar")
    assert digests(root) != digests(demo.root)


def _generate(root, queue):
    queue.put(ensure_demo_data(root, SMALL).train_shards)


def test_concurrent_callers_share_one_generation(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_generate, args=(tmp_path / "demo", queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert queue.get() == queue.get() == str(tmp_path / "demo" / "train" / "{00000..00003}.tar")
    assert len(list((tmp_path / "demo" / "train").glob("*.tar"))) == 4


def test_every_caption_names_its_class(samples):
    assert len(samples) == SMALL.num_train
    for s in samples:
        assert s.meta["shape"] in re.findall(r"\w+", s.caption), s.caption
        assert s.image.size == (64, 64)


def test_eval_prompts_are_in_the_caption_vocabulary(samples):
    captions = [s.caption for s in samples]
    caption_words = {w for c in captions for w in re.findall(r"\w+", c)}
    prompt_words = {w for t in EVAL_TEMPLATES for name in CLASSNAMES for w in re.findall(r"\w+", t.format(c=name))}
    assert prompt_words <= caption_words
    for template in EVAL_TEMPLATES:  # each prompt form also appears verbatim as a caption
        assert any(template.format(c=s.meta["shape"]) == s.caption for s in samples), template


def test_scenes_vary_in_colour_size_and_background_and_captions_name_only_the_shape(samples):
    def histogram(field):
        return collections.Counter(s.meta[field] for s in samples)

    assert set(histogram("colour")) == set(COLOURS)
    assert set(histogram("size")) == set(SIZES)
    assert set(histogram("background")) == set(BACKGROUNDS)
    assert set(histogram("shape")) == set(CLASSNAMES) and min(histogram("shape").values()) >= 20
    attribute_words = set(COLOURS) | set(SIZES) | set(BACKGROUNDS)
    assert not any(attribute_words & set(re.findall(r"\w+", s.caption)) for s in samples)


def test_eval_set_is_class_balanced_in_clip_benchmark_layout(demo):
    assert (demo.eval_dir / "test" / "nshards.txt").read_text().strip() == "1"
    with tarfile.open(demo.eval_dir / "test" / "0.tar") as tar:
        assert set(tar.getnames()[:2]) == {"s0000000.webp", "s0000000.cls"}
    evalset = load_eval_set(demo.eval_dir, to_tensor)
    assert evalset.layout == "wds"
    assert (evalset.classnames, evalset.templates) == (list(CLASSNAMES), list(EVAL_TEMPLATES))
    labels = collections.Counter(label for image, label in evalset.dataset)
    assert labels == {label: SMALL.num_eval // 10 for label in range(10)}


def test_demo_shards_feed_the_train_loader_with_open_clip_transforms(demo):
    loader = make_train_loader(demo.train_shards, open_clip.image_transform(64, is_train=True),
                               open_clip.tokenize, 32, num_workers=2)
    assert len(loader) == 12  # 400 samples // (32 x 2 workers) = 6 per worker
    images, tokens = next(iter(loader))
    assert images.shape == (32, 3, 64, 64) and tokens.shape == (32, 77)
    tokenizer = open_clip.SimpleTokenizer()
    texts = [tokenizer.decode([t for t in row.tolist() if t not in (0, 49406, 49407)]) for row in tokens]
    assert all(any(name in text for name in CLASSNAMES) for text in texts)


def test_llava_export_pairs_each_image_with_its_caption(demo, samples):
    records = json.loads(demo.llava_json.read_text())
    assert len(records) == SMALL.num_train
    by_key = {s.key: s for s in samples}
    for record in records:
        human, gpt = record["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].count("<image>") == 1
        assert gpt["value"] == by_key[record["id"]].caption
        assert (demo.llava_images / record["image"]).read_bytes() == by_key[record["id"]].image_bytes


def test_cli_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "DTPCLIP_DEMO_DIR" in out and "(default: 20000)" in out and "(default: 64)" in out
