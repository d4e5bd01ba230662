"""LSQ quantization-aware training: the paper's gradient and init, bit-width identity, ViT-Lite, stacking."""
import math

import pytest
import timm
import torch
from conftest import tiny

from dtpclip.encoders.quant import MSE_CLIP_PERCENTILES, LSQQuantizer, QuantLinear, quant_range, quantize_model
from dtpclip.profile import build_visual_tower


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_lsq_step_gradient_equals_paper_eq3():
    """LSQ Eq. 3: ds = -v/s + round(v/s) inside (-Qn, Qp), -Qn below, Qp above; times g = 1/sqrt(N Qp)."""
    quant = LSQQuantizer(bits=3, signed=True, symmetric=False)  # the paper's signed range: Qn = 4, Qp = 3
    assert (quant.qn, quant.qp) == (4, 3)
    with torch.no_grad():
        quant.step.fill_(0.5)
        quant.initialized.fill_(True)
    v = torch.tensor([-3.0, -1.3, -0.2, 0.1, 0.74, 1.2, 2.5])
    quant(v).sum().backward()
    s, qn, qp = 0.5, 4, 3
    expected = []
    for x in v.tolist():
        if x / s <= -qn:
            expected.append(-qn)
        elif x / s >= qp:
            expected.append(qp)
        else:
            expected.append(-x / s + round(x / s))
    g = 1.0 / math.sqrt(v.numel() * qp)
    assert quant.step.grad.item() == pytest.approx(g * sum(expected), rel=1e-6)
    assert expected[0] == -4 and expected[-1] == 3  # both clipped cases are exercised


@pytest.mark.parametrize("grad_scale, elements", [("paper", 6 * 8), ("lsq-net", 5 * 6 * 8)])
def test_lsq_activation_gradient_scale_counts_one_examples_features_or_the_batchs(grad_scale, elements):
    """The paper's N_F: one example's features (6 tokens x 8 channels here); lsq-net's: the batch's elements."""
    quant = LSQQuantizer(bits=4, activation=True, grad_scale=grad_scale)
    v = torch.randn(5, 6, 8)
    quant(v)  # initialises
    quant.step.grad = None
    quant(v).sum().backward()
    s = quant.step.detach()
    inside = (v / s).abs() < quant.qp
    ds = torch.where(inside, -v / s + (v / s).round(), quant.qp * torch.sign(v))
    assert quant.step.grad.item() == pytest.approx(float(ds.sum()) / math.sqrt(elements * quant.qp), rel=1e-4)


def test_lsq_init_is_two_mean_abs_over_sqrt_qp():
    v = torch.tensor([0.5, -1.0, 2.0, -0.25])
    quant = LSQQuantizer(bits=4)
    quant(v)
    assert quant.step.item() == pytest.approx(2 * 0.9375 / math.sqrt(7))


def test_two_bit_attention_probabilities_take_the_studys_levels():
    """(0, 1, 2) at 2 bits (the ViT-Lite study's better choice), not [0, 3]; asymmetric keeps all four."""
    assert quant_range(2, signed=False, symmetric=True) == (0, 2)
    assert quant_range(2, signed=False, symmetric=False) == (0, 3)
    assert quant_range(4, signed=False, symmetric=True) == (0, 14)
    model = quantize_model(tiny("plain_vit_tiny_patch8_64"), 2, 2, scope="linear+attn")
    quant = model.blocks[0].attn.attn_quant
    assert (quant.qn, quant.qp) == (0, 2)
    with torch.no_grad():
        quant.initialize(torch.ones(1))
        quant.step.fill_(0.25)
    assert quant(torch.tensor([0.0, 0.1, 0.2, 0.4, 0.9])).tolist() == [0.0, 0.0, 0.25, 0.5, 0.5]


def test_lsq_two_bits_symmetric_is_ternary():
    assert quant_range(2, signed=True, symmetric=True) == (1, 1)
    quant = LSQQuantizer(bits=2)
    v = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    out = quant(v)
    s = quant.step.item()
    assert set((out / s).round().unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.allclose(out, (out / s).round() * s)


def test_lsq_plus_activation_init_is_the_least_mse_clipping_of_the_first_batch():
    """LSQ+ Sec. 3.3: (s, beta) of least MSE. On a heavy-tailed batch it clips the tails, which the min / max range
    (the simple initialisation) does not, and no candidate of the search does better."""
    v = torch.randn(1000, generator=torch.Generator().manual_seed(0)) ** 3
    quant = LSQQuantizer(bits=3, signed=False, symmetric=False, learned_offset=True)
    quant.initialize(v)

    def mse(step, offset):
        return float((torch.round(((v - offset) / step).clamp(0, 7)) * step + offset - v).square().mean())

    chosen = mse(quant.step, quant.offset)
    assert chosen < 0.5 * mse((v.max() - v.min()) / 7, v.min())
    cuts = torch.tensor(MSE_CLIP_PERCENTILES)
    for low in torch.quantile(v, cuts):
        for high in torch.quantile(v, 1 - cuts):
            assert chosen <= mse(((high - low) / 7).clamp_min(1e-8), low) + 1e-9


def test_lsq_plus_weights_are_symmetric_with_the_3_sigma_step():
    model = quantize_model(tiny(), 4, 4, learned_offset=True)
    fc1 = model.blocks[0].mlp.fc1
    assert fc1.weight_quant.offset is None and fc1.input_quant.offset is not None
    fc1.weight_quant(fc1.weight)
    w = fc1.weight.detach()
    expected = max(abs(w.mean() - 3 * w.std()), abs(w.mean() + 3 * w.std())) / 2 ** 3
    assert fc1.weight_quant.step.item() == pytest.approx(float(expected))


def test_w16_is_nearly_exact_and_w8a8_close_to_float(images):
    model = tiny()
    reference = model.encode(images).pooled
    w16 = quantize_model(tiny(), 16, 16, scope="linear+attn")
    w8 = quantize_model(tiny(), 8, 8, scope="linear+attn")
    w2 = quantize_model(tiny(), 2, 2, scope="linear+attn")
    errors = [relative_error(m.encode(images).pooled, reference) for m in (w16, w8, w2)]
    assert errors[0] < 1e-3 and errors[1] < 3e-2 and errors[2] > errors[1]


def test_quantize_model_patches_every_block_linear_and_keeps_first_and_last_float():
    model = quantize_model(tiny(num_classes=5), 4, 4, scope="linear+attn")
    for block in model.blocks:
        assert block.attn.quantized
        assert all(isinstance(m, QuantLinear) for m in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2))
    assert type(model.head) is torch.nn.Linear and not hasattr(model.patch_embed.proj, "weight_quant")
    names = set(model.state_dict())
    assert "blocks.0.attn.qkv.weight" in names and "blocks.0.attn.qkv.weight_quant.step" in names
    with pytest.raises(ValueError, match="scope must be one of"):
        quantize_model(tiny(), 4, 4, scope="everything")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, 4, 4)


def test_vit_6_4_32_has_the_papers_parameter_count():
    """3,190,538 = the paper's 3.191M with 10 classes (the sum is spelt out in vit_lite.py)."""
    model = timm.create_model("vit_6_4_32")
    assert sum(p.numel() for p in model.parameters()) == 3_190_538
    out = model.encode(torch.randn(2, 3, 32, 32))
    assert out.tokens.shape == (2, 65, 256) and model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(build_visual_tower("vit_6_4_32").proj, torch.nn.Identity)  # no CLIP: profiled bare


def test_dtp_vit_w4a4_builds_runs_and_trains_its_step_sizes(images):
    model = quantize_model(tiny("dtp_vit_tiny_patch8_64_4x"), 4, 4, scope="linear+attn")
    model.train()
    out = model.encode(images)
    assert out.tokens.shape[0] == 3 and out.tokens.shape[2] == 32 and out.token_mask.shape == out.tokens.shape[:2]
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    (out.pooled.square().mean() + out.aux_loss).backward()
    steps = [m.step.grad for m in model.modules() if isinstance(m, LSQQuantizer)]
    assert steps and all(g is not None for g in steps) and any(g.abs().sum() > 0 for g in steps)
    model.eval()
    model.token_layout = "padded"
    other = model.encode(images)
    model.token_layout = "varlen"
    assert torch.allclose(model.encode(images).pooled, other.pooled, atol=1e-4)  # varlen path = padded path


def test_kd_chain_fp_to_4bit_to_2bit_through_classify(tmp_path):
    """The summary seed's multi-step KD: fp teacher -> W4A4 student -> W2A2 student, each step saved by
    classify and loaded (quantized) as the next step's teacher."""
    from test_classify import image_folder

    from dtpclip import classify
    from dtpclip.losses import load_teacher

    data = image_folder(tmp_path / "set", 4)
    common = ["--model", "vit_6_4_32", "--train-data", str(data), "--val-data", str(data), "--val-split", "none",
              "--train-split", "none", "--epochs", "1", "--batch-size", "6", "--workers", "0"]
    classify.main([*common, "--mode", "scratch", "--save", str(tmp_path / "fp")])
    four = classify.main([*common, "--mode", "scratch", "--w-bits", "4", "--a-bits", "4", "--teacher-checkpoint",
                          str(tmp_path / "fp"), "--distill", "logit", "--feature-distill", "mse",
                          "--save", str(tmp_path / "w4a4")])
    two = classify.main([*common, "--mode", "scratch", "--w-bits", "2", "--a-bits", "2", "--quant-scope", "linear+attn",
                         "--teacher-checkpoint", str(tmp_path / "w4a4"), "--save", str(tmp_path / "w2a2")])
    assert four["quantization"]["w_bits"] == 4 and two["quantization"]["scope"] == "linear+attn"
    assert two["teacher"]["checkpoint"] == str(tmp_path / "w4a4") and "distill_loss" in two["epochs"][0]
    teacher = load_teacher(None, tmp_path / "w2a2", num_classes=3)
    assert teacher._quant_config["w_bits"] == 2
    weights = [m.weight_quant(m.weight) / m.weight_quant.step
               for m in teacher.modules() if isinstance(m, QuantLinear)]
    assert all(set(w.round().unique().tolist()) <= {-1.0, 0.0, 1.0} for w in weights)  # ternary weights
