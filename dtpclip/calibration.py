"""Calibration images for the transforms that calibrate (PTQ): a seeded pick from an eval set or shards."""
import itertools
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
from torch.utils.data import Dataset, IterableDataset

from dtpclip.data import iter_samples
from dtpclip.evalsets import CLASSNAMES_FILE, load_eval_set
from dtpclip.evaluate import demo_eval_dir
from dtpclip.registry import parse_transform, transform_info


def _pick(stream, count: int, generator: torch.Generator) -> list:
    """A seeded pick of `count` among the first 8 x count items of a stream."""
    pool = list(itertools.islice(stream, 8 * count))
    return [pool[int(i)] for i in torch.randperm(len(pool), generator=generator)[:count]]


def calibration_images(source, preprocess: Callable, count: int = 32, split: str = "test",
                       seed: int = 0) -> torch.Tensor:
    """`count` preprocessed images [count, 3, H, W]: a seeded random pick from an eval-set directory, or
    from train shards (a dtpclip.data spec: brace pattern, list, a directory of .tar files without an eval
    set's classnames.txt); among the first 8 x count images where they stream (shards, class-sorted wds sets)."""
    if count < 1:
        raise ValueError(f"--calib-images must be at least 1, got {count}")
    generator = torch.Generator().manual_seed(seed)
    path = Path(str(source)).expanduser()
    if path.is_dir() and ((path / CLASSNAMES_FILE).is_file() or not any(path.glob("*.tar"))):
        dataset: Dataset = load_eval_set(path, preprocess, split).dataset
        if isinstance(dataset, IterableDataset):
            images = _pick((image for image, _ in dataset), count, generator)
        else:
            images = [dataset[int(i)][0] for i in torch.randperm(len(dataset), generator=generator)[:count]]
    else:
        images = _pick((preprocess(s.image.convert("RGB")) for s in iter_samples(str(source))), count, generator)
    if not images:
        raise ValueError(f"--calib-data {str(source)!r} has no images (expected an eval-set directory or shards)")
    return torch.stack(images)


def default_calibration_source() -> Path:
    """The demo's train shards."""
    return demo_eval_dir().parent / "train"


def calibration_batches(specs: Sequence, source, preprocess: Callable, count: int = 32, batch_size: int = 16,
                        device="cpu", split: str = "test", seed: int = 0) -> Optional[List[torch.Tensor]]:
    """Calibration image batches when one of the transform `specs` calibrates, else None (nothing read)."""
    if not any(transform_info(parse_transform(s).name).calibration for s in specs):
        return None
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    images = calibration_images(source or default_calibration_source(), preprocess, count, split, seed)
    return [b.to(device) for b in images.split(batch_size)]
