"""dtpclip.zeroshot: open_clip's zero-shot classifier and predictions, metrics with known answers, the CLI."""
import io
import json
import os

import numpy as np
import open_clip
import pytest
import torch
from open_clip import build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader

import dtpclip  # noqa: F401  (registers our open_clip names)
from dtpclip import checkpointing, zeroshot
from dtpclip.evalsets import load_eval_set, write_wds_evalset
from dtpclip.checkpoint import resolve_checkpoint
from dtpclip.evaluate import ClassificationMeter, classification_metrics
from dtpclip.zeroshot import evaluate_zero_shot, run_zero_shot, zero_shot_classifier, zero_shot_logits

CLASSNAMES = ["circle", "square", "triangle"]
TEMPLATES = ["a photo of the {c}.", "a drawing of the {c}."]


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def make_wds(root, labels, classnames=CLASSNAMES):
    write_wds_evalset(root, ((png(i), "png", label) for i, label in enumerate(labels)), classnames, TEMPLATES)
    return root


def saved_clip(tmp_path_factory, name: str, filename: str):
    """A demo-size CLIP with random weights, saved as a checkpoint file."""
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    path = tmp_path_factory.mktemp("ckpt") / filename
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return saved_clip(tmp_path_factory, "PlainViT-Ti-8-64", "clip.safetensors")


@pytest.fixture(scope="module")
def dtp_clip(tmp_path_factory):
    return saved_clip(tmp_path_factory, "DTP-ViT-Ti-8-64-4x", "dtp.safetensors")


@pytest.fixture(scope="module")
def wds_set(tmp_path_factory):
    return make_wds(tmp_path_factory.mktemp("evalset"), [i % 3 for i in range(9)])


# ---------------------------------------------------------------------------------------------
# metrics

def test_metrics_on_hand_made_logits():
    logits = torch.tensor([[9., 1., 0., 0.],   # target 0: top-1 hit
                           [0., 9., 5., 1.],   # target 2: 2nd
                           [0., 1., 9., 5.],   # target 0: 4th
                           [1., 9., 0., 0.],   # target 1: top-1 hit
                           [9., 0., 1., 0.]])  # target 1: 3rd
    targets = torch.tensor([0, 2, 0, 1, 1])
    result = classification_metrics(logits, targets, topk=(1, 2, 5))
    assert result["top1"] == pytest.approx(2 / 5)
    assert result["top2"] == pytest.approx(3 / 5)
    assert result["top5"] == 1.0  # k clipped to the 4 classes
    # recall: class 0 1/2, class 1 1/2, class 2 0/1; class 3 has no samples and is not averaged
    assert result["mean_per_class_recall"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert result["n"] == 5


def test_metrics_accumulate_over_batches_like_one_batch():
    logits, targets = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)), torch.arange(50) % 7
    meter = ClassificationMeter(7)
    for start in range(0, 50, 8):
        meter.update(logits[start:start + 8], targets[start:start + 8])
    assert meter.compute() == pytest.approx(classification_metrics(logits, targets))


def test_metrics_reject_labels_beyond_the_classes_and_empty_input():
    with pytest.raises(ValueError, match="has label 3 but 3 class names"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="no samples"):
        ClassificationMeter(3).compute()


# ---------------------------------------------------------------------------------------------
# agreement with open_clip

def open_clip_train_accuracy(output, target, topk):
    """open_clip_train.zero_shot.accuracy (its own fails on numpy 2's float() of a 1-element array)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum()) for k in topk]


@pytest.mark.parametrize("name", ["PlainViT-Ti-8-64", "DTP-ViT-Ti-8-64-4x"])
def test_predictions_equal_open_clip_build_zero_shot_classifier(name, tiny_clip, dtp_clip, wds_set):
    model = (tiny_clip if name == "PlainViT-Ti-8-64" else dtp_clip)[0]
    tokenizer = open_clip.get_tokenizer(name)
    templates = list(OPENAI_IMAGENET_TEMPLATES[:4])
    ours = zero_shot_classifier(model, tokenizer, CLASSNAMES, templates, batch_size=5)
    theirs = build_zero_shot_classifier(model, tokenizer, CLASSNAMES, templates, num_classes_per_batch=2)
    assert ours.shape == theirs.shape == (model.text_projection.shape[1], 3)
    assert (ours - theirs).abs().max() < 1e-5

    evalset = load_eval_set(wds_set, zeroshot.default_preprocess(model))
    loader = DataLoader(evalset.dataset, batch_size=5)
    our_logits, their_logits, targets = [], [], []
    with torch.no_grad():
        for images, labels in loader:
            our_logits.append(zero_shot_logits(model, ours, images))
            their_logits.append(100.0 * model.encode_image(images, normalize=True) @ theirs)
            targets.append(labels)
    our_logits, their_logits, targets = torch.cat(our_logits), torch.cat(their_logits), torch.cat(targets)
    assert torch.equal(our_logits.argmax(-1), their_logits.argmax(-1))
    assert torch.equal(our_logits.topk(3).indices.sort().values, their_logits.topk(3).indices.sort().values)

    result = evaluate_zero_shot(model, ours, loader)
    top1, top3 = open_clip_train_accuracy(their_logits, targets, topk=(1, 3))
    assert result["n"] == 9
    assert result["top1"] == top1 / 9 and result["top5"] == top3 / 9  # top-5 of 3 classes is top-3


def test_run_zero_shot_keeps_the_callers_train_mode(tiny_clip, wds_set):
    model = tiny_clip[0]
    model.train()
    try:
        result = run_zero_shot(model, open_clip.get_tokenizer("PlainViT-Ti-8-64"), wds_set, batch_size=8)
        assert model.training
    finally:
        model.eval()
    assert result["n"] == 9 and result["classes"] == 3 and result["templates"] == 2
    assert set(result) >= {"top1", "top5", "mean_per_class_recall", "images_per_s"}


# ---------------------------------------------------------------------------------------------
# checkpoints and the CLI

def test_resolve_checkpoint_file_directory_and_run_latest(tmp_path, tiny_clip):
    _, path = tiny_clip
    assert resolve_checkpoint(path) == (path, None)
    ckpt = tmp_path / "run" / "epoch_2"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(path.read_bytes())
    (ckpt / "config.json").write_text(json.dumps({"model": "PlainViT-Ti-8-64", "epochs": 2}))
    assert resolve_checkpoint(ckpt) == (ckpt / "model.safetensors", "PlainViT-Ti-8-64")
    assert resolve_checkpoint(ckpt / "model.safetensors") == (ckpt / "model.safetensors", "PlainViT-Ti-8-64")
    (tmp_path / "run" / "latest").write_text("epoch_2\n")
    assert resolve_checkpoint(tmp_path / "run") == (ckpt / "model.safetensors", "PlainViT-Ti-8-64")
    (tmp_path / "run2").mkdir()
    os.symlink(ckpt, tmp_path / "run2" / "latest")
    assert resolve_checkpoint(tmp_path / "run2")[1] == "PlainViT-Ti-8-64"
    with pytest.raises(FileNotFoundError, match="empty_dir' has no model.safetensors"):
        (tmp_path / "empty_dir").mkdir()
        resolve_checkpoint(tmp_path / "empty_dir")
    with pytest.raises(FileNotFoundError, match="nope.pt' does not exist"):
        resolve_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="notes.txt' is not a checkpoint file"):
        resolve_checkpoint(tmp_path / "notes.txt")


def test_resolves_the_checkpoints_the_training_loop_publishes(tmp_path, tiny_clip):

    model, _ = tiny_clip
    checkpointing.write_main_part(tmp_path, 10, model.state_dict(), {"step": 10}, {"model": "PlainViT-Ti-8-64"})
    final = checkpointing.publish(tmp_path, 10)
    assert resolve_checkpoint(tmp_path) == (final / "model.safetensors", "PlainViT-Ti-8-64")


def test_cli_checkpoint_file_on_wds_writes_json(tiny_clip, wds_set, tmp_path):
    model, path = tiny_clip
    out = tmp_path / "zs.json"
    result = zeroshot.main(["--model", "PlainViT-Ti-8-64", "--checkpoint", str(path), "--data", str(wds_set),
                            "--workers", "0", "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved.pop("model_kwargs") == {} and saved.pop("transforms") == []
    assert saved == pytest.approx({k: v for k, v in result.items() if k not in ("model_kwargs", "transforms")})
    assert result["model"] == "PlainViT-Ti-8-64" and result["n"] == 9 and result["templates"] == 2
    expected = run_zero_shot(model, open_clip.get_tokenizer("PlainViT-Ti-8-64"), wds_set)
    assert result["top1"] == expected["top1"] and result["mean_per_class_recall"] == expected["mean_per_class_recall"]


def test_cli_without_arguments_uses_latest_demo_checkpoint(tiny_clip, wds_set, tmp_path, monkeypatch):
    _, path = tiny_clip
    monkeypatch.setenv("DTPCLIP_RUNS_DIR", str(tmp_path / "runs"))
    with pytest.raises(FileNotFoundError, match="no demo checkpoint.*accelerate launch launch/clip_pretrain.py"):
        zeroshot.main([])
    ckpt = tmp_path / "runs" / "demo" / "step_100"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").symlink_to(path)
    (ckpt / "config.json").write_text(json.dumps({"model": "PlainViT-Ti-8-64"}))
    (tmp_path / "runs" / "demo" / "latest").write_text(str(ckpt))
    checkpointing.mark_latest_run(tmp_path / "runs" / "demo")  # what a training run records at its first checkpoint
    monkeypatch.setattr(zeroshot, "demo_eval_dir", lambda: wds_set)
    result = zeroshot.main(["--workers", "0", "--templates", "simple"])
    assert result["checkpoint"] == str(ckpt / "model.safetensors") and result["templates"] == 7


def test_imagefolder_with_imagenet_style_classnames_file(tiny_clip, tmp_path):
    _, path = tiny_clip
    for c, name in enumerate(["n01", "n02"]):
        (tmp_path / "val" / name).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "val" / name / f"{i}.png").write_bytes(png(10 * c + i))
    (tmp_path / "names.txt").write_text("tench\ngoldfish\n")
    result = zeroshot.main(["--model", "PlainViT-Ti-8-64", "--checkpoint", str(path), "--data", str(tmp_path / "val"),
                            "--classnames", str(tmp_path / "names.txt"), "--templates", "simple", "--workers", "0"])
    assert result["n"] == 4 and result["classes"] == 2 and result["templates"] == 7
    tokenizer = open_clip.get_tokenizer("PlainViT-Ti-8-64")
    with pytest.raises(ValueError, match="1000 class names were given but eval set .*val' has 2 classes"):
        run_zero_shot(tiny_clip[0], tokenizer, tmp_path / "val", classnames=zeroshot.load_classnames("imagenet"))


def test_builtin_classnames_and_templates_and_files(tmp_path):
    assert len(zeroshot.load_classnames("imagenet")) == 1000 and zeroshot.load_classnames("imagenet")[0] == "tench"
    assert len(zeroshot.load_templates("openai")) == 80 and len(zeroshot.load_templates("simple")) == 7
    assert zeroshot.fill_template(zeroshot.load_templates("openai")[0], "cat") == "a bad photo of a cat."
    (tmp_path / "t.txt").write_text("a {c} here.\n\nthe {} there.\n")
    templates = zeroshot.load_templates(str(tmp_path / "t.txt"))
    assert [zeroshot.fill_template(t, "cat") for t in templates] == ["a cat here.", "the cat there."]
    (tmp_path / "bad.txt").write_text("no class here\n")
    with pytest.raises(ValueError, match="'no class here' has no '{c}'"):
        zeroshot.load_templates(str(tmp_path / "bad.txt"))


def test_bad_inputs_are_clear_errors(tiny_clip, dtp_clip, wds_set, tmp_path):
    _, path = tiny_clip
    base = ["--checkpoint", str(path), "--workers", "0"]
    with pytest.raises(FileNotFoundError, match="--data .*missing' does not exist"):
        zeroshot.main(["--model", "PlainViT-Ti-8-64", *base, "--data", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="clip.safetensors' does not name its model.*pass --model"):
        zeroshot.main([*base, "--data", str(wds_set)])
    with pytest.raises(ValueError, match="unknown CLIP model 'ViT-Q-99'"):
        zeroshot.main(["--model", "ViT-Q-99", *base, "--data", str(wds_set)])
    with pytest.raises(ValueError, match="dtp.safetensors' does not match"):  # DTP's predictor has no place
        zeroshot.main(["--model", "PlainViT-Ti-8-64", "--checkpoint", str(dtp_clip[1]), "--data", str(wds_set)])
    with pytest.raises(FileNotFoundError, match="--templates 'fancy' is neither"):
        zeroshot.main(["--model", "PlainViT-Ti-8-64", *base, "--data", str(wds_set), "--templates", "fancy"])
    few = make_wds(tmp_path / "labels_beyond", [0, 1, 4], classnames=CLASSNAMES)
    with pytest.raises(ValueError, match="labels_beyond' has label 4 but 3 class names"):
        run_zero_shot(tiny_clip[0], open_clip.get_tokenizer("PlainViT-Ti-8-64"), few)


def test_eval_set_without_usable_images_is_a_clear_error(tiny_clip, tmp_path):
    import webdataset as wds
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with wds.TarWriter(str(tmp_path / "empty" / "test" / "0.tar")) as sink:
        sink.write({"__key__": "s0", "cls": b"0"})  # a label without an image
    (tmp_path / "empty" / "test" / "nshards.txt").write_text("1\n")
    (tmp_path / "empty" / "classnames.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="empty' has no samples to evaluate"):
        run_zero_shot(tiny_clip[0], open_clip.get_tokenizer("PlainViT-Ti-8-64"), tmp_path / "empty")
