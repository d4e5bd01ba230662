"""The built-in demo dataset: drawn shapes with captions, written as real webdataset shards.

Every entry point defaults to it, so a laptop run reads the same shards, through the same
`dtpclip.data` code, as a LAION run. Scenes are procedural: one of ten shapes (the class) in a
named colour and size, near the centre, on a textured background, with a few small distractors.
Captions are the eval set's templates filled with the class and name nothing else (see
`make_caption` for why), so zero-shot prompts are the captions' own phrasings. The shape is kept
the dominant visual concept (large, high contrast, near the centre; distractors are tiny),
because a tiny CLIP trained for minutes on 2 CPU cores must learn it (README, Design decisions).

Generation is seeded per sample (the same bytes for the same config on any machine), takes
about 25 s on one core for the default 20k + 1k images, and is idempotent: a completion marker
is written last, atomically, so an interrupted run is redone. Concurrent callers (several
ranks) wait on a file lock instead of generating twice.

    python -m dtpclip.demo_data --root DIR      # pre-generate (default: $DTPCLIP_DEMO_DIR or
                                                # ~/.cache/dtpclip/demo)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

ENV_VAR = "DTPCLIP_DEMO_DIR"


@dataclass(frozen=True)
class DemoConfig:
    """What to generate; the marker stores it, and a different config regenerates."""

    num_train: int = field(default=20_000, metadata={"help": "train image-caption samples"})
    num_eval: int = field(default=1_000, metadata={"help": "eval images, class-balanced"})
    image_size: int = field(default=64, metadata={"help": "pixels per side"})
    shard_size: int = field(default=2_000, metadata={"help": "samples per shard"})
    seed: int = field(default=0, metadata={"help": "generation seed"})


def default_root() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "dtpclip" / "demo")


def make_arg_parser() -> argparse.ArgumentParser:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="python -m dtpclip.demo_data", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", default=str(default_root()),
                        help=f"output directory (environment variable {ENV_VAR} sets the default)")
    for option in dataclasses.fields(DemoConfig):
        parser.add_argument(f"--{option.name.replace('_', '-')}", type=int, default=getattr(defaults, option.name),
                            help=option.metadata["help"])
    return parser


# `python -m`: the arguments are parsed here, before the heavy imports below (fast --help)
ARGS = make_arg_parser().parse_args(sys.argv[1:]) if __name__ == "__main__" else None

import fcntl  # noqa: E402  (after the early parse, as every import below)
import io
import json
import math
import shutil
import time
from functools import lru_cache

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from dtpclip.cli import status
from dtpclip.data import export_llava_pretrain
from dtpclip.evalsets import write_wds_evalset

GENERATOR_VERSION = 5
MARKER = "COMPLETE.json"

CLASSNAMES = (
    "circle", "square", "triangle", "star", "cross",
    "heart", "ring", "diamond", "arrow", "crescent",
)
# Zero-shot prompts ({c} as in CLIP_benchmark). "the" before {c} keeps them grammatical for
# every class ("an arrow"), so the same strings can appear verbatim among the train captions.
EVAL_TEMPLATES = (
    "a photo of the {c}.",
    "a drawing of the {c}.",
    "the {c} shape.",
    "a picture of the {c}.",
    "an image of the {c}.",
)
COLOURS = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (240, 215, 40),
    "green": (35, 165, 60), "blue": (35, 85, 220), "purple": (135, 55, 185),
    "pink": (240, 125, 180), "white": (245, 245, 245), "black": (20, 20, 20),
}
SIZES = {"small": (0.40, 0.48), "medium": (0.50, 0.60), "large": (0.62, 0.76)}  # of image side
BACKGROUNDS = ("plain", "striped", "checkered", "dotted", "noisy", "gradient")
CENTRE_JITTER = 0.25  # the shape's centre moves by at most this share of the room it has
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth edges at 64 px


@dataclass(frozen=True)
class DemoPaths:
    """Where the generated demo data lives; `train_shards` is a brace spec for dtpclip.data."""

    root: Path
    train_shards: str
    eval_dir: Path
    llava_json: Path
    llava_images: Path


@dataclass(frozen=True)
class Scene:
    """The attributes one image was drawn with (each train sample's json holds them)."""

    label: int
    colour: str
    size: str
    background: str

    @property
    def shape(self) -> str:
        return CLASSNAMES[self.label]


# ---------------------------------------------------------------------------------------------
# shapes: polygons in unit coordinates (y down), each drawn with fill 255 (ink) or 0 (hole)

def _ngon(n: int, radius: float, centre=(0.0, 0.0), phase: float = -math.pi / 2):
    return [(centre[0] + radius * math.cos(phase + 2 * math.pi * k / n),
             centre[1] + radius * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star():
    return [(r * math.cos(-math.pi / 2 + math.pi * k / 5), r * math.sin(-math.pi / 2 + math.pi * k / 5))
            for k, r in zip(range(10), [1.0, 0.42] * 5)]


def _heart():
    points = []
    for k in range(40):
        t = 2 * math.pi * k / 40
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x / 17, -y / 17 + 0.1))
    return points


_W = 0.3  # half-width of the cross arms
_SHAPES = {
    "circle": [(_ngon(48, 0.9), 255)],
    "square": [([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)], 255)],
    "triangle": [([(0.0, -0.95), (0.95, 0.72), (-0.95, 0.72)], 255)],
    "star": [(_star(), 255)],
    "cross": [([(-_W, -0.9), (_W, -0.9), (_W, -_W), (0.9, -_W), (0.9, _W), (_W, _W), (_W, 0.9),
                (-_W, 0.9), (-_W, _W), (-0.9, _W), (-0.9, -_W), (-_W, -_W)], 255)],
    "heart": [(_heart(), 255)],
    "ring": [(_ngon(48, 0.95), 255), (_ngon(48, 0.58), 0)],
    "diamond": [([(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)], 255)],
    "arrow": [([(-0.95, -0.2), (0.1, -0.2), (0.1, -0.62), (0.95, 0.0), (0.1, 0.62), (0.1, 0.2),
                (-0.95, 0.2)], 255)],
    "crescent": [(_ngon(48, 0.95), 255), (_ngon(48, 0.8, centre=(0.42, -0.12)), 0)],
}
assert tuple(_SHAPES) == CLASSNAMES


def _rotation(shape: str, rng: np.random.Generator) -> float:
    """Small jitter only: a square turned 45 degrees would be a diamond."""
    if shape in ("circle", "ring"):
        return 0.0
    if shape == "crescent":
        return rng.uniform(0, 2 * math.pi)
    jitter = math.radians(rng.uniform(-12, 12))
    if shape == "arrow":
        return jitter + rng.integers(4) * math.pi / 2
    return jitter


def _shape_mask(shape: str, centre, radius: float, angle: float, size: int) -> Image.Image:
    """An antialiased ink mask ('L') of one shape, drawn at 4x and reduced."""
    s = _SUPERSAMPLE
    mask = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(mask)
    cos, sin = math.cos(angle), math.sin(angle)
    for polygon, fill in _SHAPES[shape]:
        points = [((centre[0] + radius * (x * cos - y * sin)) * s,
                   (centre[1] + radius * (x * sin + y * cos)) * s) for x, y in polygon]
        draw.polygon(points, fill=fill)
    return mask.reduce(s)


# ---------------------------------------------------------------------------------------------
# backgrounds and colours

@lru_cache(maxsize=4)
def _grid(size: int):
    return np.mgrid[0:size, 0:size].astype(np.float32)


def _background(kind: str, c1, c2, size: int, rng: np.random.Generator) -> np.ndarray:
    """An HxWx3 float image: two colours mixed by a texture t in [0, 1]."""
    yy, xx = _grid(size)
    if kind in ("plain", "noisy"):
        t = np.zeros_like(xx)
    elif kind == "striped":
        angle = rng.choice([0.0, 0.5, 0.25, 0.75]) * math.pi
        period = rng.uniform(5, 11)
        t = ((xx * math.cos(angle) + yy * math.sin(angle)) // (period / 2)) % 2
    elif kind == "checkered":
        period = rng.integers(6, 14)
        t = ((xx // period) + (yy // period)) % 2
    elif kind == "dotted":
        period, radius = rng.uniform(6, 10), rng.uniform(1.2, 2.2)
        t = (((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2) < radius**2
    else:  # gradient
        angle = rng.uniform(0, 2 * math.pi)
        u = xx * math.cos(angle) + yy * math.sin(angle)
        t = (u - u.min()) / (u.max() - u.min())
    t = t.astype(np.float32)[..., None]
    image = np.asarray(c1, np.float32) * (1 - t) + np.asarray(c2, np.float32) * t
    if kind == "noisy":
        image = image + rng.normal(0, 12, image.shape)
    return image


def _background_colours(ink, rng: np.random.Generator):
    """Two tinted greys, close to each other and far from the shape's colour: the shape is the
    one saturated, high-contrast thing in the image, so even a tiny model segments it early."""
    ink = np.asarray(ink, np.float32)
    for _ in range(50):
        c1 = np.clip(rng.uniform(30, 225) + rng.uniform(-30, 30, 3), 0, 255)
        c2 = np.clip(c1 + rng.uniform(-40, 40) + rng.uniform(-10, 10, 3), 0, 255)
        if min(np.linalg.norm(c1 - ink), np.linalg.norm(c2 - ink)) > 140:
            break
    return c1, c2


def draw_scene(rng: np.random.Generator, size: int, label: int | None = None):
    """Draw one scene; returns (RGB image, Scene). The label is random unless given."""
    label = int(rng.integers(len(CLASSNAMES))) if label is None else label
    shape = CLASSNAMES[label]
    colour = str(rng.choice(list(COLOURS)))
    size_name = str(rng.choice(list(SIZES)))
    background = str(rng.choice(BACKGROUNDS))
    ink = np.clip(np.asarray(COLOURS[colour]) + rng.integers(-15, 16, 3), 0, 255)

    canvas = _background(background, *_background_colours(ink, rng), size, rng)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 3))):  # distractors: small dots and thin strokes
        x, y = rng.uniform(0, size, 2)
        tint = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            r = rng.uniform(0.025, 0.05) * size
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tint)
        else:
            length, angle = rng.uniform(0.1, 0.2) * size, rng.uniform(0, math.pi)
            draw.line([x, y, x + length * math.cos(angle), y + length * math.sin(angle)], fill=tint)

    radius = rng.uniform(*SIZES[size_name]) * size / 2
    slack = (size / 2 - radius) * CENTRE_JITTER
    cx, cy = size / 2 + rng.uniform(-slack, slack, 2)
    mask = _shape_mask(shape, (cx, cy), radius, _rotation(shape, rng), size)
    image.paste(tuple(int(v) for v in ink), (0, 0, size, size), mask)
    return image, Scene(label, colour, size_name, background)


# ---------------------------------------------------------------------------------------------
# captions

# Captions name the shape only: a tiny CLIP matches colours long before shapes (README, Design decisions).


def make_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One of the eval templates, filled with the shape."""
    return str(rng.choice(EVAL_TEMPLATES)).format(c=scene.shape)


# ---------------------------------------------------------------------------------------------
# writing

def _rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split, index])


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "webp":
        image.save(buffer, format="webp", lossless=True)
    else:
        image.save(buffer, format="jpeg", quality=92)
    return buffer.getvalue()


def _write_train_shards(directory: Path, config: DemoConfig) -> list[str]:
    """Shards named like img2dataset's ({shard:05d}.tar, keys {shard:05d}{i:04d}) + sizes.json."""
    directory.mkdir(parents=True)
    names, sizes = [], {}
    for shard, start in enumerate(range(0, config.num_train, config.shard_size)):
        name = f"{shard:05d}.tar"
        stop = min(start + config.shard_size, config.num_train)
        with wds.TarWriter(str(directory / name), encoder=False, mtime=0) as sink:
            for index in range(start, stop):
                rng = _rng(config.seed, 0, index)
                image, scene = draw_scene(rng, config.image_size)
                meta = dataclasses.asdict(scene) | {"shape": scene.shape}
                sink.write({
                    "__key__": f"{shard:05d}{index - start:04d}",
                    "jpg": _encode(image, "jpg"),
                    "txt": make_caption(scene, rng).encode(),
                    "json": json.dumps(meta).encode(),
                })
        names.append(name)
        sizes[name] = stop - start
    (directory / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return names


def _eval_samples(config: DemoConfig):
    """Class-balanced eval images (label = index mod 10), drawn from a separate seed stream."""
    for index in range(config.num_eval):
        label = index % len(CLASSNAMES)
        image, _ = draw_scene(_rng(config.seed, 1, index), config.image_size, label=label)
        yield _encode(image, "webp"), "webp", label


def _paths(root: Path, train_names: list[str]) -> DemoPaths:
    first, last = train_names[0][:-4], train_names[-1][:-4]
    spec = root / "train" / (f"{{{first}..{last}}}.tar" if first != last else f"{first}.tar")
    return DemoPaths(root, str(spec), root / "eval", root / "llava" / "pretrain.json", root / "llava" / "images")


def ensure_demo_data(root: str | os.PathLike | None = None, config: DemoConfig = DemoConfig()) -> DemoPaths:
    """Return the demo data under `root`, generating it first if it is missing or stale."""
    root = Path(root) if root is not None else default_root()
    root.mkdir(parents=True, exist_ok=True)
    wanted = {"version": GENERATOR_VERSION, **dataclasses.asdict(config)}
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second rank waits here, then finds the marker
        marker = root / MARKER
        if marker.exists():
            done = json.loads(marker.read_text())
            if done["config"] == wanted:
                return _paths(root, done["train_shards"])
            marker.unlink()
        for stale in ("train", "eval", "llava", ".partial"):
            shutil.rmtree(root / stale, ignore_errors=True)

        status(f"generating the demo data into {root} ({config.num_train} train + {config.num_eval} eval images, "
               f"about {max(1, round(25 * (config.num_train + config.num_eval) / 21000))} s a core; once per machine)")
        partial = root / ".partial"
        train_names = _write_train_shards(partial / "train", config)
        write_wds_evalset(partial / "eval", _eval_samples(config), CLASSNAMES, EVAL_TEMPLATES,
                          shard_size=config.shard_size)
        staged = _paths(partial, train_names)
        export_llava_pretrain(staged.train_shards, partial / "llava", json_name=staged.llava_json.name)
        for part in ("train", "eval", "llava"):
            (partial / part).rename(root / part)
        partial.rmdir()
        tmp = root / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"config": wanted, "train_shards": train_names}, indent=1))
        os.replace(tmp, marker)  # written last: its presence means everything above is complete
    return _paths(root, train_names)


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> None:
    args = vars(args or make_arg_parser().parse_args(argv))
    root = args.pop("root")
    start = time.perf_counter()
    paths = ensure_demo_data(root, DemoConfig(**args))
    print(f"demo data ready in {time.perf_counter() - start:.1f} s")
    for option in dataclasses.fields(paths):
        print(f"  {option.name}: {getattr(paths, option.name)}")


if __name__ == "__main__":
    main(args=ARGS)
