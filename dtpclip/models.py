"""python -m dtpclip.models: the encoders this package registers, by family, with their open_clip names,
sizes and settings; `--macs` also builds each listed one and counts its tokens out and GMACs per image.

    python -m dtpclip.models                          # every name
    python -m dtpclip.models --family dtp --size tiny_patch16_64 --macs
"""
from dtpclip.cli import early_args, make_parser, parse_args, run_main


def make_arg_parser():
    parser = make_parser(__doc__.splitlines()[0], "python -m dtpclip.models")
    parser.add_argument("--family", default=None, help="only this family (vit, dtp, tome, lgtm, vq, ...)")
    parser.add_argument("--size", default=None, help="only this size (tiny_patch16_64, base_patch32_224, ...)")
    parser.add_argument("--transforms", action="store_true", help="list the training-free transforms instead")
    parser.add_argument("--macs", action="store_true", help="build each listed encoder: tokens out and GMACs per image")
    return parser


# `python -m`: the arguments are parsed here, before the heavy imports below (fast --help)
ARGS = early_args(make_arg_parser, __name__)

from typing import List  # noqa: E402  (after the early parse, as every import below)

import torch

from dtpclip.factory import create_encoder
from dtpclip.flops import count_macs
from dtpclip.registry import EncoderInfo, did_you_mean, list_encoders, list_transforms


def measure(info: EncoderInfo) -> dict:
    """Tokens out and GMACs of one image through the encoder (eval mode, random weights and image)."""
    torch.manual_seed(0)
    encoder = create_encoder(info.name).eval()
    image = torch.randn(1, 3, info.size.img_size, info.size.img_size)
    with torch.no_grad():
        tokens = int(encoder.encode(image).token_mask.sum())
    return {"tokens": tokens, "gmacs": count_macs(encoder, image).total / 1e9}


def table(infos: List[EncoderInfo], macs: bool) -> List[dict]:
    rows = []
    for info in infos:
        row = {"name": info.name, "open_clip": info.clip_name or "-", "family": info.family, "size": info.size.name,
               "settings": ", ".join(f"{k}={v}" for k, v in info.settings().items()) or "-"}
        rows.append({**row, **(measure(info) if macs else {})})
    return rows


def format_table(rows: List[dict]) -> str:
    if not rows:
        return "no encoder matches"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(_cell(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(_cell(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv=None, args=None) -> List[dict]:
    args = args or parse_args(make_arg_parser(), argv)
    if args.transforms:
        rows = [{"transform": t.name, "example": t.example, "parameters": ", ".join(f"{k}={v}" for k, v in
                 t.params.items()), "what": t.summary} for t in list_transforms()]
        print(format_table(rows))
        return rows
    if args.family and not list_encoders(args.family):
        families = sorted({i.family for i in list_encoders()})
        raise ValueError(f"no encoder of family {args.family!r}; families: {', '.join(families)}")
    sizes = {i.size.name for i in list_encoders()}
    if args.size and args.size not in sizes:
        raise ValueError(f"no size {args.size!r}{did_you_mean(args.size, sizes)}; sizes: {', '.join(sorted(sizes))}")
    infos = [i for i in list_encoders(args.family) if args.size in (None, i.size.name)]
    rows = table(infos, args.macs)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    run_main(main, args=ARGS)
