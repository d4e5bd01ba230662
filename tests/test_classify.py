"""dtpclip.classify: linear probe / fine-tune / scratch on tiny encoders, the CLI and its errors."""
import io
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from conftest import TINY
from dtpclip import checkpointing, classify
from dtpclip.classify import build_classifier, build_encoder, stratified_split, train_classifier
from dtpclip.evalsets import write_wds_evalset

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 60, 220), (230, 220, 40)]


def coloured_images(n_per_class: int, seed: int, size: int = 64) -> TensorDataset:
    """Four classes, each a colour plus strong pixel noise: linearly separable from pooled features."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, colour in enumerate(COLOURS):
        for _ in range(n_per_class):
            pixels = np.asarray(colour, np.float32) / 255 + rng.normal(0, 0.25, (size, size, 3))
            images.append(torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1))
            labels.append(label)
    return TensorDataset(torch.stack(images), torch.tensor(labels))


def png(colour, seed: int) -> bytes:
    pixels = np.clip(np.asarray(colour) + np.random.default_rng(seed).normal(0, 40, (64, 64, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def image_folder(root, n_per_class: int, classes: int = 3):
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(n_per_class):
            (root / f"class_{c}" / f"{i}.png").write_bytes(png(COLOURS[c], 100 * c + i))
    return root


def encoder_weights(encoder):
    return {k: v.clone() for k, v in encoder.state_dict().items() if not k.startswith("head.")}


@pytest.fixture(scope="module")
def data():
    return coloured_images(12, seed=0), coloured_images(6, seed=1)


@pytest.fixture(scope="module")
def ti_checkpoint(tmp_path_factory):
    """Weights of the demo-size plain ViT, saved as a bare encoder checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "encoder.safetensors"
    save_file(timm.create_model("plain_vit_tiny_patch8_64").state_dict(), str(path))
    return path


def test_linear_probe_learns_separable_classes_and_leaves_the_encoder_bit_identical(data):
    torch.manual_seed(0)
    encoder = build_classifier("plain_vit_tiny_patch8_64", 4, "linear", **TINY)
    before = encoder_weights(encoder)
    history = train_classifier(encoder, *data, num_classes=4, mode="linear", epochs=30, lr=3e-2, batch_size=16)
    assert len(history) == 30 and history[-1]["n"] == 24
    assert history[-1]["top1"] >= 0.9 and history[-1]["top5"] == 1.0  # top-5 of 4 classes
    after = encoder_weights(encoder)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_finetune_changes_the_encoder_with_its_aux_loss(data):
    torch.manual_seed(0)
    encoder = build_classifier("dtp_vit_tiny_patch8_64_4x", 4, "finetune", **TINY)
    before = encoder_weights(encoder)
    history = train_classifier(encoder, *data, num_classes=4, mode="finetune", epochs=1, lr=1e-3, batch_size=16)
    after = encoder_weights(encoder)
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    # the boundary loss is trained too: the predictor has no other gradient path besides the pooling
    assert not torch.equal(before["boundary_predictor.mlp.2.bias"], after["boundary_predictor.mlp.2.bias"])
    assert set(history[0]) >= {"epoch", "lr", "train_loss", "top1", "top5", "mean_per_class_recall"}


def test_scratch_starts_from_fresh_weights_finetune_from_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    pretrained = timm.create_model("plain_vit_tiny_patch8_64", **TINY)
    path = tmp_path / "encoder.safetensors"
    save_file(pretrained.state_dict(), str(path))
    torch.manual_seed(1)
    finetune = build_encoder("PlainViT-Ti-8-64", "finetune", path, **TINY)  # open_clip names work too
    scratch = build_encoder("plain_vit_tiny_patch8_64", "scratch", path, **TINY)
    for key, value in pretrained.state_dict().items():
        assert torch.equal(finetune.state_dict()[key], value)
    assert not torch.equal(scratch.blocks[0].attn.qkv.weight, pretrained.blocks[0].attn.qkv.weight)
    assert not torch.equal(scratch.patch_embed.proj.weight, pretrained.patch_embed.proj.weight)


def test_stratified_split_is_seeded_and_keeps_every_class():
    dataset = TensorDataset(torch.arange(40).float(), torch.arange(40) % 4)
    train, val = stratified_split(dataset, 0.25, seed=3)
    assert len(val) == 12 and torch.bincount(val.tensors[1]).tolist() == [3, 3, 3, 3]
    assert not set(train.tensors[0].tolist()) & set(val.tensors[0].tolist())
    assert torch.equal(stratified_split(dataset, 0.25, seed=3)[1].tensors[0], val.tensors[0])


def test_cli_imagefolder_train_and_val_writes_per_epoch_json(ti_checkpoint, tmp_path):
    image_folder(tmp_path / "set" / "train", 4)
    image_folder(tmp_path / "set" / "test", 2)
    out, config = tmp_path / "result.json", tmp_path / "probe.yaml"
    config.write_text(f"model: plain_vit_tiny_patch8_64\nepochs: 2\nval-data: {tmp_path / 'set'}\nworkers: 0\n")
    result = classify.main(["--config", str(config), "--checkpoint", str(ti_checkpoint),
                            "--train-data", str(tmp_path / "set"), "--output", str(out)])
    saved = json.loads(out.read_text())
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2] and saved["classes"] == 3
    assert saved["epochs"][-1]["n"] == 6 and saved["top1"] == result["top1"] and saved["mode"] == "linear"


def test_cli_without_arguments_uses_the_demo_checkpoint_and_eval_set(ti_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("DTPCLIP_RUNS_DIR", str(tmp_path / "runs"))
    with pytest.raises(FileNotFoundError, match="no demo checkpoint.*accelerate launch launch/clip_pretrain.py"):
        classify.main([])
    ckpt = tmp_path / "runs" / "demo" / "step_10"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").symlink_to(ti_checkpoint)
    (ckpt / "config.json").write_text(json.dumps({"model": "PlainViT-Ti-8-64"}))
    (tmp_path / "runs" / "demo" / "latest").symlink_to(ckpt)
    checkpointing.mark_latest_run(tmp_path / "runs" / "demo")  # what a training run records at its first checkpoint
    demo = tmp_path / "demo_eval"
    write_wds_evalset(demo, ((png(COLOURS[i % 3], i), "png", i % 3) for i in range(30)), ["red", "green", "blue"],
                      ["a {c} image."])
    monkeypatch.setattr(classify, "demo_eval_dir", lambda: demo)
    result = classify.main(["--epochs", "1", "--workers", "0"])
    assert result["model"] == "plain_vit_tiny_patch8_64" and result["classes"] == 3
    assert result["epochs"][0]["n"] == 6  # 20% of each class held out
    scratch = classify.main(["--mode", "scratch", "--model", "plain_vit_tiny_patch8_64", "--epochs", "1",
                             "--workers", "0", "--batch-size", "32"])
    assert scratch["checkpoint"] is None and scratch["epochs"][0]["n"] == 6


def test_bad_inputs_are_clear_errors(ti_checkpoint, tmp_path):
    base = ["--model", "plain_vit_tiny_patch8_64", "--checkpoint", str(ti_checkpoint), "--workers", "0",
            "--epochs", "1"]
    with pytest.raises(FileNotFoundError, match="--train-data .*nowhere' does not exist"):
        classify.main([*base, "--train-data", str(tmp_path / "nowhere")])
    image_folder(tmp_path / "three", 2, classes=3)
    image_folder(tmp_path / "two", 2, classes=2)
    with pytest.raises(ValueError, match="three' has 3 classes but --val-data .*two' has 2"):
        classify.main([*base, "--train-data", str(tmp_path / "three"), "--val-data", str(tmp_path / "two")])
    write_wds_evalset(tmp_path / "beyond", ((png(COLOURS[0], i), "png", i) for i in range(3)), ["a", "b"], ["{c}"],
                      split="train")
    with pytest.raises(ValueError, match="--train-data .*beyond' has label 2 but 2 class names"):
        classify.main([*base, "--train-data", str(tmp_path / "beyond"), "--val-data", str(tmp_path / "two")])
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        classify.main([*base[2:], "--model", "resnet50", "--train-data", str(tmp_path / "three")])
    with pytest.raises(SystemExit):  # argparse: invalid choice
        classify.main([*base, "--mode", "zeroshot"])
