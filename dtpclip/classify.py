"""python -m dtpclip.classify: image classification with a registry encoder (linear probe, fine-tune, scratch).

Modes, one code path (`encode(images).pooled` -> timm's classifier head, `reset_classifier`):
  linear    the encoder frozen (eval mode, weights untouched); its pooled features are computed once,
            kept in memory, and only the head is trained
  finetune  encoder + head trained; the encoder at `--encoder-lr-scale` times the head's lr
  scratch   the same architecture with fresh weights, encoder + head trained at the same lr
The encoder's aux loss (DTP's boundary loss, ...) is added to the cross-entropy when it trains.
With `--teacher` (finetune / scratch) a frozen classifier teacher adds DKD or logit KD (and optionally
block-feature KD) terms: VQ-ViT's recipe is `--distill dkd` with alpha 0.5, beta 1.5, T 1, weight 4.
AdamW with a cosine schedule over the epochs; top-1 / top-5 / mean per-class recall every epoch.

    python -m dtpclip.classify                      # linear probe of the latest demo checkpoint on demo data
    python -m dtpclip.classify --checkpoint RUN --train-data DIR --val-data DIR --mode finetune --epochs 5

Data: eval-set directories (CLIP_benchmark wds with .cls, or ImageFolder; dtpclip.evalsets), split
folders `--train-split` / `--val-split` (the root itself when absent). Without `--val-data` a
stratified, seeded `--val-fraction` of the train data is held out (read into memory: small sets).
"""
import os

from dtpclip.cli import add_model_kwargs, early_args, make_parser, parse_args, run_main
from dtpclip.specs import FEATURE_LAYERS, FEATURE_LOSSES, LOGIT_LOSSES, LSQ_GRAD_SCALES, QUANT_SCOPES

MODES = ("linear", "finetune", "scratch")
# head learning rate per mode when --lr is not given: a probe on cached features takes a large
# step; fine-tuning a pretrained encoder a small one (its encoder at --encoder-lr-scale of it)
DEFAULT_LR = {"linear": 1e-2, "finetune": 1e-4, "scratch": 1e-3}


def make_arg_parser():
    parser = make_parser(__doc__.splitlines()[0], "python -m dtpclip.classify")
    parser.add_argument("--model", default=None,
                        help="registry encoder or our open_clip name; None: the checkpoint's config.json")
    parser.add_argument("--checkpoint", default=None,
                        help="CLIP checkpoint file, dtpclip checkpoint directory or run directory; None: the "
                             "latest demo checkpoint (scratch uses only its model name)")
    add_model_kwargs(parser)
    parser.add_argument("--train-data", default=None, help="labelled eval-set directory, wds or ImageFolder; "
                        "None: the demo eval set, split into train/val")
    parser.add_argument("--val-data", default=None, help="labelled eval-set directory; None: hold out "
                        "--val-fraction of the train data")
    parser.add_argument("--train-split", default="train", help="split folder of --train-data")
    parser.add_argument("--val-split", default="test", help="split folder of --val-data")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="held out per class when no --val-data")
    parser.add_argument("--mode", default="linear", choices=MODES,
                        help="linear: frozen encoder + head; finetune: both; scratch: both from fresh weights")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the train data")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"head learning rate (AdamW, cosine); None: per mode {DEFAULT_LR}")
    parser.add_argument("--encoder-lr-scale", type=float, default=0.1, help="encoder lr / head lr in finetune")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--batch-size", type=int, default=128, help="images (or features) per step")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--device", default=None, help="torch device (None: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="head init, shuffling and the train/val split")
    parser.add_argument("--output", default=None, help="write the result (with per-epoch metrics) as JSON to this file")
    parser.add_argument("--w-bits", type=int, default=None,
                        help="LSQ quantization-aware training: weight bits of the encoder's blocks; None: float")
    parser.add_argument("--a-bits", type=int, default=None, help="LSQ: activation bits; None: float")
    parser.add_argument("--quant-scope", default="linear", choices=QUANT_SCOPES,
                        help="LSQ: the blocks' Linears, or also attention (q, k, v, probabilities)")
    parser.add_argument("--lsq-grad-scale", default="paper", choices=LSQ_GRAD_SCALES,
                        help="LSQ: the activations' N in the step gradient scale 1/sqrt(N Qp): one example's "
                             "features (the paper's N_F) or the batch's elements (lsq-net's)")
    parser.add_argument("--save", default=None, help="write the trained encoder + head as a checkpoint directory "
                        "(model.safetensors + config.json): a --checkpoint or teacher for the next KD step")
    parser.add_argument("--teacher", default=None, help="distil from this classifier (registry or open_clip name; "
                        "None with --teacher-checkpoint: the name in its config.json); finetune / scratch only")
    parser.add_argument("--teacher-checkpoint", default=None, help="the teacher's weights, head included (file, "
                        "dtpclip checkpoint directory or run directory; quantized ones load quantized)")
    parser.add_argument("--distill", default="dkd", choices=LOGIT_LOSSES, help="logit distillation with a teacher")
    parser.add_argument("--distill-weight", type=float, default=4.0, help="weight of the logit distillation term")
    parser.add_argument("--dkd-alpha", type=float, default=0.5, help="DKD weight of the target-class part (TCKD)")
    parser.add_argument("--dkd-beta", type=float, default=1.5, help="DKD weight of the non-target part (NCKD)")
    parser.add_argument("--kd-temperature", type=float, default=1.0, help="softmax temperature of KD / DKD")
    parser.add_argument("--feature-distill", default=None, choices=FEATURE_LOSSES,
                        help="also distil features (--feature-distill-layers; summed over them; same width and tokens)")
    parser.add_argument("--feature-distill-weight", type=float, default=1.0, help="weight of the feature term")
    parser.add_argument("--feature-distill-layers", default="blocks", choices=FEATURE_LAYERS,
                        help="the features compared: every block's output, the last embedding (the head's input: "
                             "the ViT-Lite study's better variant), or each block's stream after attention and after "
                             "its MLP")
    return parser


# `python -m`: the arguments are parsed here, before the heavy imports below (fast --help)
ARGS = early_args(make_arg_parser, __name__)

import json  # noqa: E402  (after the early parse, as every import below)
import random
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from tqdm import tqdm

from dtpclip.encoders.output import EncoderOutput
from dtpclip.encoders.quant import quant_config, quantize_model
from dtpclip.evalsets import load_eval_set
from dtpclip.checkpoint import write_json
from dtpclip.evaluate import ClassificationMeter, check_labels, demo_eval_dir, registry_name, resolve_model
from dtpclip.losses import Distiller, load_teacher
from dtpclip.checkpoint import save_checkpoint_dir
from dtpclip.clip import encoder_transforms
from dtpclip.factory import create_encoder
from dtpclip.measure import default_device


# ---------------------------------------------------------------------------------------------
# the model

def build_encoder(model: str, mode: str = "linear", checkpoint=None, **encoder_kwargs) -> nn.Module:
    """A registry encoder (by registry or open_clip name): linear / finetune load `checkpoint` (a CLIP
    or encoder weights file) when given, scratch never does. encoder_kwargs go to timm.create_model."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
    return create_encoder(registry_name(model), checkpoint=None if mode == "scratch" else checkpoint,
                          **encoder_kwargs)


def build_classifier(model: str, num_classes: int, mode: str = "linear", checkpoint=None,
                     **encoder_kwargs) -> nn.Module:
    """`build_encoder` with a fresh timm classifier head of `num_classes` (`reset_classifier`)."""
    encoder = build_encoder(model, mode, checkpoint, **encoder_kwargs)
    encoder.reset_classifier(num_classes)
    return encoder


def logits_of(encoder: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, K], the encoder's aux loss) through the encoder contract and timm's head."""
    logits, out = logits_and_output(encoder, images)
    return logits, out.aux_loss


def logits_and_output(encoder: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, EncoderOutput]:
    out = encoder.encode(images)
    return encoder.get_classifier()(out.pooled), out


def distilled_logits(encoder: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                     distiller: Distiller) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """`logits_of` plus the named distillation terms against the distiller's teacher."""
    with distiller.capture(encoder) as features:
        logits, out = logits_and_output(encoder, images)
    return logits, out.aux_loss, distiller(images, logits, targets, features, out)


# ---------------------------------------------------------------------------------------------
# data

class ShuffleBuffer(IterableDataset):
    """Samples of an iterable dataset (e.g. class-sorted wds shards) in buffer-shuffled order."""

    def __init__(self, dataset: IterableDataset, size: int = 2000, seed: int = 0):
        super().__init__()
        self.dataset, self.size, self.seed, self.epoch = dataset, size, seed, 0

    def __iter__(self):
        rng, buffer = random.Random(self.seed + self.epoch), []
        self.epoch += 1
        for sample in self.dataset:
            buffer.append(sample)
            if len(buffer) >= self.size:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer


def materialise(dataset: Dataset, desc: str = "reading") -> TensorDataset:
    """All (image, label) samples of a (small) dataset as tensors in memory."""
    images, labels = [], []
    for image, label in tqdm(DataLoader(dataset, batch_size=256), desc=desc, unit="batch"):
        images.append(image)
        labels.append(torch.as_tensor(label))
    if not images:
        raise ValueError("no samples to split")
    return TensorDataset(torch.cat(images), torch.cat(labels).long())


def stratified_split(dataset: TensorDataset, val_fraction: float, seed: int = 0) -> Tuple[TensorDataset, TensorDataset]:
    """(train, val): in every class, a seeded random `val_fraction` of its samples goes to val."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    images, labels = dataset.tensors
    generator = torch.Generator().manual_seed(seed)
    val = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        val[members[: int(val_fraction * len(members) + 0.5)]] = True  # half rounds up
    return TensorDataset(images[~val], labels[~val]), TensorDataset(images[val], labels[val])


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int, seed: int = 0) -> DataLoader:
    if isinstance(dataset, IterableDataset):
        return DataLoader(ShuffleBuffer(dataset, seed=seed) if shuffle else dataset, batch_size=batch_size,
                          num_workers=workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)


# ---------------------------------------------------------------------------------------------
# training

@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device="cpu",
                     desc: str = "features") -> Tuple[torch.Tensor, torch.Tensor]:
    """Pooled features [N, D] and labels [N] of a frozen encoder (eval mode), kept on the CPU."""
    encoder.eval()
    features, labels = [], []
    for images, targets in tqdm(loader, desc=desc, unit="batch"):
        features.append(encoder.encode(images.to(device)).pooled.float().cpu())
        labels.append(torch.as_tensor(targets))
    if not features:
        raise ValueError(f"{desc}: no samples (expected labelled images)")
    return torch.cat(features), torch.cat(labels).long()


def _evaluate(predict: Callable, batches, num_classes: int, source: str) -> Dict[str, float]:
    meter = ClassificationMeter(num_classes, source=source)
    with torch.no_grad():
        for inputs, targets in batches:
            meter.update(predict(inputs), targets)
    return meter.compute()


def train_classifier(encoder: nn.Module, train_data: Dataset, val_data: Dataset, num_classes: int,
                     mode: str = "linear", epochs: int = 10, lr: float = 1e-3, weight_decay: float = 0.0,
                     encoder_lr_scale: float = 0.1, batch_size: int = 128, workers: int = 0, device="cpu",
                     seed: int = 0, train_name: str = "train data", val_name: str = "val data",
                     distiller: Optional[Distiller] = None) -> List[dict]:
    """Train `encoder`'s head (linear) or encoder + head (finetune / scratch) in place.

    train_data / val_data yield (image tensor, class index). Returns one dict per epoch:
    epoch, lr, train_loss, top1, top5, mean_per_class_recall, n, seconds; with a `distiller`
    (finetune / scratch: its terms join the loss) also distill_loss, their weighted sum per sample.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
    if epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {epochs}")
    if getattr(encoder, "num_classes", None) != num_classes:
        raise ValueError(f"the encoder's head has {getattr(encoder, 'num_classes', None)} classes, the data "
                         f"{num_classes}; call encoder.reset_classifier({num_classes}) (build_classifier does)")
    if distiller is not None and mode == "linear":
        raise ValueError("distillation trains the encoder: use --mode finetune or scratch, not linear")
    torch.manual_seed(seed)
    encoder.to(device)
    if distiller is not None:
        distiller.to(device)
    head = encoder.get_classifier()
    frozen = mode == "linear"
    if frozen:
        for p in encoder.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
        features = extract_features(encoder, make_loader(train_data, batch_size, False, workers), device, train_name)
        check_labels(features[1], num_classes, train_name)
        val_features = extract_features(encoder, make_loader(val_data, batch_size, False, workers), device, val_name)
        feature_set = TensorDataset(*features)
        groups = [{"params": list(head.parameters()), "lr": lr}]
    else:
        encoder.requires_grad_(True)
        head_ids = {id(p) for p in head.parameters()}
        body = [p for p in encoder.parameters() if id(p) not in head_ids]
        scale = encoder_lr_scale if mode == "finetune" else 1.0
        groups = [{"params": list(head.parameters()), "lr": lr}, {"params": body, "lr": lr * scale}]
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)

    history = []
    for epoch in tqdm(range(1, epochs + 1), desc=f"{mode} epochs", unit="epoch"):
        start, total, count, distill_total = time.perf_counter(), 0.0, 0, 0.0
        current_lr = optimizer.param_groups[0]["lr"]
        if frozen:
            batches = DataLoader(feature_set, batch_size=batch_size, shuffle=True,
                                 generator=torch.Generator().manual_seed(seed + epoch))
        else:
            encoder.train()
            batches = tqdm(make_loader(train_data, batch_size, True, workers, seed + epoch), desc=f"epoch {epoch}",
                           unit="batch", leave=False)
        for inputs, targets in batches:
            targets = check_labels(torch.as_tensor(targets).long().to(device), num_classes, train_name)
            distill = {}
            if frozen:
                logits, aux = head(inputs.to(device)), 0.0
            elif distiller is not None:
                logits, aux, distill = distilled_logits(encoder, inputs.to(device), targets, distiller)
            else:
                logits, aux = logits_of(encoder, inputs.to(device))
            loss = F.cross_entropy(logits.float(), targets) + aux + sum(distill.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + float(loss.detach()) * len(targets), count + len(targets)
            distill_total += float(sum(v.detach() for v in distill.values())) * len(targets)
        schedule.step()
        if count == 0:
            raise ValueError(f"{train_name} has no samples (expected labelled images)")
        if frozen:
            val_batches = DataLoader(TensorDataset(*val_features), batch_size=batch_size)
            metrics = _evaluate(lambda x: head(x.to(device)), val_batches, num_classes, val_name)
        else:
            encoder.eval()
            val_batches = ((images.to(device), targets) for images, targets in
                           make_loader(val_data, batch_size, False, workers))
            metrics = _evaluate(lambda x: logits_of(encoder, x)[0], val_batches, num_classes, val_name)
        history.append({"epoch": epoch, "lr": current_lr, "train_loss": total / count, **metrics,
                        **({"distill_loss": distill_total / count} if distiller is not None else {}),
                        "seconds": time.perf_counter() - start})
        tqdm.write(f"epoch {epoch}: loss {total / count:.4f} top1 {metrics['top1']:.4f} top5 {metrics['top5']:.4f}")
    encoder.eval()
    return history


# ---------------------------------------------------------------------------------------------
# the command line

def build_distiller(args, num_classes: int, encoder: nn.Module) -> Optional[Distiller]:
    """The `--teacher` options as a Distiller (None without a teacher); the teacher must see the same images."""
    if args.teacher is None and args.teacher_checkpoint is None:
        return None
    if args.teacher_checkpoint is None:
        raise ValueError(f"--teacher {args.teacher!r} needs --teacher-checkpoint: a trained classifier's weights")
    teacher = load_teacher(args.teacher, args.teacher_checkpoint, num_classes)
    if teacher.pretrained_cfg.get("input_size") != encoder.pretrained_cfg.get("input_size"):
        raise ValueError(f"the teacher takes {teacher.pretrained_cfg.get('input_size')} images, the student "
                         f"{encoder.pretrained_cfg.get('input_size')}; expected the same input size")
    return Distiller(teacher, args.distill, args.distill_weight, args.dkd_alpha, args.dkd_beta, args.kd_temperature,
                     args.feature_distill, args.feature_distill_weight, args.feature_distill_layers,
                     getattr(encoder, "token_distill_loss", None))


def data_dir(path: Optional[str], flag: str) -> Path:
    data = Path(path).expanduser()
    if not data.is_dir():
        raise FileNotFoundError(f"{flag} {path!r} does not exist (expected an eval-set directory: CLIP_benchmark "
                                "wds layout with .cls labels, or ImageFolder)")
    return data


def load_datasets(train_path: Path, val_path: Optional[Path], train_tf: Callable, eval_tf: Callable,
                  train_split: str = "train", val_split: str = "test", val_fraction: float = 0.2,
                  seed: int = 0) -> Tuple[Dataset, Dataset, List[str]]:
    """(train dataset, val dataset, class names); val held out of train when `val_path` is None."""
    if val_path is None:
        whole = load_eval_set(train_path, eval_tf, train_split)
        train, val = stratified_split(materialise(whole.dataset, f"reading {train_path}"), val_fraction, seed)
        return train, val, whole.classnames
    train, val = load_eval_set(train_path, train_tf, train_split), load_eval_set(val_path, eval_tf, val_split)
    if len(train.classnames) != len(val.classnames):
        raise ValueError(f"--train-data {str(train_path)!r} has {len(train.classnames)} classes but --val-data "
                         f"{str(val_path)!r} has {len(val.classnames)}; expected the same classes in both")
    return train.dataset, val.dataset, train.classnames


def main(argv=None, args=None) -> dict:
    args = args or parse_args(make_arg_parser(), argv)
    args.device = args.device or default_device()
    if args.checkpoint is None and args.mode == "scratch" and args.model:
        weights, name, model_kwargs = None, args.model, args.model_kwargs
    else:
        source = resolve_model(args.checkpoint, args.model, args.model_kwargs)
        weights, name, model_kwargs = source.weights, source.name, source.model_kwargs
    name = registry_name(name)
    if args.train_data:
        train_path, train_split = data_dir(args.train_data, "--train-data"), args.train_split
    else:  # the demo's labelled images: its eval set's one split, held out from itself below
        train_path, train_split = demo_eval_dir(), "test"
    val_path = data_dir(args.val_data, "--val-data") if args.val_data else None
    if args.mode == "scratch":
        weights = None

    torch.manual_seed(args.seed)
    encoder = build_encoder(name, args.mode, weights, **model_kwargs)
    if args.w_bits is not None or args.a_bits is not None:  # LSQ QAT: the KD chain's 4-bit / 2-bit steps
        quantize_model(encoder, args.w_bits, args.a_bits, args.quant_scope, grad_scale=args.lsq_grad_scale)
    train_tf, eval_tf = encoder_transforms(encoder)
    if args.mode == "linear":
        train_tf = eval_tf  # features are computed once: no augmentation
    train, val, classnames = load_datasets(train_path, val_path, train_tf, eval_tf, train_split,
                                           args.val_split, args.val_fraction, args.seed)
    encoder.reset_classifier(len(classnames))
    distiller = build_distiller(args, len(classnames), encoder)
    start, lr = time.perf_counter(), args.lr or DEFAULT_LR[args.mode]
    history = train_classifier(
        encoder, train, val, len(classnames), args.mode, args.epochs, lr, args.weight_decay,
        args.encoder_lr_scale, args.batch_size, args.workers, args.device, args.seed,
        train_name=f"--train-data {str(train_path)!r}",
        val_name=f"--val-data {str(val_path)!r}" if val_path else f"the held-out part of {str(train_path)!r}",
        distiller=distiller)
    result = {
        "model": name, "model_kwargs": model_kwargs, "mode": args.mode, "checkpoint": None if weights is None else str(weights),
        "train_data": str(train_path), "val_data": str(val_path) if val_path else f"{args.val_fraction} of train_data",
        "classes": len(classnames), "lr": lr, "epochs": history,
        "teacher": None if distiller is None else {"model": args.teacher, "checkpoint": args.teacher_checkpoint,
                                                   "distill": args.distill, "feature_distill": args.feature_distill},
        **{k: history[-1][k] for k in ("top1", "top5", "mean_per_class_recall")},
        "seconds": time.perf_counter() - start, "quantization": quant_config(encoder),
    }
    if args.save:
        result["saved"] = str(save_checkpoint_dir(encoder, args.save, {
            "model": name, "model_kwargs": model_kwargs, "quantization": quant_config(encoder),
            "classes": len(classnames)}))
    print(json.dumps({k: v for k, v in result.items() if k != "epochs"}, indent=2))
    if args.output:
        write_json(args.output, result)
    return result


if __name__ == "__main__":
    run_main(main, args=ARGS)
