"""python -m dtpclip.visualize: DTP segments and ToMe / LGTM merge groups drawn over the input images.

DTP (as in the DRIP / DTP-ViT figures): the boundary predictor's hard boundaries on the patch
grid; a segment is a run of patches in raster order closed by a boundary (segment ids are the
exclusive cumsum of the boundaries, as `segment_pool` uses them). ToMe / LGTM (as in ToMe's
tome/vis.py, github.com/facebookresearch/ToMe): every patch belongs to the merged token whose
`source` holds it. Each group is tinted and outlined in its own colour, with the count of groups
in its panel's title; a DTP picture adds a panel with the boundary patches tinted red. One PNG per
image and method:

    python -m dtpclip.visualize --model dtp_vit_base_patch32_224_10x --checkpoint ckpt.safetensors \
        --images a.jpg b.jpg --out vis/
    python -m dtpclip.visualize --model plain_vit_base_patch16_224 --transform tome:r=13 --images a.jpg --out vis/
"""
from dtpclip.cli import add_model_kwargs, add_transform, early_args, make_parser, parse_args, run_main


def make_arg_parser():
    parser = make_parser(__doc__.splitlines()[0], "python -m dtpclip.visualize")
    parser.add_argument("--model", required=True, help="registry encoder name (dtp_vit_*, plain_vit_*, ...)")
    parser.add_argument("--checkpoint", default=None, help="CLIP or encoder weights on disk")
    add_model_kwargs(parser)
    add_transform(parser)
    parser.add_argument("--images", nargs="+", required=True, help="image files")
    parser.add_argument("--out", required=True, help="output folder for the PNGs")
    parser.add_argument("--display-size", type=int, default=448, help="PNG panel height (nearest upscaling)")
    return parser


# `python -m`: the arguments are parsed here, before the heavy imports below (fast --help)
ARGS = early_args(make_arg_parser, __name__)

from pathlib import Path  # noqa: E402  (after the early parse, as every import below)
from typing import List, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from dtpclip.factory import apply_transforms, create_encoder
from dtpclip.registry import encoder_info, parse_transform


def _palette(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.15, 1.0, size=(max(n, 1), 3))


def draw_groups(image: np.ndarray, groups: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Each group of patches tinted with its own colour over the image (so two large merged regions stay
    apart), its outline in that colour at full strength.

    image [H, W, 3] floats in [0, 1]; groups [h, w] ints on the patch grid (H, W multiples of h, w).
    """
    height, width, _ = image.shape
    labels = np.unique(groups, return_inverse=True)[1].reshape(groups.shape)
    pixels = labels.repeat(height // labels.shape[0], 0).repeat(width // labels.shape[1], 1)
    colours = _palette(labels.max() + 1)[pixels]
    out = (1 - alpha) * image + alpha * colours
    edge = np.zeros(pixels.shape, dtype=bool)
    edge[:-1] |= pixels[:-1] != pixels[1:]
    edge[1:] |= pixels[:-1] != pixels[1:]
    edge[:, :-1] |= pixels[:, :-1] != pixels[:, 1:]
    edge[:, 1:] |= pixels[:, :-1] != pixels[:, 1:]
    out[edge] = colours[edge]
    return out


def draw_boundaries(image: np.ndarray, boundaries: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The boundary mask on the patch grid: boundary patches tinted red over the image."""
    height, width, _ = image.shape
    mask = boundaries.astype(bool).repeat(height // boundaries.shape[0], 0).repeat(width // boundaries.shape[1], 1)
    out = image.copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.array([1.0, 0.0, 0.0])
    return out


def save_figure(panels: Sequence[np.ndarray], titles: Sequence[str], title: str, path, display_size: int) -> Path:
    """Panels side by side, each with its title, under `title`; the titles are also the PNG's metadata
    ('Title', and 'Description' joined by ' | '), so a reader (or a test) finds them without the picture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inches = display_size / 100
    fig, axes = plt.subplots(1, len(panels), figsize=(inches * len(panels), inches + 0.7), dpi=100, squeeze=False)
    for ax, panel, panel_title in zip(axes[0], panels, titles):
        ax.imshow(np.clip(panel, 0, 1), interpolation="nearest")
        ax.set_title(panel_title, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Title": title, "Description": " | ".join(titles)})
    plt.close(fig)
    return Path(path)


def load_images(paths: Sequence[str], model: torch.nn.Module):
    """(model inputs [B, 3, H, W], the same crops as [B, H, W, 3] floats for drawing), by timm's eval transform."""
    config = resolve_data_config(model=model)
    transform = create_transform(**config, is_training=False)
    mean, std = torch.tensor(config["mean"]).view(3, 1, 1), torch.tensor(config["std"]).view(3, 1, 1)
    inputs = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {str(path)!r} does not exist")
        with Image.open(path) as img:
            inputs.append(transform(img.convert("RGB")))
    inputs = torch.stack(inputs)
    shown = (inputs * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return inputs, shown


def render(model: torch.nn.Module, paths: Sequence[str], out_dir, transforms: Sequence = (),
           display_size: int = 448) -> List[Path]:
    """Write `<image stem>_<label>.png` for each image into `out_dir` (label: the last transform's name, else
    the encoder's family): the input, the encoder's token groups (its contract's `token_groups`) with their
    count, and boundary patches where the encoder has them, after applying the training-free `transforms`
    to `model` in place; returns the paths."""
    stems = [Path(p).stem for p in paths]
    clashing = sorted({stem for stem in stems if stems.count(stem) > 1})
    if clashing:
        raise ValueError(f"images {[str(p) for p in paths if Path(p).stem in clashing]} share the file stem "
                         f"{clashing[0]!r}: their pictures would overwrite each other in {str(out_dir)!r}")
    model = model.eval()
    specs = apply_transforms(model, transforms)
    architecture = model.pretrained_cfg["architecture"]
    label = specs[-1].name if specs else encoder_info(architecture).family
    inputs, shown = load_images(paths, model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups, boundaries = model.token_groups(inputs)
    patches = groups[0].numel()
    written = []
    for i, path in enumerate(paths):
        count = len(np.unique(groups[i].cpu().numpy()))
        panels = [shown[i], draw_groups(shown[i], groups[i].cpu().numpy())]
        titles = ["input", f"{count} token groups of {patches} patches (one colour each)"]
        if boundaries is not None:
            panels.append(draw_boundaries(shown[i], boundaries[i].cpu().numpy()))
            titles.append(f"red: the {int(boundaries[i].sum())} patches that close a segment")
        title = " ".join([architecture, *map(str, specs)]) + f": {Path(path).name}"
        written.append(save_figure(panels, titles, title, out_dir / f"{Path(path).stem}_{label}.png", display_size))
    return written


def main(argv=None, args=None) -> List[Path]:
    args = args or parse_args(make_arg_parser(), argv)
    for spec in args.transforms:
        parse_transform(spec)  # a bad spec fails before the model is built
    model = create_encoder(args.model, checkpoint=args.checkpoint, **args.model_kwargs)
    written = render(model, args.images, args.out, args.transforms, args.display_size)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    run_main(main, args=ARGS)
