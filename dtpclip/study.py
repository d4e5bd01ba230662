"""python -m dtpclip.study: a study's every entry trained for several seeds, scored, in one table and plot.

A study is a list of entries (a built-in name or a YAML / JSON file of the same shape):

- a trained entry: `{name: ..., model: ..., <any other TrainConfig key>}`, run by `dtpclip.training.train`
  once per seed into OUT/<name>/seed<k>. A value "run:OTHER" is the same seed's final checkpoint of entry
  OTHER (e.g. `pretrained: run:plain` to start from the plain CLIP, or `teacher: run:plain`).
- a transform entry: `{name: ..., of: OTHER, transform: SPEC}`, the training-free transform applied to
  each seed's run of OTHER (calibrating ones on the demo's train shards).

Finished runs are kept (a `study_done.json` beside each, with the entry's settings), so a killed study goes on
where it stopped, and a run cut short resumes from its last checkpoint. Studies share one directory of runs
by default: an entry of the same name and settings in another study (the plain ViT, DTP 4x) is trained once;
one of the same name and other settings is refused, never reused. Each run is then scored on the eval set:
zero-shot top-1 (mean and sample standard deviation over seeds, and per seed), the step where its loss left the
collapsed start (`left_chance_at`), GMACs per image of the visual tower (counted on eval
images, DTP on its actual tokens), and, on the first seed's weights, the visual tower's measured inference time
per image and its forward + backward step (trained entries), timed one entry after another in this process.
With --score-only nothing trains: each entry is scored on the seeds whose runs are finished.
Outputs in OUT, named after the study: NAME.json (every run and the aggregates), NAME.md (the table), NAME.png
(top-1 against GMACs, inference time and train step time, error bars over seeds); with --only,
NAME-only-ENTRY... instead, so a partial run leaves the whole study's table as it was.

    python -m dtpclip.study                                  # the families study on the demo, 3 seeds
    python -m dtpclip.study --study recipes.yaml --seeds 0 1 2 --out runs/recipes
"""
from dtpclip.cli import early_args, make_parser, parse_args, run_main

# The comparison of every token-reduction family at the demo budget (same epochs, data and schedule). DynamicViT
# starts from the plain CLIP, as its reference fine-tunes a trained ViT: from scratch its keep decisions, random
# masks at every step, kept the demo CLIP near chance for 6 epochs (seed 0: 11.3% at rho 0.7, 12.5% at 0.5).
FAMILIES = [
    {"name": "ViT", "model": "PlainViT-Ti-16-64"},
    {"name": "ViT 3 epochs", "model": "PlainViT-Ti-16-64", "epochs": 3},
    {"name": "DTP 2x", "model": "DTP-ViT-Ti-16-64-2x"},
    {"name": "DTP 4x", "model": "DTP-ViT-Ti-16-64-4x"},
    {"name": "DTP 10x", "model": "DTP-ViT-Ti-16-64-10x"},
    {"name": "DTP entropy", "model": "DTP-ViT-Ti-16-64-entropy"},
    {"name": "DynamicViT rho 0.7 from ViT 3 epochs", "model": "DynamicViT-Ti-16-64-rho07",
     "pretrained": "run:ViT 3 epochs", "epochs": 3},  # 6 epochs in all, as every entry
    {"name": "DynamicViT rho 0.5 from ViT 3 epochs", "model": "DynamicViT-Ti-16-64-rho05",
     "pretrained": "run:ViT 3 epochs", "epochs": 3},
    {"name": "TokenLearner 8", "model": "TokenLearner-ViT-Ti-16-64-8tok"},
    {"name": "TokenLearner 16", "model": "TokenLearner-ViT-Ti-16-64-16tok"},
    {"name": "VQ-ViT", "model": "VQ-ViT-Ti-16-64"},
    {"name": "ViT + ToMe r=1", "of": "ViT", "transform": "tome:r=1"},
    {"name": "ViT + ToMe r=2", "of": "ViT", "transform": "tome:r=2"},
    {"name": "ViT + LGTM r=1", "of": "ViT", "transform": "lgtm:r=1"},
    {"name": "ViT + LGTM r=2", "of": "ViT", "transform": "lgtm:r=2"},
    {"name": "ViT + W8A8 PTQ", "of": "ViT", "transform": "ptq:w=8,a=8"},
]
# DTP's accuracy recipes against the plain ViT at the same total training compute as its 6 demo epochs. Per
# sample, forward (backward alike), visual + text tower, by fvcore on fresh Ti-16-64 CLIPs: plain 0.0254 GMACs,
# DTP 4x 0.0169 (1.50x less), DTP 10x 0.0151 (1.68x less). A distillation teacher's forward is counted: with
# the plain CLIP as teacher a DTP step costs about a plain step. "from ViT 3 epochs" counts those 3 epochs. While
# annealed (boundary rate 1 -> 0.25 on a half cosine, mean 0.62) a DTP 4x step costs 0.86 of a plain one (fvcore at
# the mean rate), against 0.67 at its rate.
DTP_RECIPES = [
    {"name": "ViT", "model": "PlainViT-Ti-16-64"},
    {"name": "DTP 4x", "model": "DTP-ViT-Ti-16-64-4x"},
    {"name": "DTP 4x, same compute", "model": "DTP-ViT-Ti-16-64-4x", "epochs": 9},
    {"name": "ViT 3 epochs", "model": "PlainViT-Ti-16-64", "epochs": 3},
    {"name": "DTP 4x from ViT 3 epochs", "model": "DTP-ViT-Ti-16-64-4x", "pretrained": "run:ViT 3 epochs",
     "epochs": 5, "samples_per_epoch": 18000},  # 4.5 demo epochs: 3 plain epochs' compute
    {"name": "DTP 4x from ViT 3 epochs + KD", "model": "DTP-ViT-Ti-16-64-4x", "pretrained": "run:ViT 3 epochs",
     "teacher": "run:ViT 3 epochs", "epochs": 3},
    {"name": "DTP 4x from ViT 3 epochs, annealed", "model": "DTP-ViT-Ti-16-64-4x", "pretrained": "run:ViT 3 epochs",
     "reduction_anneal": 0.333, "epochs": 5, "samples_per_epoch": 16400},  # 4.1 demo epochs, a third annealed
    {"name": "DTP 10x", "model": "DTP-ViT-Ti-16-64-10x"},
    {"name": "DTP 10x, same compute", "model": "DTP-ViT-Ti-16-64-10x", "epochs": 10},
    {"name": "DTP 10x from ViT 3 epochs", "model": "DTP-ViT-Ti-16-64-10x", "pretrained": "run:ViT 3 epochs",
     "epochs": 5},
    {"name": "DTP 10x from ViT 3 epochs + KD", "model": "DTP-ViT-Ti-16-64-10x", "pretrained": "run:ViT 3 epochs",
     "teacher": "run:ViT 3 epochs", "epochs": 3},
]
STUDIES = {"families": FAMILIES, "dtp_recipes": DTP_RECIPES}


def make_arg_parser():
    parser = make_parser(__doc__.splitlines()[0], "python -m dtpclip.study")
    parser.add_argument("--study", default="families", help=f"a built-in study ({', '.join(STUDIES)}) or a YAML / "
                        "JSON file: a list of entries (see the module docstring)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every trained entry")
    parser.add_argument("--out", default=None,
                        help="directory of the runs and the outputs (None: <runs root>/studies, shared by studies)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run and score only these entries (and the entries they build on)")
    parser.add_argument("--score-only", action="store_true",
                        help="train nothing: score each entry on the seeds whose runs are finished (the table counts "
                             "them per row)")
    parser.add_argument("--eval-data", default=None, help="zero-shot eval set (None: the demo eval set)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per timed step")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--device", default=None, help="torch device (None: cuda when available, else cpu)")
    return parser


# `python -m`: the arguments are parsed here, before the heavy imports below (fast --help)
ARGS = early_args(make_arg_parser, __name__)

import dataclasses  # noqa: E402  (after the early parse, as every import below)
import json
import math
import re
import statistics
from pathlib import Path
from typing import Dict, List, Optional

import open_clip
import yaml

from dtpclip.calibration import calibration_batches
from dtpclip.checkpoint import resolve_checkpoint
from dtpclip.checkpointing import runs_root
from dtpclip.clip import create_clip_and_transforms, encoder_transforms
from dtpclip.evalsets import load_eval_set
from dtpclip.evaluate import clip_name, demo_eval_dir, registry_name, resolve_model
from dtpclip.factory import apply_transforms
from dtpclip.measure import default_device
from dtpclip.pareto import TRAINED, accuracy_point, transform_sweep
from dtpclip.profile import build_visual_tower, profile_tower
from dtpclip.train_config import TrainConfig

RUN_REF = "run:"
FIXED_KEYS = ("run_dir", "seed", "name")  # the study sets these per run


def load_study(study: str) -> List[dict]:
    """The entries of a built-in study or of a YAML / JSON file, checked (names, keys, references)."""
    if study in STUDIES:
        entries = STUDIES[study]
    else:
        path = Path(study)
        if not path.is_file():
            raise FileNotFoundError(f"--study {study!r} is neither a built-in study ({', '.join(STUDIES)}) nor a file")
        entries = yaml.safe_load(path.read_text())
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"{path}: a study is a list of entries (mappings), got {type(entries).__name__}")
    names = [e.get("name") for e in entries]
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(FIXED_KEYS)
    for i, entry in enumerate(entries):
        where = f"study {study!r}, entry {i} ({entry.get('name')!r})"
        if not entry.get("name") or names.count(entry["name"]) > 1:
            raise ValueError(f"{where}: every entry needs a name of its own")
        if "transform" in entry:
            if set(entry) != {"name", "of", "transform"} or entry["of"] not in names[:i]:
                raise ValueError(f"{where}: a transform entry is {{name, of, transform}}, `of` an entry before it")
            continue
        unknown = sorted(set(entry) - fields - {"name"})
        if unknown or "model" not in entry:
            raise ValueError(f"{where}: needs `model`; unknown keys {unknown} (TrainConfig keys: {sorted(fields)})")
        for key, value in entry.items():
            if isinstance(value, str) and value.startswith(RUN_REF) and value[len(RUN_REF):] not in names[:i]:
                raise ValueError(f"{where}: {key}={value!r} names no entry before it")
    return entries


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / slug(name) / f"seed{seed}"


def needed(entries: List[dict], only: Optional[List[str]]) -> List[dict]:
    """The entries in `only` and those they build on (all when `only` is None), in study order."""
    if only is None:
        return entries
    by_name = {e["name"]: e for e in entries}
    unknown = sorted(set(only) - set(by_name))
    if unknown:
        raise ValueError(f"--only {unknown}: no such entries; the study has {list(by_name)}")
    keep, todo = set(), list(only)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            entry = by_name[name]
            todo += [entry["of"]] if "of" in entry else [v[len(RUN_REF):] for v in entry.values()
                                                          if isinstance(v, str) and v.startswith(RUN_REF)]
    return [e for e in entries if e["name"] in keep]


def train_entry(entry: dict, out: Path, seed: int) -> Path:
    """Train one seed of a trained entry (skipped when done; resumed when cut short); returns its run dir."""
    from dtpclip.training import train  # torch-heavy, only when something trains

    directory = run_dir(out, entry["name"], seed)
    done = directory / "study_done.json"
    settings = {k: v for k, v in entry.items() if k != "name"}  # run: references as written: the pool can move
    if done.exists():  # a finished run is reused only for the settings it was trained with
        before = json.loads(done.read_text())["settings"]
        changed = sorted(k for k in set(before) | set(settings)
                         if json.dumps(before.get(k), default=str) != json.dumps(settings.get(k), default=str))
        if changed:
            raise ValueError(f"{directory} holds a finished run of entry {entry['name']!r} trained with other "
                             f"settings ({', '.join(changed)}); rename the entry or pass another --out")
        return directory
    resolved = {k: (str(resolve_checkpoint(run_dir(out, v[len(RUN_REF):], seed))[0])
                    if isinstance(v, str) and v.startswith(RUN_REF) else v) for k, v in settings.items()}
    summary = train(TrainConfig(**resolved, run_dir=str(directory), seed=seed))
    done.write_text(json.dumps({"settings": settings, "seed": seed, "summary": summary}, indent=2, default=str) + "\n")
    return directory


def finished_seeds(entry: dict, by_name: Dict[str, dict], out: Path, seeds: List[int]) -> List[int]:
    """The seeds whose run of `entry` (of its source, for a transform) is finished."""
    source = by_name[entry["of"]] if "transform" in entry else entry
    return [seed for seed in seeds if (run_dir(out, source["name"], seed) / "study_done.json").exists()]


def left_chance_at(directory: Path, batch_size: int) -> Optional[int]:
    """The first logged step whose contrastive loss is below ln(batch) - 0.1: where a run left the collapsed
    start in which every image matches every caption alike (None: it never did)."""
    for line in (directory / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train" and record["contrastive_loss"] < math.log(batch_size) - 0.1:
            return record["step"]
    return None


def score_entry(entry: dict, source: dict, out: Path, seed: int, eval_data: str, device: str) -> dict:
    """Zero-shot top-1 / top-5 and GMACs of one seed (a trained run, or the transform on `source`'s run)."""
    model = resolve_model(run_dir(out, source["name"], seed))
    name = clip_name(model.name)
    clip, _, preprocess = create_clip_and_transforms(name, str(model.weights), model.model_kwargs, device=device)
    tokenizer, eval_set = open_clip.get_tokenizer(name), load_eval_set(eval_data, preprocess)
    if "transform" not in entry:
        return {**accuracy_point(clip, tokenizer, eval_set, entry["name"], TRAINED, device=device),
                "left_chance_at": left_chance_at(run_dir(out, entry["name"], seed),
                                                 entry.get("batch_size", TrainConfig.batch_size))}
    calibration = calibration_batches([entry["transform"]], None, preprocess, device=device)
    return transform_sweep(clip, tokenizer, eval_set, [entry["transform"]], entry["name"], calibration, device)[0]


def time_entry(entry: dict, source: dict, out: Path, args, seed: int) -> dict:
    """Inference ms per image and (trained entries) train step ms of `seed`'s visual tower."""
    model = resolve_model(run_dir(out, source["name"], seed))
    tower = build_visual_tower(registry_name(model.name), str(model.weights), **model.model_kwargs)
    if "transform" in entry:
        specs = [entry["transform"]]
        apply_transforms(tower.encoder, specs, calibration_batches(specs, None, encoder_transforms(tower.encoder)[1],
                                                                   device=args.device))
    figures = profile_tower(tower, args.batch_size, "transform" not in entry, args.device, repeats=args.repeats)
    return {"infer_ms_per_image": figures["forward_ms"] / args.batch_size,
            "train_step_ms": figures.get("train_step_ms")}


def aggregate(entry: dict, points: List[dict], timing: dict) -> dict:
    top1 = [100 * p["top1"] for p in points]
    return {"name": entry["name"], "seeds": len(points), "top1_mean": statistics.mean(top1),
            "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0, "top1_per_seed": top1,
            "left_chance_at": [p["left_chance_at"] for p in points] if "left_chance_at" in points[0] else None,
            "gmacs": statistics.mean(p["gmacs"] for p in points),
            "tokens_out": statistics.mean(p["tokens_out"] for p in points),
            **timing}


def markdown(rows: List[dict], context: str) -> str:
    lines = [context, "", "| entry | GMACs / image | tokens out | inference ms / image | train step ms | "
             "zero-shot top-1 % (mean ± std, seeds) | per seed | left ln(batch) at step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        train = "" if r["train_step_ms"] is None else f"{r['train_step_ms']:.0f}"
        left = " / ".join("never" if s is None else str(s) for s in r["left_chance_at"] or [])
        lines.append(f"| {r['name']} | {r['gmacs']:.4f} | {r['tokens_out']:.1f} | {r['infer_ms_per_image']:.2f} | "
                     f"{train} | {r['top1_mean']:.1f} ± {r['top1_std']:.1f} ({r['seeds']}) | "
                     f"{' / '.join(f'{t:.1f}' for t in r['top1_per_seed'])} | {left} |")
    return "\n".join(lines) + "\n"


def plot(rows: List[dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 5), sharey=True)
    colours, markers = plt.get_cmap("tab20").colors, "os^Dv<>P"  # one (colour, marker) pair per entry
    for ax, key, label in ((axes[0], "gmacs", "GMACs per image (visual tower)"),
                           (axes[1], "infer_ms_per_image", "inference ms per image (measured)"),
                           (axes[2], "train_step_ms", "train step ms, forward + backward (measured; trained)")):
        for i, r in enumerate(rows):
            if r[key] is not None:
                ax.errorbar(r[key], r["top1_mean"], yerr=r["top1_std"], fmt=markers[i % len(markers)], capsize=3,
                            color=colours[i % len(colours)], label=r["name"])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("zero-shot top-1 (%), mean ± std over seeds")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Title": title})
    plt.close(fig)
    return path


def main(argv=None, args=None) -> Dict[str, object]:
    args = args or parse_args(make_arg_parser(), argv)
    args.device = args.device or default_device()
    entries = needed(load_study(args.study), args.only)
    study_name = args.study if args.study in STUDIES else Path(args.study).stem
    out = Path(args.out or runs_root() / "studies")
    eval_data = str(args.eval_data or demo_eval_dir())
    by_name = {e["name"]: e for e in entries}
    for entry in entries:
        if "transform" not in entry and not args.score_only:
            for seed in args.seeds:
                train_entry(entry, out, seed)
    runs, rows = [], []
    for entry in entries:
        source = by_name[entry["of"]] if "transform" in entry else entry
        seeds = finished_seeds(entry, by_name, out, args.seeds)
        if not seeds:
            print(f"{entry['name']}: no finished run of seeds {args.seeds}, left out", flush=True)
            continue
        points = [{**score_entry(entry, source, out, seed, eval_data, args.device), "seed": seed}
                  for seed in seeds]
        runs += points
        rows.append(aggregate(entry, points, time_entry(entry, source, out, args, seeds[0])))
        print(markdown(rows[-1:], "").splitlines()[-1], flush=True)
    finished = " (finished runs only)" if args.score_only else ""
    context = (f"Study {study_name!r}: seeds {args.seeds}{finished}, zero-shot on {eval_data}, timed on {args.device} "
               f"(batch {args.batch_size}, median of {args.repeats})")
    # a partial run must not replace the whole study's table
    stem = study_name if args.only is None else "-".join([study_name, "only", *map(slug, args.only)])
    outputs = [out / f"{stem}.{kind}" for kind in ("md", "json", "png")]
    outputs[0].write_text(markdown(rows, context))
    outputs[1].write_text(json.dumps({"context": context, "rows": rows, "runs": runs}, indent=2) + "\n")
    plot(rows, outputs[2], context)
    print(f"wrote {', '.join(map(str, outputs))}")
    return {"rows": rows, "runs": runs, "out": str(out)}


if __name__ == "__main__":
    run_main(main, args=ARGS)
