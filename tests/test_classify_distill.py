"""dtpclip.classify with a teacher: DKD / logit KD / feature KD terms join the fine-tuning loss."""
import json

import pytest
import torch
from safetensors.torch import save_file

from dtpclip import classify
from dtpclip.classify import build_classifier, train_classifier
from dtpclip.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from dtpclip.encoders.quant import quant_config
from dtpclip.losses import Distiller, load_teacher
from test_classify import coloured_images, image_folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A demo-size plain ViT fine-tuned on three colour classes, saved as a dtpclip checkpoint directory."""
    torch.manual_seed(0)
    teacher = build_classifier("plain_vit_tiny_patch8_64", 3, "scratch")
    data = coloured_images(8, seed=0)
    three = torch.utils.data.TensorDataset(*(t[data.tensors[1] < 3] for t in data.tensors))
    train_classifier(teacher, three, three, 3, "scratch", epochs=3, lr=1e-3, batch_size=8)
    out = tmp_path_factory.mktemp("teacher")
    save_file(teacher.state_dict(), str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({"model": "plain_vit_tiny_patch8_64"}))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("set")
    image_folder(root / "train", 6)
    image_folder(root / "test", 2)
    return root


def test_cli_dkd_distillation_term_falls(teacher_dir, folder):
    result = classify.main([
        "--model", "vqvit_tiny_patch8_64", "--mode", "scratch", "--teacher-checkpoint", str(teacher_dir),
        "--distill", "dkd", "--train-data", str(folder), "--val-data", str(folder), "--epochs", "4",
        "--lr", "1e-3", "--batch-size", "6", "--workers", "0"])
    distill = [epoch["distill_loss"] for epoch in result["epochs"]]
    assert result["teacher"]["distill"] == "dkd" and distill[0] > 0
    assert distill[-1] < 0.5 * distill[0]


def test_logit_kd_against_the_student_itself_is_zero():
    torch.manual_seed(0)
    student = build_classifier("plain_vit_tiny_patch8_64", 4, "scratch", embed_dim=32, depth=2, num_heads=2)
    twin = build_classifier("plain_vit_tiny_patch8_64", 4, "scratch", embed_dim=32, depth=2, num_heads=2)
    twin.load_state_dict(student.state_dict())
    data = coloured_images(2, seed=0)
    history = train_classifier(student, data, data, 4, "finetune", epochs=1, lr=0.0, batch_size=8,
                               distiller=Distiller(twin, "logit", feature="mse"))
    assert history[0]["distill_loss"] < 1e-6  # lr 0 and dropout off: the student stays its teacher's twin


def test_a_dynamicvit_student_gets_its_token_distillation_term(teacher_dir):
    """classify's Distiller adds the student encoder's own token loss on the teacher's final tokens."""
    torch.manual_seed(0)
    student = build_classifier("dynamicvit_tiny_patch8_64_rho05", 3, "scratch").train()
    teacher = load_teacher("plain_vit_tiny_patch8_64", teacher_dir, 3)
    images = coloured_images(2, seed=0).tensors[0][:4]
    distiller = Distiller(teacher, "logit", token_loss=student.token_distill_loss)
    torch.manual_seed(1)
    logits, _, terms = classify.distilled_logits(student, images, None, distiller)
    torch.manual_seed(1)  # the same Gumbel keep decisions
    expected = student.token_distill_loss(student.encode(images), teacher.encode(images).tokens)
    assert set(terms) == {"kd_loss", "token_loss"} and torch.allclose(terms["token_loss"], expected)
    assert terms["token_loss"] > 0


def test_distillation_errors_name_the_problem(teacher_dir, folder):
    base = ["--train-data", str(folder), "--val-data", str(folder), "--epochs", "1", "--workers", "0"]
    scratch = ["--model", "plain_vit_tiny_patch8_64", "--mode", "scratch", *base]
    with pytest.raises(ValueError, match="--teacher 'plain_vit_tiny_patch8_64' needs --teacher-checkpoint"):
        classify.main([*scratch, "--teacher", "plain_vit_tiny_patch8_64"])
    with pytest.raises(ValueError, match="use --mode finetune or scratch, not linear"):
        classify.main(["--model", "plain_vit_tiny_patch8_64", "--mode", "linear", "--checkpoint",
                       str(teacher_dir / WEIGHTS_FILE), "--teacher-checkpoint", str(teacher_dir), *base])
    with pytest.raises(ValueError, match=r"the teacher takes \(3, 64, 64\) images, the student \(3, 224, 224\)"):
        classify.main(["--model", "plain_vit_small_patch16_224", "--mode", "scratch", "--teacher-checkpoint",
                       str(teacher_dir), *base])
    with pytest.raises(SystemExit):  # argparse: invalid choice
        classify.main([*scratch, "--teacher-checkpoint", str(teacher_dir), "--distill", "hinton"])


def test_kd_chain_float_to_4bit_to_2bit_through_saved_classifiers(folder, tmp_path):
    """The ViT-Lite study's chain: each classifier `--save`d by classify teaches the next (logits, then
    logits + block features); quantized ones load quantized (their config.json says how)."""
    base = ["--model", "plain_vit_tiny_patch8_64", "--mode", "scratch", "--train-data", str(folder), "--val-data",
            str(folder), "--epochs", "1", "--batch-size", "6", "--workers", "0"]
    classify.main([*base, "--save", str(tmp_path / "fp")])
    w4 = classify.main([*base, "--teacher-checkpoint", str(tmp_path / "fp"), "--w-bits", "4", "--a-bits", "4",
                        "--save", str(tmp_path / "w4a4")])
    w2 = classify.main([*base, "--teacher-checkpoint", str(tmp_path / "w4a4"), "--distill", "logit",
                        "--feature-distill", "mse", "--w-bits", "2", "--a-bits", "2"])
    assert w4["epochs"][0]["distill_loss"] > 0 and w2["epochs"][0]["distill_loss"] > 0
    assert w2["teacher"]["checkpoint"] == str(tmp_path / "w4a4") and w2["quantization"]["w_bits"] == 2
    assert quant_config(load_teacher(None, tmp_path / "w4a4", num_classes=3))["w_bits"] == 4
