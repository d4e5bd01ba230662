"""DynamicViT: rho = 1 is the plain ViT, the reference's policy softmax, ratio loss and token distillation,
top-k inference, and the task loss's gradient reaching the keep decisions through attention."""
import pytest
import torch

from conftest import tiny
from dtpclip.encoders.dynamic_vit import KeepPolicy, PredictorLG


def test_keep_rate_one_equals_the_plain_vit_at_inference(images):
    plain = tiny("plain_vit_tiny_patch8_64")
    dynamic = tiny("dynamicvit_tiny_patch8_64", keep_rate=1.0)
    dynamic.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.equal(dynamic.encode(images).tokens, plain.encode(images).tokens)
        assert torch.equal(dynamic(images), plain(images))


def test_inference_keeps_rho_powers_of_the_patches_by_top_k(images):
    model = tiny("dynamicvit_tiny_patch8_64_rho05")  # depth 4: predictors before blocks 1, 2, 3
    assert model.pruning_loc == (1, 2, 3) and model.keep_ratios == [0.5, 0.25, 0.125]
    with torch.no_grad():
        out = model.encode(images)
    assert out.tokens.shape == (3, 1 + 8, 32) and out.token_mask.all()
    assert out.stats["keep_ratio"] == 0.125 and out.aux_loss == 0
    groups, _ = model.token_groups(images)
    assert groups.shape == (3, 8, 8) and [int((g < 64).sum()) for g in groups] == [8, 8, 8]


def test_policy_softmax_is_the_references_and_plain_attention_when_all_kept():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    policy = torch.tensor([[1., 1., 0., 1., 0.], [1., 0., 1., 1., 1.]])
    out = KeepPolicy(policy).attention(q, k, v)
    scores = (q @ k.transpose(-2, -1)) / 8 ** 0.5
    allowed = (policy[:, None, None, :] > 0) | torch.eye(5, dtype=torch.bool)
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    assert (out - expected).abs().max() < 1e-5  # the reference's eps terms only
    full = KeepPolicy(torch.ones(2, 5)).attention(q, k, v)
    assert (full - torch.nn.functional.scaled_dot_product_attention(q, k, v)).abs().max() < 1e-5


def test_ratio_loss_is_the_references_and_training_keeps_all_token_slots(images):
    torch.manual_seed(0)
    model = tiny("dynamicvit_tiny_patch8_64_rho07").train()
    decisions = [torch.tensor([[1., 1., 0., 0.]]), torch.tensor([[1., 0., 0., 0.]]), torch.tensor([[0., 0., 0., 0.]])]
    expected = 2.0 * ((0.5 - 0.7) ** 2 + (0.25 - 0.49) ** 2 + (0.0 - 0.343) ** 2) / 3
    assert model.ratio_loss(decisions).item() == pytest.approx(expected)
    out = model.encode(images)
    assert out.tokens.shape == (3, 65, 32) and out.aux_loss > 0
    dropped = ~out.token_mask
    assert dropped.any() and (out.tokens[dropped] == 0).all()  # dropped tokens are the contract's zeros


def test_the_task_loss_alone_trains_the_predictors_through_attention(images):
    model = tiny("dynamicvit_tiny_patch8_64_rho05").train()
    torch.manual_seed(0)
    model.encode(images).pooled.square().sum().backward()  # no ratio loss
    for stage in range(3):
        grad = model.score_predictor[stage].in_conv[1].weight.grad
        assert grad is not None and grad.abs().sum() > 0, stage


def test_token_distillation_is_the_references_mse_on_the_kept_patches(images):
    torch.manual_seed(0)
    model = tiny("dynamicvit_tiny_patch8_64_rho05").train()
    out = model.encode(images)
    teacher = torch.randn_like(out.tokens)
    # the reference (losses.py, mse_token): rows of [B * N, C] patch tokens selected by the final decision
    decision = out.token_mask[:, 1:].reshape(-1)
    student_rows, teacher_rows = out.tokens[:, 1:].reshape(-1, 32), teacher[:, 1:].reshape(-1, 32)
    expected = 0.5 * (student_rows[decision] - teacher_rows[decision]).pow(2).mean()
    loss = model.token_distill_loss(out, teacher)
    assert 0 < decision.sum() < decision.numel() and torch.allclose(loss, expected)
    loss.backward()
    assert model.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0
    assert model.token_distill_loss(out, out.tokens.detach()) == 0
    with pytest.raises(ValueError, match=r"teacher's tokens in the student's slots: expected \(3, 65, 32\)"):
        model.token_distill_loss(out, teacher[:, :17])


def test_an_image_with_every_patch_dropped_gets_finite_scores():
    """The reference divides by the kept count, 0 for such an image: from scratch on the demo CLIP that
    happened within 10 steps and every loss after was NaN."""
    torch.manual_seed(0)
    predictor, tokens = PredictorLG(32), torch.randn(2, 5, 32)
    decision = torch.tensor([[1., 0., 1., 0., 0.], [0., 0., 0., 0., 0.]])[..., None]
    scores = predictor(tokens, decision)
    assert torch.isfinite(scores).all()
    assert torch.equal(scores[:1], predictor(tokens[:1], decision[:1]))  # images with kept patches as before


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="keep_rate must be a number in"):
        tiny("dynamicvit_tiny_patch8_64", keep_rate=1.5)
    with pytest.raises(ValueError, match="pruning_loc must be increasing"):
        tiny("dynamicvit_tiny_patch8_64", pruning_loc=[2, 1])
