"""What the evaluators share: classification metrics, checkpoint resolution, model names, the demo run.

Metrics follow open_clip_train (`zero_shot.accuracy`: top-k over the logits) and CLIP_benchmark
(`mean_per_class_recall`: balanced accuracy, i.e. recall averaged over the classes present in the
targets). They are accumulated batch by batch, so an ImageNet-sized eval set never holds its logits.
"""
import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from dtpclip.registry import list_encoders

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
WEIGHTS_FILE = "model.safetensors"  # in a dtpclip checkpoint directory, beside CONFIG_FILE
CONFIG_FILE = "config.json"  # {"model": <open_clip name>, ...}
LATEST = "latest"  # in a run directory: the newest checkpoint directory (symlink, or a file naming it)
MAKE_DEMO_CHECKPOINT = "accelerate launch launch/clip_pretrain.py"


def check_labels(targets: torch.Tensor, num_classes: int, source: str) -> torch.Tensor:
    """`targets`, or an error naming `source` when a label is outside [0, num_classes)."""
    bad = targets[(targets < 0) | (targets >= num_classes)]
    if bad.numel():
        raise ValueError(f"{source} has label {int(bad[0])} but {num_classes} class names (labels must be in "
                         f"[0, {num_classes - 1}]); do the class names match the data?")
    return targets


class ClassificationMeter:
    """Top-k accuracy and mean per-class recall, accumulated over batches of (logits, targets)."""

    def __init__(self, num_classes: int, topk: Tuple[int, ...] = (1, 5), source: str = "the eval set"):
        if num_classes < 1:
            raise ValueError(f"{source}: expected at least one class, got {num_classes}")
        self.num_classes, self.topk, self.source = num_classes, topk, source
        self.correct = {k: 0 for k in topk}
        self.class_total = torch.zeros(num_classes, dtype=torch.long)
        self.class_correct = torch.zeros(num_classes, dtype=torch.long)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits [B, C], targets [B] class indices in [0, C)."""
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"{self.source}: logits have {logits.shape[-1]} classes, expected {self.num_classes}")
        targets = check_labels(targets.to(logits.device).long(), self.num_classes, self.source)
        ranked = logits.topk(min(max(self.topk), self.num_classes), dim=-1).indices  # [B, k]
        hits = ranked == targets.unsqueeze(-1)  # [B, k], at most one True per row
        for k in self.topk:
            self.correct[k] += int(hits[:, :k].sum())
        targets, top1 = targets.cpu(), hits[:, 0].cpu().long()
        self.class_total += torch.bincount(targets, minlength=self.num_classes)
        self.class_correct += torch.bincount(targets, weights=top1, minlength=self.num_classes).long()

    @property
    def n(self) -> int:
        return int(self.class_total.sum())

    def compute(self) -> Dict[str, float]:
        """{'top1', 'top5', ..., 'mean_per_class_recall', 'n'}; top-k with k > classes counts as k = classes."""
        if self.n == 0:
            raise ValueError(f"{self.source} has no samples to evaluate (expected at least one labelled image)")
        result = {f"top{k}": self.correct[k] / self.n for k in self.topk}
        present = self.class_total > 0
        recall = self.class_correct[present].double() / self.class_total[present].double()
        result["mean_per_class_recall"] = float(recall.mean())
        result["n"] = self.n
        return result


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, topk: Tuple[int, ...] = (1, 5)) -> dict:
    """The meter's metrics for logits and targets held in memory."""
    meter = ClassificationMeter(logits.shape[-1], topk)
    meter.update(logits, targets)
    return meter.compute()


# ---------------------------------------------------------------------------------------------
# checkpoints and model names

def default_demo_run_dir() -> Path:
    """Where launch/clip_pretrain.py writes the demo run (its `latest` names the newest checkpoint)."""
    root = os.environ.get("DTPCLIP_RUNS_DIR") or Path.home() / ".cache" / "dtpclip" / "runs"
    return Path(root) / "demo"


def _follow_latest(run_dir: Path) -> Path:
    pointer = run_dir / LATEST
    if pointer.is_dir():  # a symlink to the checkpoint directory
        return pointer.resolve()
    target = Path(pointer.read_text().strip()).expanduser()
    return target if target.is_absolute() else run_dir / target


def resolve_checkpoint(path) -> Tuple[Path, Optional[str]]:
    """(weights file, open_clip model name or None) of a checkpoint given as any of

    - an open_clip / dtpclip checkpoint file (.safetensors, .pt, .pth, .bin); its model name comes
      from a `config.json` beside it when there is one, else None (then `--model` must say it);
    - a dtpclip checkpoint directory: `model.safetensors` + `config.json` ({"model": name, ...});
    - a run directory whose `latest` (a symlink, or a file holding the directory's path, relative to
      the run directory or absolute) points to such a checkpoint directory.
    """
    given = path
    path = Path(path).expanduser()
    if path.is_dir() and (path / LATEST).exists():
        path = _follow_latest(path)
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(
                f"checkpoint directory {str(given)!r} has no {WEIGHTS_FILE} (expected a dtpclip checkpoint "
                f"directory with {WEIGHTS_FILE} + {CONFIG_FILE}, a run directory with '{LATEST}', or a "
                f"checkpoint file {'/'.join(CHECKPOINT_SUFFIXES)})")
    elif path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ValueError(f"checkpoint {str(given)!r} is not a checkpoint file: expected one of "
                             f"{', '.join(CHECKPOINT_SUFFIXES)} or a checkpoint directory")
        weights = path
    else:
        raise FileNotFoundError(f"checkpoint {str(given)!r} does not exist (expected a checkpoint file "
                                f"{'/'.join(CHECKPOINT_SUFFIXES)} or a checkpoint directory)")
    config = weights.parent / CONFIG_FILE
    name = None
    if config.is_file():
        try:
            name = json.loads(config.read_text()).get("model")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"checkpoint config {str(config)!r} is not a JSON object with a 'model' key: {e}") from e
    return weights, name


def demo_eval_dir() -> Path:
    """The demo eval set (CLIP_benchmark wds layout): the one already generated, else generated now."""
    from dtpclip import demo_data

    root = demo_data.default_root()
    if (root / demo_data.MARKER).is_file() and (root / "eval").is_dir():
        return root / "eval"  # whatever config made it: regenerating could wipe a run's data
    return demo_data.ensure_demo_data(root).eval_dir


def latest_demo_checkpoint() -> Tuple[Path, Optional[str]]:
    """The newest checkpoint of the demo run, or an error saying how to make one."""
    run_dir = default_demo_run_dir()
    if not (run_dir / LATEST).exists():
        raise FileNotFoundError(
            f"no demo checkpoint: {run_dir / LATEST} does not exist. Train the demo CLIP first with "
            f"`{MAKE_DEMO_CHECKPOINT}` (or pass --checkpoint PATH)")
    return resolve_checkpoint(run_dir)


def model_name(given: Optional[str], from_checkpoint: Optional[str], checkpoint) -> str:
    """The model to build: `--model` if given, else the checkpoint's config; an error when neither says."""
    name = given or from_checkpoint
    if name is None:
        raise ValueError(f"checkpoint {str(checkpoint)!r} does not name its model (no {CONFIG_FILE} beside it); "
                         f"pass --model, one of: {', '.join(clip_model_names())}")
    return name


def clip_model_names() -> list:
    """Our open_clip names ('PlainViT-Ti-8-64', 'DTP-ViT-B-32-10x', ...)."""
    return sorted(i.clip_name for i in list_encoders() if i.clip_name)


def registry_name(name: str) -> str:
    """The registry encoder of an open_clip name of ours; a registry name is returned as it is."""
    for info in list_encoders():
        if name in (info.name, info.clip_name):
            return info.name
    raise ValueError(f"unknown model {name!r}: expected one of our open_clip names ({', '.join(clip_model_names())}) "
                     "or a registry encoder name (dtpclip.list_encoders())")


def clip_name(name: str) -> str:
    """The open_clip name of ours for `name` (an open_clip name or a registry encoder name)."""
    for info in list_encoders():
        if name in (info.name, info.clip_name) and info.clip_name:
            return info.clip_name
    raise ValueError(f"unknown CLIP model {name!r}: expected one of {', '.join(clip_model_names())}")


def write_json(path, result: dict) -> None:
    """Write `result` atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
