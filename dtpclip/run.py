"""python -m dtpclip.run MODULE [ARGS...]: another tool's `python -m MODULE ARGS...`, with dtpclip's encoders
registered first, so its timm and open_clip calls know our names (DTP-ViT-B-32-4x, dtp_vit_base_patch32_224, ...).

    python -m dtpclip.run clip_benchmark.cli eval --model DTP-ViT-Ti-16-64-4x --pretrained CKPT ...
    python -m dtpclip.run timm.models ...     # any module a `python -m` runs

Training through open_clip_train: use `python -m dtpclip.open_clip_train`, which also adds the encoders' aux losses.
"""
import runpy
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    from dtpclip import clip, encoders  # noqa: F401  (our names, for timm and open_clip)
    sys.argv = argv
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
