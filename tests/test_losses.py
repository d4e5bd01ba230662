"""Distillation losses: DKD by hand and by its KD decomposition, logit KD, feature KD, the Distiller."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny
from safetensors.torch import save_file

from dtpclip.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from dtpclip.losses import (Distiller, block_outputs, cosine_feature_loss, dkd_loss, dkd_parts, kd_loss,
                            load_teacher, mse_feature_loss)
from dtpclip.factory import create_encoder


def test_dkd_equals_a_hand_computed_value():
    # p_student = [1/4, 1/4, 1/2], p_teacher = [1/3, 1/2, 1/6], target class 0, T = 1
    student, teacher = torch.log(torch.tensor([[1.0, 1.0, 2.0]])), torch.log(torch.tensor([[2.0, 3.0, 1.0]]))
    tckd = 1 / 3 * math.log((1 / 3) / (1 / 4)) + 2 / 3 * math.log((2 / 3) / (3 / 4))  # binary [1/3, 2/3] vs [1/4, 3/4]
    nckd = 3 / 4 * math.log((3 / 4) / (1 / 3)) + 1 / 4 * math.log((1 / 4) / (2 / 3))  # [3/4, 1/4] vs [1/3, 2/3]
    got = dkd_loss(student, teacher, torch.tensor([0]), alpha=0.5, beta=1.5, temperature=1.0)
    assert got.item() == pytest.approx(0.5 * tckd + 1.5 * nckd, rel=1e-6)


def test_kd_equals_tckd_plus_teacher_weighted_nckd():
    """DKD paper eq. (5): KD = TCKD + (1 - p_t) NCKD, p_t the teacher's target probability at T."""
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 10, generator=generator), 3 * torch.randn(6, 10, generator=generator)
    target, T = torch.randint(0, 10, (6,), generator=generator), 2.0
    tckd, nckd = dkd_parts(student, teacher, target, T)
    p_t = F.softmax(teacher / T, -1).gather(1, target[:, None]).squeeze(1)
    assert torch.allclose(kd_loss(student, teacher, T), (tckd + (1 - p_t) * nckd).mean() * T * T, rtol=1e-5)
    assert torch.allclose(dkd_loss(student, teacher, target, 1.0, 1.0, T), (tckd + nckd).mean() * T * T)


def test_dkd_matches_the_masked_softmax_reference():
    """mdistiller's dkd_loss (the authors' code): masks with -1000 and KL sums divided by the batch."""
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator)
    target, T, alpha, beta = torch.randint(0, 8, (5,), generator=generator), 1.5, 0.5, 1.5
    gt = F.one_hot(target, 8).float()
    p_s, p_t = F.softmax(student / T, 1), F.softmax(teacher / T, 1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], 1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], 1)
    tckd = F.kl_div(b_s.log(), b_t, reduction="sum") * T ** 2 / 5
    nckd = F.kl_div(F.log_softmax(student / T - 1000 * gt, 1), F.softmax(teacher / T - 1000 * gt, 1),
                    reduction="sum") * T ** 2 / 5
    assert torch.allclose(dkd_loss(student, teacher, target, alpha, beta, T), alpha * tckd + beta * nckd, rtol=1e-5)


def test_logit_kd_is_zero_only_when_student_equals_teacher():
    logits = torch.randn(4, 7)
    assert kd_loss(logits, logits.clone(), 4.0).abs() < 1e-6
    assert kd_loss(logits, logits + torch.randn(4, 7), 4.0) > 1e-3
    assert dkd_loss(logits, logits.clone(), torch.tensor([0, 1, 2, 3])).abs() < 1e-5


def test_dkd_rejects_targets_of_the_wrong_shape():
    with pytest.raises(ValueError, match="class indices of shape"):
        dkd_loss(torch.randn(4, 5), torch.randn(4, 5), torch.zeros(4, 5, dtype=torch.long))


def test_cosine_feature_loss_sums_over_blocks():
    a = torch.randn(2, 5, 8)
    orthogonal = torch.stack([a[..., 1], -a[..., 0]], -1)
    assert cosine_feature_loss([a[..., :2], a], [a[..., :2], a]).abs() < 1e-6
    assert torch.allclose(cosine_feature_loss([a[..., :2], a], [orthogonal, -3 * a]), torch.tensor(1.0 + 2.0))


def test_mse_feature_loss_sums_over_blocks():
    a = torch.zeros(2, 3, 4)
    assert torch.allclose(mse_feature_loss([a, a], [a + 1, a + 2]), torch.tensor(1.0 + 4.0))


def test_feature_loss_names_mismatched_shapes():
    with pytest.raises(ValueError, match=r"student feature 0 has shape \(2, 3, 4\), the teacher's \(2, 3, 5\)"):
        cosine_feature_loss([torch.zeros(2, 3, 4)], [torch.zeros(2, 3, 5)])
    with pytest.raises(ValueError, match="same, non-zero number"):
        mse_feature_loss([torch.zeros(1)], [])


def test_distiller_freezes_its_teacher_and_names_its_terms(images):
    teacher, student = tiny(num_classes=5, seed=0), tiny(num_classes=5, seed=1).train()
    distiller = Distiller(teacher, "dkd", weight=4.0, alpha=0.5, beta=1.5, temperature=1.0, feature="cos").train()
    target = torch.tensor([0, 1, 2])
    with distiller.capture(student) as features:
        logits = student(images)
    terms = distiller(images, logits, target, features)
    assert set(terms) == {"dkd_loss", "feature_loss"} and all(v > 0 for v in terms.values())
    sum(terms.values()).backward()
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    assert student.head.weight.grad.abs().sum() > 0
    twin = Distiller(tiny(num_classes=5, seed=1), "logit", feature="mse")
    with twin.capture(student.eval()) as features:
        logits = student(images)
    assert all(v.abs() < 1e-6 for v in twin(images, logits, target, features).values())


def test_block_outputs_collects_every_block(images):
    model = tiny()
    with block_outputs(model) as outputs:
        model(images)
    assert len(outputs) == 4 and outputs[-1].shape == (3, 65, 32)
    model(images)
    assert len(outputs) == 4  # hooks are gone after the context


def test_load_teacher_restores_a_saved_classifier(tmp_path, images):
    torch.manual_seed(0)
    classifier = create_encoder("plain_vit_tiny_patch8_64", num_classes=5).eval()
    save_file(classifier.state_dict(), str(tmp_path / "cls.safetensors"))
    teacher = load_teacher("PlainViT-Ti-8-64", tmp_path / "cls.safetensors", num_classes=5)
    with torch.no_grad():
        assert torch.equal(teacher(images), classifier(images))
    assert not any(p.requires_grad for p in teacher.parameters())
    (tmp_path / "run").mkdir()  # a dtpclip checkpoint directory names its model in config.json
    save_file(classifier.state_dict(), str(tmp_path / "run" / WEIGHTS_FILE))
    (tmp_path / "run" / CONFIG_FILE).write_text(json.dumps({"model": "plain_vit_tiny_patch8_64"}))
    with torch.no_grad():
        assert torch.equal(load_teacher(None, tmp_path / "run", num_classes=5)(images), classifier(images))


def test_load_teacher_needs_a_head_in_a_classifier_checkpoint(tmp_path):
    classifier = create_encoder("plain_vit_tiny_patch8_64", num_classes=5)
    headless = {k: v for k, v in classifier.state_dict().items() if not k.startswith("head.")}
    save_file(headless, str(tmp_path / "encoder.safetensors"))
    with pytest.raises(ValueError, match="has no classifier head"):
        load_teacher("plain_vit_tiny_patch8_64", tmp_path / "encoder.safetensors", num_classes=5)


def test_feature_layers_capture_what_they_name(images):
    model = tiny()
    with torch.no_grad():
        with block_outputs(model, "blocks") as blocks:
            model(images)
        with block_outputs(model, "last") as last:
            model(images)
        with block_outputs(model, "attn_and_block") as both:
            model(images)
        x0 = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        after_attention = x0 + model.blocks[0].attn(model.blocks[0].norm1(x0))
        pre_logits = model.forward_head(model.forward_features(images), pre_logits=True)
    assert len(blocks) == 4 and len(last) == 1 and len(both) == 8
    assert torch.allclose(last[0], pre_logits)  # the last embedding: what the head reads
    assert torch.allclose(both[0], after_attention, atol=1e-6) and torch.equal(both[1], blocks[0])
    with pytest.raises(ValueError, match="unknown feature layers"):
        Distiller(model, "logit", feature="cos", feature_layers="heads")
