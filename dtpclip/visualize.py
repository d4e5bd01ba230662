"""python -m dtpclip.visualize: DTP segments and ToMe / LGTM merge groups drawn over the input images.

DTP (as in the DRIP / DTP-ViT figures): the boundary predictor's hard boundaries on the patch
grid; a segment is a run of patches in raster order closed by a boundary (segment ids are the
exclusive cumsum of the boundaries, as `segment_pool` uses them). ToMe / LGTM (as in ToMe's
tome/vis.py, github.com/facebookresearch/ToMe): every patch belongs to the merged token whose
`source` holds it. Each group is filled with its mean colour and outlined in its own colour; a
DTP picture adds a panel with the boundary patches tinted red. One PNG per image and method:

    python -m dtpclip.visualize --model dtp_vit_base_patch32_224_10x --checkpoint ckpt.safetensors \
        --images a.jpg b.jpg --out vis/
    python -m dtpclip.visualize --model plain_vit_base_patch16_224 --method tome --r 13 --images a.jpg --out vis/
"""
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from dtpclip.cli import make_parser, parse_args
from dtpclip.encoders.dtp import DTPViT
from dtpclip.encoders.merge import apply_lgtm, apply_tome, find_vit
from dtpclip.registry import create_encoder

METHODS = ("dtp", "tome", "lgtm")


def segment_ids(boundaries: torch.Tensor) -> torch.Tensor:
    """boundaries [B, L] in {0, 1} -> segment id of each patch [B, L] (a boundary closes its segment)."""
    boundaries = boundaries.long()
    return boundaries.cumsum(-1) - boundaries


@torch.no_grad()
def dtp_groups(model: DTPViT, images: torch.Tensor):
    """(segment id per patch [B, H, W], boundaries [B, H, W]) of a DTP-ViT on `images`."""
    if not isinstance(model, DTPViT):
        raise TypeError(f"DTP segments need a DTP-ViT (dtp_vit_*), got {type(model).__name__}")
    _, _, boundaries = model.forward_pooled(images)
    grid = tuple(model.patch_embed.grid_size)
    return segment_ids(boundaries).view(-1, *grid), boundaries.view(-1, *grid)


@torch.no_grad()
def merge_groups(model: torch.nn.Module, images: torch.Tensor, method: str = "tome", r=8,
                 dense_layers: int = 2, local_layers: int = 2) -> torch.Tensor:
    """Merged token holding each patch [B, H, W], after patching `model` in place with ToMe or LGTM."""
    if method == "tome":
        vit = apply_tome(model, r, trace_source=True)
    elif method == "lgtm":
        vit = apply_lgtm(model, r, dense_layers, local_layers, trace_source=True)
    else:
        raise ValueError(f"merge method must be 'tome' or 'lgtm', got {method!r}")
    vit(images)
    info = vit._tome_info
    grid = tuple(vit.patch_embed.grid_size)
    if info["source"] is None:  # nothing merged: every patch its own token
        return torch.arange(grid[0] * grid[1]).expand(len(images), -1).reshape(-1, *grid)
    patches = info["source"][..., int(info["class_token"]):]  # [B, N, H*W]
    return patches.argmax(1).view(-1, *grid).cpu()


def _palette(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.15, 1.0, size=(max(n, 1), 3))


def draw_groups(image: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """ToMe-style picture: each group of patches filled with its mean colour, outlined in its own colour.

    image [H, W, 3] floats in [0, 1]; groups [h, w] ints on the patch grid (H, W multiples of h, w).
    """
    height, width, _ = image.shape
    labels = np.unique(groups, return_inverse=True)[1].reshape(groups.shape)
    pixels = labels.repeat(height // labels.shape[0], 0).repeat(width // labels.shape[1], 1)
    count = labels.max() + 1
    sums = np.zeros((count, 3))
    np.add.at(sums, pixels.ravel(), image.reshape(-1, 3))
    mean = sums / np.bincount(pixels.ravel(), minlength=count)[:, None]
    out = mean[pixels]
    edge = np.zeros(pixels.shape, dtype=bool)
    edge[:-1] |= pixels[:-1] != pixels[1:]
    edge[1:] |= pixels[:-1] != pixels[1:]
    edge[:, :-1] |= pixels[:, :-1] != pixels[:, 1:]
    edge[:, 1:] |= pixels[:, :-1] != pixels[:, 1:]
    out[edge] = _palette(count)[pixels[edge]]
    return out


def draw_boundaries(image: np.ndarray, boundaries: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The boundary mask on the patch grid: boundary patches tinted red over the image."""
    height, width, _ = image.shape
    mask = boundaries.astype(bool).repeat(height // boundaries.shape[0], 0).repeat(width // boundaries.shape[1], 1)
    out = image.copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.array([1.0, 0.0, 0.0])
    return out


def _to_pil(panels: Sequence[np.ndarray], display_size: int) -> Image.Image:
    strip = np.concatenate([p for p in panels], axis=1)
    picture = Image.fromarray(np.uint8(np.clip(strip, 0, 1) * 255 + 0.5))
    scale = max(1, display_size // panels[0].shape[0])
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


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


def render(model: torch.nn.Module, paths: Sequence[str], out_dir, method: Optional[str] = None, r=8,
           dense_layers: int = 2, local_layers: int = 2, display_size: int = 448) -> List[Path]:
    """Write `<image stem>_<method>.png` for each image into `out_dir`; returns the paths."""
    model = model.eval()
    method = method or ("dtp" if isinstance(model, DTPViT) else "tome")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    inputs, shown = load_images(paths, model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if method == "dtp":
        groups, boundaries = dtp_groups(model, inputs)
    else:
        groups, boundaries = merge_groups(find_vit(model), inputs, method, r, dense_layers, local_layers), None
    written = []
    for i, path in enumerate(paths):
        panels = [shown[i], draw_groups(shown[i], groups[i].numpy())]
        if boundaries is not None:
            panels.append(draw_boundaries(shown[i], boundaries[i].cpu().numpy()))
        target = out_dir / f"{Path(path).stem}_{method}.png"
        _to_pil(panels, display_size).save(target)
        written.append(target)
    return written


def main(argv=None) -> List[Path]:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="registry encoder name (dtp_vit_* or plain_vit_*)")
    parser.add_argument("--checkpoint", default=None, help="CLIP or encoder weights on disk")
    parser.add_argument("--method", default=None, choices=METHODS,
                        help="what to draw (default: dtp for DTP-ViTs, tome otherwise)")
    parser.add_argument("--r", type=int, default=8, help="ToMe / LGTM merges per block")
    parser.add_argument("--dense-layers", type=int, default=2, help="LGTM: blocks kept dense")
    parser.add_argument("--local-layers", type=int, default=2, help="LGTM: blocks merging inside 2x2 windows")
    parser.add_argument("--images", nargs="+", required=True, help="image files")
    parser.add_argument("--out", required=True, help="output folder for the PNGs")
    parser.add_argument("--display-size", type=int, default=448, help="PNG panel height (nearest upscaling)")
    args = parse_args(parser, argv)
    model = create_encoder(args.model, checkpoint=args.checkpoint)
    written = render(model, args.images, args.out, args.method, args.r, args.dense_layers, args.local_layers,
                     args.display_size)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
