"""python -m dtpclip.lr_find: the LR range test, for CLIP pretraining and for classification.

From a fresh model, the learning rate ramps exponentially from --start-lr to --end-lr over --steps
optimizer steps (AdamW, the task's own loss: contrastive + the encoder's aux loss, or cross-entropy +
aux); the loss is smoothed exponentially (--smooth) and the test stops when it diverges (5x the best).
torch-lr-finder runs the test (davidtvs/pytorch-lr-finder). The suggested rate (--rule), on the
points left after skipping the first 10 and last 5:
  valley    (default) fastai's rule (fastai 2.5+ `valley`): the longest stretch over which the smoothed
            loss keeps falling, taken half-way through it. Early noise cannot move it much.
  steepest  where the loss falls fastest against log lr (Smith 2017; torch-lr-finder's and fastai's
            `steep`). On a slowly falling CLIP curve it lands near the start (demo: 3e-6).
  minimum   the rate of the lowest loss, divided by 10 (fastai's `minimum`).
The model and optimizer are restored afterwards. The DTP-ViT study picked its from-scratch rates
with such a test (its `lr_finder_plot`).

    python -m dtpclip.lr_find                                   # the demo CLIP on the demo shards
    python -m dtpclip.lr_find --task classify --model plain_vit_tiny_patch16_64 --train-data DIR
"""
from dtpclip.cli import add_model_kwargs, early_args, make_parser, parse_args, run_main

TASKS = ("clip", "classify")
RULES = ("valley", "steepest", "minimum")


def make_arg_parser():
    parser = make_parser(__doc__.splitlines()[0], "python -m dtpclip.lr_find")
    parser.add_argument("--task", default="clip", choices=TASKS, help="CLIP pretraining or classification")
    parser.add_argument("--model", default=None, help="clip: open_clip name (default: the demo's DTP-ViT-Ti-16-64-4x);"
                        " classify: registry encoder (default: plain_vit_tiny_patch16_64)")
    add_model_kwargs(parser)
    parser.add_argument("--train-data", default=None, help="clip: webdataset shards; classify: a labelled eval-set "
                        "directory (wds or ImageFolder); default: the demo's")
    parser.add_argument("--train-split", default="train", help="classify: split folder of --train-data")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of the ramp")
    parser.add_argument("--start-lr", type=float, default=1e-6)
    parser.add_argument("--end-lr", type=float, default=1.0)
    parser.add_argument("--smooth", type=float, default=0.05, help="weight of the new loss in the running average")
    parser.add_argument("--rule", default="valley", choices=RULES, help="how the suggestion is read off the curve")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--device", default=None, help="torch device (None: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="the plot (PNG), a .json of the curve beside it; default: "
                        "<runs root>/lr_find-<task>-<time>.png")
    return parser


# `python -m`: the arguments are parsed here, before the heavy imports below (fast --help)
ARGS = early_args(make_arg_parser, __name__)

import json  # noqa: E402  (after the early parse, as every import below)
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List

import matplotlib
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_lr_finder import LRFinder, TrainDataLoaderIter

from dtpclip.classify import build_classifier, data_dir, load_datasets, logits_of, make_loader
from dtpclip.checkpointing import run_name, runs_root
from dtpclip.cli import status
from dtpclip.clip import create_clip_and_transforms, encoder_transforms
from dtpclip.data import make_train_loader
from dtpclip.demo_data import ensure_demo_data
from dtpclip.evaluate import demo_eval_dir
from dtpclip.factory import create_encoder
from dtpclip.measure import default_device
from dtpclip.training import ContrastiveModel, param_groups

SKIP_START, SKIP_END = 10, 5  # points left out of the suggestion (the ramp's start is noise, its end divergence)


@dataclass
class RangeTest:
    lrs: List[float]
    losses: List[float]  # smoothed
    suggestion: float
    rule: str


class _Batches(TrainDataLoaderIter):
    """Any iterable of batches for torch-lr-finder: `split(batch) -> (model inputs, loss target)`, restarted
    when it runs out."""

    def __init__(self, batches: Iterable, split: Callable):
        super().__init__(batches)
        self.split = split

    def inputs_labels_from_batch(self, batch):
        return self.split(batch)


class _Unpacking(nn.Module):
    """model(*inputs): torch-lr-finder calls the model with one object."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        return self.model(*inputs)


def valley_index(losses: List[float]) -> int:
    """fastai's `valley`: the longest decreasing subsequence of the losses, ending at its last index e and
    taken to start at e minus its length; the index half-way through its middle third."""
    length, end = [1] * len(losses), 0
    for i in range(1, len(losses)):
        for j in range(i):
            if losses[i] < losses[j] and length[i] < length[j] + 1:
                length[i] = length[j] + 1
        if length[end] < length[i]:
            end = i
    start = end - length[end]
    third = (end - start) / 3
    return start + int(third) + int(third / 2)


def suggest(lrs: List[float], losses: List[float], rule: str) -> float:
    """The suggested rate of the curve's points by `rule` (module docstring)."""
    if rule == "steepest":
        slopes = torch.tensor(losses).diff() / torch.tensor(lrs).log().diff()
        return lrs[int(slopes.argmin())]
    if rule == "minimum":
        return lrs[min(range(len(losses)), key=losses.__getitem__)] / 10
    return lrs[valley_index(losses)]


def range_test(model: nn.Module, optimizer: torch.optim.Optimizer, loss: Callable, batches: Iterable,
               split: Callable, steps: int, start_lr: float, end_lr: float, smooth: float = 0.05,
               device="cpu", rule: str = "valley") -> RangeTest:
    """The LR range test on `model` (called as model(*inputs)); `loss(outputs, target)`; `split(batch)` ->
    (inputs tuple, target). The model's and optimizer's state are restored afterwards."""
    if not 0 < start_lr < end_lr:
        raise ValueError(f"expected 0 < --start-lr < --end-lr, got {start_lr} and {end_lr}")
    if steps < SKIP_START + SKIP_END + 2:
        raise ValueError(f"--steps {steps} is too few: the suggestion skips the first {SKIP_START} and last "
                         f"{SKIP_END} points, so at least {SKIP_START + SKIP_END + 2} are needed")
    for group in optimizer.param_groups:
        group["lr"] = start_lr
    finder = LRFinder(_Unpacking(model), optimizer, loss, device=device)
    try:
        finder.range_test(_Batches(batches, split), end_lr=end_lr, num_iter=steps, step_mode="exp", smooth_f=smooth)
    finally:
        finder.reset()
    lrs, losses = finder.history["lr"], finder.history["loss"]
    kept = slice(SKIP_START, len(lrs) - SKIP_END)
    if len(lrs[kept]) < 2:
        raise ValueError(f"the loss diverged after {len(lrs)} steps, before a rate could be suggested: "
                         f"lower --end-lr (now {end_lr})")
    return RangeTest(lrs, losses, suggest(lrs[kept], losses[kept], rule), rule)


def plot(result: RangeTest, path: Path, title: str) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses)
    ax.axvline(result.suggestion, color="tab:red", linestyle="--",
               label=f"suggested {result.suggestion:.2e} ({result.rule})")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed loss", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def clip_setup(args):
    """(model, loss, batches, split) for CLIP pretraining from scratch on the shards."""
    if args.train_data is None:
        args.train_data = ensure_demo_data().train_shards
    name = args.model or "DTP-ViT-Ti-16-64-4x"
    clip, preprocess, _ = create_clip_and_transforms(name, model_kwargs=args.model_kwargs)
    batches = make_train_loader(args.train_data, preprocess, open_clip.get_tokenizer(name), args.batch_size,
                                num_workers=args.workers, resampled=True, seed=args.seed,
                                samples_per_epoch=args.batch_size * (args.steps + 1))
    contrastive = open_clip.ClipLoss()

    def loss(outputs, _):
        image_features, text_features, logit_scale, aux_loss, _, _ = outputs
        return contrastive(image_features, text_features, logit_scale) + aux_loss

    return ContrastiveModel(clip), loss, batches, lambda batch: (tuple(batch), None)


class _Classifier(nn.Module):
    """encoder -> (logits, aux loss), the classify task's outputs."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images):
        return logits_of(self.encoder, images)


def classify_setup(args):
    """(model, loss, batches, split) for classification from scratch on the labelled set."""
    name = args.model or "plain_vit_tiny_patch16_64"
    train_tf, eval_tf = encoder_transforms(create_encoder(name, **args.model_kwargs))
    if args.train_data:
        data, split = data_dir(args.train_data, "--train-data"), args.train_split
    else:  # the demo's labelled images: its eval set's one split
        data, split = demo_eval_dir(), "test"
    train, _, classnames = load_datasets(data, None, train_tf, eval_tf, split, seed=args.seed)
    model = _Classifier(build_classifier(name, len(classnames), "scratch", **args.model_kwargs))

    def loss(outputs, labels):
        logits, aux_loss = outputs
        return F.cross_entropy(logits, labels) + aux_loss

    return model, loss, make_loader(train, args.batch_size, True, args.workers, args.seed), \
        lambda batch: ((batch[0],), batch[1])


def main(argv=None, args=None) -> RangeTest:
    args = args or parse_args(make_arg_parser(), argv)
    out = Path(args.out) if args.out else runs_root() / f"{run_name('lr_find-' + args.task)}.png"
    if out.exists():
        raise FileExistsError(f"--out {str(out)!r} already exists: choose a new file for the plot")
    torch.manual_seed(args.seed)
    model, loss, batches, split = (clip_setup if args.task == "clip" else classify_setup)(args)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.start_lr)
    status(f"LR range test: {args.task}, {args.steps} steps from {args.start_lr:g} to {args.end_lr:g}")
    result = range_test(model, optimizer, loss, batches, split, args.steps, args.start_lr, args.end_lr,
                        args.smooth, args.device or default_device(), args.rule)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, out, f"LR range test: {args.task}, {args.model or 'demo model'}")
    out.with_suffix(".json").write_text(json.dumps(
        {"task": args.task, "model": args.model, "suggested_lr": result.suggestion, "lr": result.lrs,
         "smoothed_loss": result.losses, "rule": result.rule}, indent=1))
    print(f"suggested learning rate: {result.suggestion:.3g} ({result.rule} rule on the smoothed loss, see --help); "
          f"plot: {out}")
    return result


if __name__ == "__main__":
    run_main(main, args=ARGS)
