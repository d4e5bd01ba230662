"""Classification eval sets for zero-shot and probes: CLIP_benchmark's webdataset layout and
ImageFolder, read the same way (image tensor, class index) with class names and templates.

wds layout, as CLIP_benchmark's `build_wds_dataset` reads and `clip_benchmark_export_wds`
writes it (LAION-AI/CLIP_benchmark, clip_benchmark/datasets/builder.py, webdataset_builder.py):

    root/{split}/0.tar ... {n-1}.tar   samples {key}.webp|png|jpg + {key}.cls (class index as text)
    root/{split}/nshards.txt           n
    root/classnames.txt                one class name per line, in class-index order
    root/zeroshot_classification_templates.txt   one prompt per line, "{c}" marks the class

ImageFolder layout (torchvision): root/{split}/<class folder>/<image>, classes in sorted
folder order; classnames.txt / templates beside it are optional (folder names and
DEFAULT_TEMPLATES otherwise). Without a {split} folder, root itself holds the data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset, IterableDataset
from torchvision.datasets import ImageFolder

from dtpclip.data import SampleCounts, decode_image, image_extension, read_shard, sample_name

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DEFAULT_TEMPLATES = ("a photo of a {c}.",)


@dataclass
class EvalSet:
    """A dataset of (image tensor, class index) with what zero-shot needs to build classifiers.
    `counts` holds the samples skipped while reading (wds layout; None for ImageFolder)."""

    dataset: Dataset
    classnames: list[str]
    templates: list[str]
    layout: str
    counts: SampleCounts | None = None

    def prompts(self) -> list[list[str]]:
        """For each class, its templates filled in ("{c}", or open_clip's "{}")."""
        return [[t.replace("{c}", name).replace("{}", name) for t in self.templates] for name in self.classnames]


class WdsEvalDataset(IterableDataset):
    """(image tensor, class index) from .cls shards; DataLoader workers split the shards."""

    def __init__(self, urls: Sequence[str], preprocess: Callable, counts: SampleCounts):
        super().__init__()
        self.urls, self.preprocess, self.counts = list(urls), preprocess, counts

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        urls = self.urls[info.id::info.num_workers] if info else self.urls
        for url in urls:
            for sample in read_shard(url, self.counts):
                where = sample_name(sample["__key__"], url)
                ext = image_extension(sample)
                if ext is None:
                    self.counts.skip("missing_image", where)
                elif "cls" not in sample:
                    self.counts.skip("missing_label", where)
                elif (image := decode_image(sample[ext], self.counts, where)) is not None:
                    yield self.preprocess(image), int(sample["cls"])


def _read_lines(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _wds_shards(data_dir: Path) -> list[str]:
    nshards = data_dir / "nshards.txt"
    if nshards.is_file():  # CLIP_benchmark names shards 0.tar .. n-1.tar
        return [str(data_dir / f"{i}.tar") for i in range(int(nshards.read_text()))]
    return sorted(str(p) for p in data_dir.glob("*.tar"))


def load_eval_set(root: str | os.PathLike, preprocess: Callable[[Image.Image], torch.Tensor],
                  split: str = "test") -> EvalSet:
    """The eval set under `root`, in whichever layout it is (see the module docstring)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"eval set {root} does not exist")
    data_dir = root / split if (root / split).is_dir() else root
    classnames, templates = _read_lines(root / CLASSNAMES_FILE), _read_lines(root / TEMPLATES_FILE)
    templates = templates or list(DEFAULT_TEMPLATES)
    if shards := _wds_shards(data_dir):
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f"eval set {root}: {len(missing)} shard(s) named by nshards.txt are missing "
                                    f"({missing[0]}, ...)")
        if not classnames:
            raise ValueError(f"eval set {root} has shards but no {CLASSNAMES_FILE} (one class name per line)")
        counts = SampleCounts()
        return EvalSet(WdsEvalDataset(shards, preprocess, counts), classnames, templates, "wds", counts)
    if not any(p.is_dir() for p in data_dir.iterdir()):
        raise ValueError(f"eval set {root} is neither a webdataset eval set ({split}/*.tar + {CLASSNAMES_FILE}) "
                         "nor an ImageFolder (one folder of images per class)")
    dataset = ImageFolder(str(data_dir), transform=preprocess)
    if classnames is None:
        classnames = [name.replace("_", " ") for name in dataset.classes]
    elif len(classnames) != len(dataset.classes):
        raise ValueError(f"eval set {root}: {CLASSNAMES_FILE} lists {len(classnames)} names for "
                         f"{len(dataset.classes)} class folders")
    return EvalSet(dataset, classnames, templates, "imagefolder")


def write_metadata(root: str | os.PathLike, classnames: Sequence[str], templates: Sequence[str]) -> None:
    """classnames.txt and the templates file, shared by both layouts."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / CLASSNAMES_FILE).write_text("".join(f"{name}\n" for name in classnames))
    (root / TEMPLATES_FILE).write_text("".join(f"{t}\n" for t in templates))


def write_wds_evalset(root: str | os.PathLike, samples: Iterable[tuple[bytes, str, int]],
                      classnames: Sequence[str], templates: Sequence[str], *, split: str = "test",
                      shard_size: int = 10_000) -> int:
    """Write (image bytes, extension, class index) samples in CLIP_benchmark's wds layout;
    returns the number of samples written. Keys are s0000000, s0000001, ... as theirs."""
    data_dir = Path(root) / split
    data_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    with wds.ShardWriter(str(data_dir / "%d.tar"), maxcount=shard_size, verbose=0, encoder=False, mtime=0) as sink:
        for count, (data, ext, label) in enumerate(samples, start=1):
            sink.write({"__key__": f"s{count - 1:07d}", ext: data, "cls": str(int(label)).encode()})
        nshards = sink.shard
    if count == 0:
        raise ValueError(f"no samples to write to eval set {root}")
    (data_dir / "nshards.txt").write_text(f"{nshards}\n")
    write_metadata(root, classnames, templates)
    return count
