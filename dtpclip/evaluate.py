"""What the evaluators share: classification metrics, checkpoint resolution, model names, the demo run.

Metrics follow open_clip_train (`zero_shot.accuracy`: top-k over the logits) and CLIP_benchmark
(`mean_per_class_recall`: balanced accuracy, i.e. recall averaged over the classes present in the
targets). They are accumulated batch by batch, so an ImageNet-sized eval set never holds its logits.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from dtpclip.checkpoint import CONFIG_FILE, LATEST, checkpoint_config, resolve_checkpoint
from dtpclip.checkpointing import latest_run, runs_root
from dtpclip.registry import did_you_mean, encoder_info, known_names, list_encoders

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

def demo_eval_dir() -> Path:
    """The demo eval set (CLIP_benchmark wds layout): the one already generated, else generated now."""
    from dtpclip import demo_data

    root = demo_data.default_root()
    if (root / demo_data.MARKER).is_file() and (root / "eval").is_dir():
        return root / "eval"  # whatever config made it: regenerating could wipe a run's data
    return demo_data.ensure_demo_data(root).eval_dir


def latest_demo_checkpoint() -> Tuple[Path, Optional[str]]:
    """The newest checkpoint of the newest CLIP run in the runs root, or an error saying how to make one."""
    run_dir = latest_run()
    if run_dir is None or not (run_dir / LATEST).exists():
        raise FileNotFoundError(
            f"no demo checkpoint: no CLIP run with a checkpoint under {str(runs_root())!r}. Train the demo CLIP "
            f"first with `{MAKE_DEMO_CHECKPOINT}` (or pass --checkpoint PATH)")
    return resolve_checkpoint(run_dir)


@dataclass
class ModelSource:
    """What to build and load: a checkpoint's weights, the model's name and constructor kwargs."""

    weights: Path
    name: str
    model_kwargs: dict
    config: dict


def resolve_model(checkpoint=None, model: Optional[str] = None, model_kwargs: Optional[dict] = None) -> ModelSource:
    """--checkpoint (None: the latest demo checkpoint), --model and --model-kwargs, completed from the
    checkpoint's config: the given name wins, the given kwargs update the saved ones."""
    weights, saved_name = resolve_checkpoint(checkpoint) if checkpoint is not None else latest_demo_checkpoint()
    config = checkpoint_config(weights)
    return ModelSource(weights, model_name(model, saved_name, checkpoint or weights),
                       {**config.get("model_kwargs", {}), **(model_kwargs or {})}, config)


def model_name(given: Optional[str], from_checkpoint: Optional[str], checkpoint) -> str:
    """The model to build: `--model` if given, else the checkpoint's config; an error when neither says."""
    name = given or from_checkpoint
    if name is None:
        raise ValueError(f"checkpoint {str(checkpoint)!r} does not name its model (no {CONFIG_FILE} beside it); "
                         "pass --model: one of our open_clip names, e.g. 'DTP-ViT-B-32-10x' (dtpclip.list_encoders())")
    return name


def clip_model_names() -> list:
    """Our open_clip names ('PlainViT-Ti-8-64', 'DTP-ViT-B-32-10x', ...)."""
    return sorted(i.clip_name for i in list_encoders() if i.clip_name)


def registry_name(name: str) -> str:
    """The registry encoder of an open_clip name of ours; a registry name is returned as it is."""
    try:
        return encoder_info(name).name
    except KeyError:
        raise ValueError(f"unknown model {name!r}{did_you_mean(name, known_names())}: expected one of our "
                         "open_clip or timm names (dtpclip.list_encoders())") from None


def clip_name(name: str) -> str:
    """The open_clip name of ours for `name` (an open_clip name or a registry encoder name)."""
    try:
        found = encoder_info(name).clip_name
    except KeyError:
        found = None
    if found is None:
        raise ValueError(f"unknown CLIP model {name!r}{did_you_mean(name, clip_model_names())}: expected one of "
                         f"our open_clip names ({len(clip_model_names())}, e.g. {clip_model_names()[0]!r}; "
                         "dtpclip.list_encoders() lists them with their clip_name)")
    return found
