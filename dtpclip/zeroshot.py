"""python -m dtpclip.zeroshot: zero-shot classification accuracy of a CLIP checkpoint on an eval set.

The classifier is open_clip's (`build_zero_shot_classifier`): for each class, the normalised mean
of the normalised text embeddings of its prompts (class name x templates). Images go through the
encoder contract (`dtpclip.clip.encode_image`); logits = 100 * normalised image features @ classifier.
Reported: top-1, top-5 and mean per-class recall (dtpclip.evaluate).

    python -m dtpclip.zeroshot                                  # latest demo checkpoint, demo eval set
    python -m dtpclip.zeroshot --checkpoint RUN/ckpt --data imagenet-val --classnames imagenet \\
        --templates openai --output zeroshot.json

Eval sets are CLIP_benchmark wds or ImageFolder directories (dtpclip.evalsets); ImageNet class
names and the OpenAI templates come with open_clip, offline.
"""
import os

from dtpclip.cli import add_model_kwargs, add_transform, early_args, make_parser, parse_args, run_main


def make_arg_parser():
    parser = make_parser(__doc__.splitlines()[0], "python -m dtpclip.zeroshot")
    parser.add_argument("--model", default=None,
                        help="our open_clip name, e.g. DTP-ViT-B-32-10x; None: the checkpoint's config.json")
    parser.add_argument("--checkpoint", default=None,
                        help="open_clip checkpoint file (.safetensors/.pt/.bin), dtpclip checkpoint directory or "
                             "run directory; None: the latest demo checkpoint")
    add_model_kwargs(parser)
    add_transform(parser)
    parser.add_argument("--calib-data", default=None, help="calibration images of a --transform that calibrates "
                        "(eval-set directory or shards); None: the demo's train shards")
    parser.add_argument("--data", default=None, help="eval set directory, wds or ImageFolder; None: the demo's")
    parser.add_argument("--split", default="test", help="split folder of the eval set (root itself if absent)")
    parser.add_argument("--classnames", default=None,
                        help="'imagenet' or a file, one name per line in label order; None: the eval set's")
    parser.add_argument("--templates", default=None,
                        help="'openai', 'simple' or a file, one prompt per line with {c}; None: the eval set's "
                             "zeroshot_classification_templates.txt, else 'a photo of a {c}.'")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--device", default=None, help="torch device (None: cuda when available, else cpu)")
    parser.add_argument("--output", default=None, help="write the result as JSON to this file")
    return parser


# `python -m`: the arguments are parsed here, before the heavy imports below (fast --help)
ARGS = early_args(make_arg_parser, __name__)

import contextlib  # noqa: E402  (after the early parse, as every import below)
import json
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from torch.utils.data import DataLoader
from tqdm import tqdm

from dtpclip.calibration import calibration_batches
from dtpclip.checkpoint import write_json
from dtpclip.clip import create_clip_and_transforms, encode_image
from dtpclip.evalsets import EvalSet, load_eval_set
from dtpclip.evaluate import ClassificationMeter, clip_name, demo_eval_dir, resolve_model
from dtpclip.factory import apply_transforms
from dtpclip.measure import default_device

Template = Union[str, Callable[[str], str]]
CLASSNAME_SETS = {"imagenet": IMAGENET_CLASSNAMES}
TEMPLATE_SETS = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}


def fill_template(template: Template, classname: str) -> str:
    """A prompt: open_clip's callables, or strings with CLIP_benchmark's "{c}" or format's "{}"."""
    if callable(template):
        return template(classname)
    return template.replace("{c}", classname).replace("{}", classname)


def _read_list(path: str, what: str) -> List[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what} file {path!r} is empty (expected one per line)")
    return lines


def load_classnames(spec: str) -> List[str]:
    """'imagenet' (open_clip's 1000 names) or a file with one class name per line, in label order."""
    if spec in CLASSNAME_SETS:
        return list(CLASSNAME_SETS[spec])
    if not Path(spec).expanduser().is_file():
        raise FileNotFoundError(f"--classnames {spec!r} is neither {' nor '.join(CLASSNAME_SETS)} nor a file")
    return _read_list(spec, "class names")


def load_templates(spec: str) -> List[Template]:
    """'openai' (80 prompts), 'simple' (7) or a file with one prompt per line, "{c}" marking the class."""
    if spec in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[spec])
    if not Path(spec).expanduser().is_file():
        raise FileNotFoundError(f"--templates {spec!r} is neither {', '.join(TEMPLATE_SETS)} nor a file")
    templates = _read_list(spec, "templates")
    unmarked = [t for t in templates if "{c}" not in t and "{}" not in t]
    if unmarked:
        raise ValueError(f"templates file {spec!r}: {unmarked[0]!r} has no '{{c}}' where the class name goes")
    return templates


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode inside, the caller's mode restored after (the training loop calls us mid-run)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def zero_shot_classifier(model: torch.nn.Module, tokenizer: Callable, classnames: Sequence[str],
                         templates: Sequence[Template], device="cpu", batch_size: int = 512,
                         progress: bool = False) -> torch.Tensor:
    """Classifier weights [embed_dim, num_classes], as open_clip's `build_zero_shot_classifier`.

    All prompts are encoded in batches of `batch_size` (not per class), in eval mode.
    """
    if not classnames or not templates:
        raise ValueError(f"zero-shot needs class names and templates, got {len(classnames)} and {len(templates)}")
    prompts = [fill_template(t, c) for c in classnames for t in templates]
    embeddings = []
    with eval_mode(model):
        for start in tqdm(range(0, len(prompts), batch_size), desc="zero-shot classifier", unit="batch",
                          disable=not progress):
            tokens = tokenizer(prompts[start:start + batch_size]).to(device)
            embeddings.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_class = torch.cat(embeddings).reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T


def zero_shot_logits(model: torch.nn.Module, classifier: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """[B, num_classes] = 100 * normalised image features @ classifier, through the encoder contract."""
    features, _ = encode_image(model, images)
    return 100.0 * F.normalize(features.float(), dim=-1) @ classifier.to(features.device, torch.float32)


@torch.no_grad()
def evaluate_zero_shot(model: torch.nn.Module, classifier: torch.Tensor, loader, device="cpu",
                       progress: bool = False, source: str = "the eval set") -> dict:
    """{'top1', 'top5', 'mean_per_class_recall', 'n'} of the classifier over (images, labels) batches."""
    meter = ClassificationMeter(classifier.shape[1], source=source)
    with eval_mode(model):
        for images, targets in tqdm(loader, desc="zero-shot eval", unit="batch", disable=not progress):
            meter.update(zero_shot_logits(model, classifier, images.to(device)), targets)
    return meter.compute()


def default_preprocess(model: torch.nn.Module) -> Callable:
    """The eval transform open_clip attached to `model` (resize, crop, CLIP normalisation)."""
    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)


def run_zero_shot(model: torch.nn.Module, tokenizer: Callable, data: Union[str, os.PathLike, EvalSet],
                  preprocess: Optional[Callable] = None, classnames: Optional[Sequence[str]] = None,
                  templates: Optional[Sequence[Template]] = None, *, split: str = "test", batch_size: int = 256,
                  workers: int = 0, device="cpu", progress: bool = False) -> dict:
    """Zero-shot eval of `model` on an eval set (a directory, or an EvalSet already loaded).

    classnames / templates default to the eval set's own; given class names must be as many as its
    classes. preprocess defaults to the model's eval transform. Returns the metrics with
    'classes', 'templates', 'seconds' and 'images_per_s'. The model's train/eval mode is kept.
    """
    start = time.perf_counter()
    source = f"eval set {str(data)!r}" if not isinstance(data, EvalSet) else "the eval set"
    if not isinstance(data, EvalSet):
        data = load_eval_set(data, preprocess or default_preprocess(model), split)
    if classnames is not None and len(classnames) != len(data.classnames):
        raise ValueError(f"{len(classnames)} class names were given but {source} has {len(data.classnames)} "
                         f"classes ({', '.join(data.classnames[:5])}{', ...' if len(data.classnames) > 5 else ''})")
    classnames = list(data.classnames if classnames is None else classnames)
    templates = list(data.templates if templates is None else templates)
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device, progress=progress)
    loader = DataLoader(data.dataset, batch_size=batch_size, num_workers=workers)
    result = evaluate_zero_shot(model, classifier, loader, device, progress, source)
    seconds = time.perf_counter() - start
    result.update(classes=len(classnames), templates=len(templates), seconds=seconds,
                  images_per_s=result["n"] / seconds)
    if data.counts is not None and data.counts.snapshot().skipped_samples:
        result["data_counts"] = str(data.counts.snapshot())
    return result


def main(argv=None, args=None) -> dict:
    args = args or parse_args(make_arg_parser(), argv)
    args.device = args.device or default_device()
    source = resolve_model(args.checkpoint, args.model, args.model_kwargs)
    name = clip_name(source.name)
    data = Path(args.data).expanduser() if args.data else demo_eval_dir()
    if not data.is_dir():
        raise FileNotFoundError(f"--data {str(data)!r} does not exist (expected an eval set directory: "
                                "CLIP_benchmark wds layout or ImageFolder)")
    classnames = load_classnames(args.classnames) if args.classnames else None
    templates = load_templates(args.templates) if args.templates else None
    model, _, preprocess = create_clip_and_transforms(name, str(source.weights), source.model_kwargs,
                                                      device=args.device)
    calibration = calibration_batches(args.transforms, args.calib_data, preprocess, device=args.device)
    apply_transforms(model.visual.trunk, args.transforms, calibration)
    result = run_zero_shot(model, open_clip.get_tokenizer(name), data, preprocess, classnames, templates,
                           split=args.split, batch_size=args.batch_size, workers=args.workers,
                           device=args.device, progress=True)
    result = {"model": name, "model_kwargs": source.model_kwargs, "transforms": args.transforms,
              "checkpoint": str(source.weights), "data": str(data), **result}
    print(json.dumps(result, indent=2))
    if args.output:
        write_json(args.output, result)
    return result


if __name__ == "__main__":
    run_main(main, args=ARGS)
