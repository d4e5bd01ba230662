"""Accuracy against compute: zero-shot top-1 vs GMACs of merging sweeps and trained variants.

A training-free method (ToMe, DFE + LGTM) is one line: the same plain CLIP patched at each r.
A trained variant (DTP-ViT 2x/4x/10x, the plain ViT itself) is one point. MACs are the visual
tower's (encoder + CLIP projection) per image, counted on the eval images themselves, so DTP is
counted on the tokens it actually keeps. `python -m dtpclip.profile --pareto DIR` drives this.
"""
import json
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch

from dtpclip.encoders.merge import apply_lgtm, apply_tome, merged_token_counts, remove_tome
from dtpclip.evalsets import EvalSet
from dtpclip.flops import count_macs
from dtpclip.zeroshot import run_zero_shot

MERGE_METHODS: Dict[str, Callable] = {"tome": apply_tome, "lgtm": apply_lgtm}


def _macs_images(eval_set: EvalSet, count: int) -> torch.Tensor:
    images = []
    for image, _ in eval_set.dataset:
        images.append(image)
        if len(images) == count:
            break
    return torch.stack(images)


def accuracy_point(clip: torch.nn.Module, tokenizer: Callable, eval_set: EvalSet, label: str, method: str,
                   r: Optional[int] = None, macs_images: int = 4, device="cpu") -> dict:
    """One point: zero-shot metrics, GMACs per image and tokens of the CLIP as it is now."""
    macs = count_macs(clip.visual.eval(), _macs_images(eval_set, macs_images).to(device))
    result = run_zero_shot(clip, tokenizer, eval_set, device=device)
    point = {"label": label, "method": method, "r": r, "gmacs": macs.total / 1e9,
             "top1": result["top1"], "top5": result["top5"]}
    if hasattr(clip.visual.trunk, "_tome_info"):
        point["tokens_out"] = merged_token_counts(clip)[-1]
    return point


def merging_sweep(clip: torch.nn.Module, tokenizer: Callable, eval_set: EvalSet, rs: Iterable[int],
                  methods: Iterable[str] = ("tome", "lgtm"), dense_layers: int = 2, local_layers: int = 2,
                  label: str = "", device="cpu") -> List[dict]:
    """Each method at each r on the same plain CLIP (patched in place, unpatched at the end)."""
    points = []
    for method in methods:
        for r in rs:
            extra = dict(dense_layers=dense_layers, local_layers=local_layers) if method == "lgtm" else {}
            MERGE_METHODS[method](clip, r, **extra)
            points.append(accuracy_point(clip, tokenizer, eval_set, f"{label} {method} r={r}".strip(), method,
                                         r, device=device))
    remove_tome(clip)
    return points


def plot_pareto(points: List[dict], path) -> Path:
    """Accuracy vs GMACs: a line per merging method (ordered by r), a labelled marker per trained point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in MERGE_METHODS:
        line = sorted((p for p in points if p["method"] == method), key=lambda p: p["r"])
        if line:
            ax.plot([p["gmacs"] for p in line], [100 * p["top1"] for p in line], "o-", label=method)
            for p in line:
                ax.annotate(f"r={p['r']}", (p["gmacs"], 100 * p["top1"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    for p in (p for p in points if p["method"] not in MERGE_METHODS):
        ax.plot(p["gmacs"], 100 * p["top1"], "s", label=p["label"])
    ax.set_xlabel("GMACs per image (visual tower)")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_pareto(points: List[dict], out_dir) -> Dict[str, Path]:
    """pareto.json (the points) and pareto.png (the plot) in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "pareto.json"
    json_path.write_text(json.dumps(points, indent=2) + "\n")
    return {"json": json_path, "png": plot_pareto(points, out_dir / "pareto.png")}
