"""Bad input, one row each: what a user mistypes or points at, and the message that names it.

Each row runs an entry point through `dtpclip.cli.run_main` (what `python -m ...` and the launchers
do), so the check is the whole path: a clear message, a non-zero exit, no traceback (argparse's own
errors exit 2 with the usage and the message; the others exit 1 with `error: ...`). The next bad
input is one more row.
"""
import json
import re
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from dtpclip import classify, profile, quantize, visualize, zeroshot
from dtpclip.cli import make_parser, parse_args, run_main
from dtpclip.training import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
import clip_pretrain  # noqa: E402
import llava_align  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A dtpclip checkpoint directory of a demo-size plain CLIP."""
    directory = tmp_path_factory.mktemp("ckpt") / "plain"
    directory.mkdir()
    torch.manual_seed(0)
    save_file(open_clip.create_model("PlainViT-Ti-8-64").state_dict(), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model": "PlainViT-Ti-8-64"}))
    return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory, checkpoint, small_demo):
    root = tmp_path_factory.mktemp("inputs")
    (root / "batch.yaml").write_text("batch_size: 8.7\n")
    (root / "broken.yaml").write_text("epochs: [1,\n")
    (root / "a").mkdir()
    (root / "b").mkdir()
    image = next(small_demo.llava_images.rglob("*.jpg"))
    for folder in ("a", "b"):
        (root / folder / "x.jpg").write_bytes(image.read_bytes())
    return {"ckpt": str(checkpoint), "root": root, "calib": str(small_demo.eval_dir), "eval": str(small_demo.eval_dir)}


def quantize_args(f, *extra):
    return ["--checkpoint", f["ckpt"], "--calib-data", f["calib"], "--calib-images", "4", *extra]


# (what is wrong, entry point, its argv given the input files, the message expected)
ROWS = [
    ("0 weight bits", quantize.main, lambda f: quantize_args(f, "--w-bits", "0", "--out", str(f["root"] / "q0")),
     r"weight bits \(--w-bits\) must be an integer in \[2, 16\], got 0"),
    ("1 weight bit", quantize.main, lambda f: quantize_args(f, "--w-bits", "1", "--out", str(f["root"] / "q1")),
     r"weight bits \(--w-bits\) must be an integer in \[2, 16\], got 1"),
    ("64 activation bits", quantize.main, lambda f: quantize_args(f, "--a-bits", "64", "--out", str(f["root"] / "q2")),
     r"activation bits \(--a-bits\) must be an integer in \[2, 16\], got 64"),
    ("calibration batch of 0", quantize.main, lambda f: quantize_args(f, "--batch-size", "0"),
     r"--batch-size must be at least 1, got 0"),
    ("quantize --out is the source checkpoint", quantize.main, lambda f: quantize_args(f, "--out", f["ckpt"]),
     r"already holds a checkpoint .*choose a new output directory"),
    ("--epochs 0", clip_pretrain.main, lambda f: ["--epochs", "0"], r"--epochs must be at least 1, got 0"),
    ("--save-every 0", clip_pretrain.main, lambda f: ["--save-every", "0"], r"--save-every must be at least 1"),
    ("--log-every 0", clip_pretrain.main, lambda f: ["--log-every", "0"], r"--log-every must be at least 1"),
    ("--grad-accum-steps 0", clip_pretrain.main, lambda f: ["--grad-accum-steps", "0"],
     r"--grad-accum-steps must be at least 1"),
    ("LLaVA --epochs 0", llava_align.main, lambda f: ["--epochs", "0"], r"--epochs must be at least 1, got 0"),
    ("LLaVA --grad-accum 0", llava_align.main, lambda f: ["--grad-accum", "0"], r"--grad-accum must be at least 1"),
    ("a float batch size in a config file", clip_pretrain.main,
     lambda f: ["--config", str(f["root"] / "batch.yaml")],
     r"batch.yaml', key 'batch_size': expected an integer, got 8.7"),
    ("a config file that is not YAML", clip_pretrain.main, lambda f: ["--config", str(f["root"] / "broken.yaml")],
     r"broken.yaml' is not valid YAML / JSON"),
    ("a near-miss model name", zeroshot.main, lambda f: ["--checkpoint", f["ckpt"], "--model", "PlainViT-Ti-8-46"],
     r"unknown CLIP model 'PlainViT-Ti-8-46'; did you mean 'PlainViT-Ti-8-64'"),
    ("a near-miss encoder name", profile.main, lambda f: ["--model", "dtp_vit_tiny_patch8_64_4", "--repeats", "1"],
     r"unknown encoder 'dtp_vit_tiny_patch8_64_4'; did you mean 'dtp_vit_tiny_patch8_64_4x'"),
    ("a kwarg against a named variant", profile.main,
     lambda f: ["--model", "dtp_vit_tiny_patch8_64_4x", "--model-kwargs", "compression=0.2"],
     r"dtp_vit_tiny_patch8_64_4x is the variant \{'compression': 0.25\}.*build dtp_vit_tiny_patch8_64 with"),
    ("a compression given as a string", profile.main,
     lambda f: ["--model", "dtp_vit_tiny_patch8_64", "--model-kwargs", "compression='0.25'"],
     r"compression \(boundary prior\) must be a number in \(0, 1\), got '0.25'"),
    ("an unknown transform", zeroshot.main, lambda f: ["--checkpoint", f["ckpt"], "--transform", "tomee:r=2"],
     r"unknown transform 'tomee'"),
    ("a transform parameter it does not take", zeroshot.main,
     lambda f: ["--checkpoint", f["ckpt"], "--transform", "tome:k=2"], r"unknown parameter\(s\) \['k'\]"),
    ("a transform that does not apply", visualize.main,
     lambda f: ["--model", "dtp_vit_tiny_patch8_64", "--transform", "tome:r=2", "--images",
                str(f["root"] / "a" / "x.jpg"), "--out", str(f["root"] / "vis")],
     r"token merging does not apply to DTPViT"),
    ("two images with one file stem", visualize.main,
     lambda f: ["--model", "plain_vit_tiny_patch8_64", "--images", str(f["root"] / "a" / "x.jpg"),
                str(f["root"] / "b" / "x.jpg"), "--out", str(f["root"] / "vis")],
     r"share the file stem 'x': their pictures would overwrite each other"),
    ("a missing checkpoint", classify.main, lambda f: ["--checkpoint", str(f["root"] / "nope")],
     r"checkpoint '.*nope' does not exist"),
]


@pytest.mark.parametrize("what, main, argv, message", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_exits_with_a_message_naming_it(what, main, argv, message, files, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DTPCLIP_RUNS_DIR", str(tmp_path / "runs"))
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv(files))
    code = exit_info.value.code
    said = code if isinstance(code, str) else capsys.readouterr().err
    assert code == 2 or (isinstance(code, str) and code.startswith("error: ")), f"{what}: exit {code!r}"
    assert re.search(message, said), said


def test_config_file_values_go_through_the_flags_types(tmp_path):
    parser = make_parser("x")
    parser.add_argument("--lock-image", action="store_true")
    parser.add_argument("--lr", type=float, default=1.0)
    (tmp_path / "run.yaml").write_text("lock_image: 'false'\nlr: '3e-4'\n")
    args = parse_args(parser, ["--config", str(tmp_path / "run.yaml")])
    assert args.lock_image is False and args.lr == 3e-4


def test_resume_none_on_an_existing_run_is_refused(small_demo, tmp_path):
    from dtpclip.training import train
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    with pytest.raises(FileExistsError, match="already holds a run .*--resume auto to continue it"):
        train(TrainConfig(model="PlainViT-Ti-8-64", train_data=small_demo.train_shards, eval_data="", workers=0,
                          batch_size=8, samples_per_epoch=16, run_dir=str(tmp_path), resume="none"))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"kind": "train", "step": 1}\n'


def test_export_refuses_an_existing_output(tmp_path):
    from llava_bridge.export import export_hf
    existing = tmp_path / "model.bin"
    existing.write_text("mine")
    with pytest.raises(FileExistsError, match="model.bin' already exists \\(a file\\)"):
        export_hf(None, None, None, {}, existing)
    assert existing.read_text() == "mine"


def test_a_plain_checkpoint_in_a_dtp_model_says_what_stays_fresh(checkpoint):
    from dtpclip.clip import create_clip_and_transforms
    with pytest.warns(UserWarning, match=r"holds no visual.trunk.boundary_predictor.\* .*fresh initialisation"):
        create_clip_and_transforms("DTP-ViT-Ti-8-64-4x", pretrained=str(checkpoint / "model.safetensors"))


def test_malformed_llava_json_is_named(tmp_path):
    from llava_bridge.data import read_records
    (tmp_path / "data.json").write_text("[{]")
    with pytest.raises(ValueError, match="data.json' is not valid json"):
        read_records(tmp_path / "data.json")


def test_an_empty_batch_is_named():
    import timm
    model = timm.create_model("dtp_vit_tiny_patch8_64", embed_dim=32, depth=4, num_heads=2).eval()
    with pytest.raises(ValueError, match=r"empty batch \(0 images\)"):
        model.encode(torch.empty(0, 3, 64, 64))


ENTRY_POINTS = [["-m", m] for m in ("dtpclip.zeroshot", "dtpclip.classify", "dtpclip.profile", "dtpclip.quantize",
                                     "dtpclip.visualize", "dtpclip.models", "dtpclip.demo_data", "dtpclip.export",
                                     "dtpclip.open_clip_train",
                                     "llava_bridge.generate", "llava_bridge.export")] + \
               [[str(Path(__file__).resolve().parents[1] / "launch" / f)] for f in ("clip_pretrain.py", "llava_align.py")]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=[e[-1].rsplit("/", 1)[-1] for e in ENTRY_POINTS])
def test_help_and_argument_errors_come_before_torch_is_imported(entry):
    """--help (and a bad argument) are answered before the heavy imports: torch is never imported."""
    import subprocess
    for flag, code in (("--help", 0), ("--no-such-flag", 2)):
        done = subprocess.run([sys.executable, "-X", "importtime", *entry, flag], capture_output=True, text=True)
        assert done.returncode == code, done.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
        assert "torch" not in imported and "usage:" in done.stdout + done.stderr
