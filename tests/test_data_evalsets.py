"""dtpclip.evalsets and data/imagenet_to_evalset.py: both eval layouts read the same way."""

import collections
import csv
import io
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image

from dtpclip.evalsets import EvalSet, load_eval_set, write_wds_evalset

SCRIPT = runpy.run_path(str(Path(__file__).parents[1] / "data" / "imagenet_to_evalset.py"), run_name="imported")
WNIDS = ["n01440764", "n01443537", "n01484850"]


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255


def jpeg(seed: int, size=(20, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def imagenet_val(tmp_path):
    """A tiny val in ImageFolder layout: 3 wnids x 3 images (ImageNet's file names)."""
    val = tmp_path / "val"
    for c, wnid in enumerate(WNIDS):
        (val / wnid).mkdir(parents=True)
        for i in range(3):
            (val / wnid / f"ILSVRC2012_val_{10 * i + c:08d}.JPEG").write_bytes(jpeg(10 * c + i))
    return val


def read_all(evalset: EvalSet) -> list[tuple[torch.Tensor, int]]:
    return [(image, int(label)) for image, label in evalset.dataset]


def test_imagenet_val_converts_to_both_layouts_which_read_the_same(imagenet_val, tmp_path):
    SCRIPT["main"](["--val", str(imagenet_val), "--out", str(tmp_path / "wds"), "--layout", "wds"])
    SCRIPT["main"](["--val", str(imagenet_val), "--out", str(tmp_path / "folder"), "--layout", "imagefolder"])
    as_wds, as_folder = load_eval_set(tmp_path / "wds", to_tensor), load_eval_set(tmp_path / "folder", to_tensor)
    assert (as_wds.layout, as_folder.layout) == ("wds", "imagefolder")
    assert as_wds.classnames == as_folder.classnames == WNIDS
    assert as_wds.templates == as_folder.templates == ["a photo of a {c}."]
    from_wds, from_folder = read_all(as_wds), read_all(as_folder)
    assert [label for _, label in from_wds] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [label for _, label in from_folder] == [label for _, label in from_wds]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(from_wds, from_folder))  # bytes not re-encoded


def test_flat_val_with_kaggle_labels_csv(imagenet_val, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = []
    for image in sorted(imagenet_val.rglob("*.JPEG")):
        (flat / image.name).write_bytes(image.read_bytes())
        rows.append({"ImageId": image.stem, "PredictionString": f"{image.parent.name} 1 2 3 4"})
    with open(tmp_path / "LOC_val_solution.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["ImageId", "PredictionString"])
        writer.writeheader()
        writer.writerows(rows)
    SCRIPT["main"](["--val", str(flat), "--out", str(tmp_path / "out"),
                    "--labels-csv", str(tmp_path / "LOC_val_solution.csv")])
    labels = collections.Counter(label for _, label in read_all(load_eval_set(tmp_path / "out", to_tensor)))
    assert labels == {0: 3, 1: 3, 2: 3}


def test_the_1000_imagenet_classes_get_open_clip_names_and_templates():
    names, templates = SCRIPT["names_and_templates"]([f"n{i:08d}" for i in range(1000)])
    assert names == list(IMAGENET_CLASSNAMES) and names[0] == "tench"
    assert len(templates) == 80 and templates[0] == "a bad photo of a {c}." and all("{c}" in t for t in templates)


def test_wds_eval_shards_split_across_workers_and_skips_are_counted(tmp_path):
    samples = [(jpeg(i), "jpg", i % 4) for i in range(10)] + [(b"not an image", "jpg", 0)]
    assert write_wds_evalset(tmp_path, samples, ["a", "b", "c", "d"], ["{c}"], shard_size=4) == 11
    assert (tmp_path / "test" / "nshards.txt").read_text() == "3\n"
    with wds.TarWriter(str(tmp_path / "test" / "2.tar"), encoder=False) as sink:  # rewrite the last shard
        sink.write({"__key__": "s0000008", "jpg": jpeg(8), "cls": b"0"})
        sink.write({"__key__": "s0000009", "jpg": jpeg(9)})  # no label
        sink.write({"__key__": "s0000010", "jpg": b"not an image", "cls": b"0"})
    evalset = load_eval_set(tmp_path, to_tensor)
    loader = torch.utils.data.DataLoader(evalset.dataset, batch_size=3, num_workers=2)
    labels = sorted(label for _, batch in loader for label in batch.tolist())
    assert labels == sorted([i % 4 for i in range(8)] + [0])
    counts = evalset.counts.snapshot()
    assert (counts.seen, counts.skipped["missing_label"], counts.skipped["undecodable_image"]) == (11, 1, 1)


def test_prompts_fill_either_placeholder_style():
    evalset = EvalSet(dataset=[], classnames=["cat", "dog"], templates=["a {c}.", "the {}!"], layout="wds")
    assert evalset.prompts() == [["a cat.", "the cat!"], ["a dog.", "the dog!"]]


def test_bad_eval_sets_are_errors_naming_the_input(tmp_path, imagenet_val):
    with pytest.raises(FileNotFoundError, match="eval set .*nowhere does not exist"):
        load_eval_set(tmp_path / "nowhere", to_tensor)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is neither a webdataset eval set .* nor an ImageFolder"):
        load_eval_set(tmp_path / "empty", to_tensor)
    write_wds_evalset(tmp_path / "nonames", [(jpeg(0), "jpg", 0)], ["x"], ["{c}"])
    (tmp_path / "nonames" / "classnames.txt").unlink()
    with pytest.raises(ValueError, match="nonames has shards but no classnames.txt"):
        load_eval_set(tmp_path / "nonames", to_tensor)
    (imagenet_val / "classnames.txt").write_text("tench\ngoldfish\n")
    with pytest.raises(ValueError, match="classnames.txt lists 2 names for 3 class folders"):
        load_eval_set(imagenet_val, to_tensor)
