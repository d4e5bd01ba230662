"""ImageNet val -> an eval set that dtpclip's evaluators read (dtpclip.evalsets.load_eval_set).

Input, either
  * val in ImageFolder layout: VAL/n01440764/ILSVRC2012_val_00000293.JPEG ... (what the usual
    valprep.sh makes), or
  * the flat val folder plus --labels-csv LOC_val_solution.csv (Kaggle's ImageNet release:
    "ImageId,PredictionString" rows, the wnid first in PredictionString).
Class indices follow sorted wnid order, ImageNet's own. With the 1000 ImageNet wnids the class
names and the 80 prompt templates are open_clip's (IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES);
other folders keep their names and get "a photo of a {c}.".

Output layouts (--layout):
  wds          CLIP_benchmark's webdataset layout: OUT/test/{0..n-1}.tar ({key}.jpg + {key}.cls),
               OUT/test/nshards.txt, OUT/classnames.txt, OUT/zeroshot_classification_templates.txt
  imagefolder  OUT/test/<wnid>/<image> (symbolic links unless --copy) + the same two text files
Image bytes are never re-encoded.
"""

import argparse
import csv
import os
import shutil
from pathlib import Path

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from dtpclip.evalsets import write_metadata, write_wds_evalset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def labelled_images(val: Path, labels_csv: Path | None) -> list[tuple[Path, str]]:
    """(image path, wnid) pairs, sorted by wnid then file name."""
    if labels_csv is None:
        pairs = [(image, folder.name) for folder in val.iterdir() if folder.is_dir()
                 for image in folder.iterdir() if image.suffix.lower() in IMAGE_SUFFIXES]
    else:
        with open(labels_csv, newline="") as file:
            rows = list(csv.DictReader(file))
        pairs = []
        for row in rows:
            matches = [p for p in val.glob(row["ImageId"] + ".*") if p.suffix.lower() in IMAGE_SUFFIXES]
            if not matches:
                raise FileNotFoundError(f"{labels_csv} names {row['ImageId']!r}, which is not an image in {val}")
            pairs.append((matches[0], row["PredictionString"].split()[0]))
    if not pairs:
        raise ValueError(f"no images found in {val}: expected class folders of images, or --labels-csv")
    return sorted(pairs, key=lambda pair: (pair[1], pair[0].name))


def names_and_templates(wnids: list[str]) -> tuple[list[str], list[str]]:
    if len(wnids) == len(IMAGENET_CLASSNAMES):
        return list(IMAGENET_CLASSNAMES), [template("{c}") for template in OPENAI_IMAGENET_TEMPLATES]
    return wnids, ["a photo of a {c}."]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--val", type=Path, required=True, help="ImageNet val folder")
    parser.add_argument("--out", type=Path, required=True, help="eval set folder to write")
    parser.add_argument("--layout", choices=["wds", "imagefolder"], default="wds")
    parser.add_argument("--labels-csv", type=Path, default=None, help="for a flat val folder")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per .tar (wds)")
    parser.add_argument("--copy", action="store_true", help="copy images instead of linking (imagefolder)")
    args = parser.parse_args(argv)

    pairs = labelled_images(args.val, args.labels_csv)
    wnids = sorted({wnid for _, wnid in pairs})
    classnames, templates = names_and_templates(wnids)
    index = {wnid: i for i, wnid in enumerate(wnids)}
    if args.layout == "wds":
        samples = ((path.read_bytes(), path.suffix.lower().lstrip(".").replace("jpeg", "jpg"), index[wnid])
                   for path, wnid in pairs)
        write_wds_evalset(args.out, samples, classnames, templates, shard_size=args.shard_size)
    else:
        for path, wnid in pairs:
            target = args.out / "test" / wnid / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if args.copy:
                shutil.copyfile(path, target)
            else:
                os.symlink(path.resolve(), target)
        write_metadata(args.out, classnames, templates)
    print(f"{len(pairs)} images of {len(wnids)} classes -> {args.out} ({args.layout})")


if __name__ == "__main__":
    main()
