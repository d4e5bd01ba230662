"""Accuracy against compute: zero-shot top-1 vs GMACs of transform sweeps and trained variants.

A training-free transform (ToMe, DFE + LGTM, PTQ, ...) is one line: the same CLIP with each spec of
the sweep applied to a copy of it ('tome:r=2', 'tome:r=4', ... ordered by r). A trained variant
(DTP-ViT 2x/4x/10x, the plain ViT itself) is one point. MACs are the visual tower's (encoder + CLIP
projection) per image, counted on the eval images themselves, so DTP is counted on the tokens it
actually keeps. `python -m dtpclip.profile --pareto DIR` drives this.
"""
import copy
import json
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from dtpclip.evalsets import EvalSet
from dtpclip.factory import apply_transforms
from dtpclip.flops import count_macs
from dtpclip.registry import parse_transform, transform_info
from dtpclip.zeroshot import run_zero_shot

TRAINED = "trained"  # the method of a point that is a trained model, not a transform sweep


def _macs_images(eval_set: EvalSet, count: int) -> torch.Tensor:
    images = []
    for image, _ in eval_set.dataset:
        images.append(image)
        if len(images) == count:
            break
    return torch.stack(images)


def accuracy_point(clip: torch.nn.Module, tokenizer: Callable, eval_set: EvalSet, label: str, method: str,
                   r: Optional[int] = None, macs_images: int = 4, device="cpu") -> dict:
    """One point: zero-shot metrics, GMACs per image and tokens out per image (the contract's token mask) of the
    CLIP."""
    images = _macs_images(eval_set, macs_images).to(device)
    macs = count_macs(clip.visual.eval(), images)
    result = run_zero_shot(clip, tokenizer, eval_set, device=device)
    point = {"label": label, "method": method, "r": r, "gmacs": macs.total / 1e9,
             "top1": result["top1"], "top5": result["top5"]}
    with torch.no_grad():
        point["tokens_out"] = clip.visual.trunk.encode(images).token_mask.sum(-1).float().mean().item()
    return point


def transform_sweep(clip: torch.nn.Module, tokenizer: Callable, eval_set: EvalSet, specs: Iterable[str],
                    label: str = "", calibration: Optional[Sequence[torch.Tensor]] = None,
                    device="cpu") -> List[dict]:
    """A point for each transform spec, applied alone to a copy of `clip` (which stays unpatched)."""
    points = []
    for spec in map(parse_transform, specs):
        patched = copy.deepcopy(clip)
        apply_transforms(patched.visual.trunk, [spec], calibration)
        point = accuracy_point(patched, tokenizer, eval_set, f"{label} {spec}".strip(), spec.name,
                               spec.params.get("r"), device=device)
        points.append({**point, "base": label})
    return points


def plot_pareto(points: List[dict], path, title: str = "") -> Path:
    """Accuracy vs GMACs: a line per transform (ordered by r, starting at r = 0 from the model it patched),
    a labelled marker per trained point. The title and legend are also the PNG's metadata."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    trained = {p["label"]: p for p in points if p["method"] == TRAINED}
    for method in dict.fromkeys(p["method"] for p in points if p["method"] != TRAINED):
        line = sorted((p for p in points if p["method"] == method), key=lambda p: p["r"] or 0)
        base = trained.get(line[0].get("base"))
        line = ([{**base, "r": 0}] if base is not None and line[0]["r"] is not None else []) + line
        ax.plot([p["gmacs"] for p in line], [100 * p["top1"] for p in line], "o-", label=transform_info(method).title)
        for p in line:
            if p["r"] is not None:
                ax.annotate(f"r={p['r']}", (p["gmacs"], 100 * p["top1"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    for p in (p for p in points if p["method"] == TRAINED):
        ax.plot(p["gmacs"], 100 * p["top1"], "s", label=p["label"])
    title = title or "Zero-shot top-1 against compute"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("GMACs per image (visual tower: encoder + CLIP projection)")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    fig.savefig(path, dpi=120, metadata={"Title": title, "Description": " | ".join(legend)})
    plt.close(fig)
    return path


def write_pareto(points: List[dict], out_dir, title: str = "") -> Dict[str, Path]:
    """pareto.json (the points) and pareto.png (the plot) in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "pareto.json"
    json_path.write_text(json.dumps(points, indent=2) + "\n")
    return {"json": json_path, "png": plot_pareto(points, out_dir / "pareto.png", title)}
