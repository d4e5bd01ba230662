"""RepQ-style PTQ and QwT: scale folding is exact, log-sqrt(2) values, QwT lowers the error, stacking, the CLI."""
import copy
import json

import open_clip
import pytest
import timm
import torch
from conftest import tiny
from test_zeroshot import make_wds, saved_clip

from dtpclip import calibration, quantize, zeroshot
from dtpclip.clip import create_clip_and_transforms
from dtpclip.encoders.merge import apply_tome, merged_token_counts
from dtpclip.encoders.ptq import (LogSqrt2Quantizer, UniformQuantizer, _fake_quant, apply_ptq, apply_qwt,
                                  fit_compensation, fold_scales)
from dtpclip.encoders.quant import apply_quant_config, quant_config
from dtpclip.checkpoint import resolve_checkpoint
from dtpclip.factory import create_encoder
from dtpclip.zeroshot import run_zero_shot


def calib(n: int = 16, seed: int = 2):
    return [torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))]


def relative_error(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _norm_linear(seed: int = 0):
    torch.manual_seed(seed)
    norm, linear = torch.nn.LayerNorm(8), torch.nn.Linear(8, 5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    scale = torch.rand(8) * 0.2 + 0.01
    zero_point = torch.randint(0, 16, (8,)).float()
    return norm, linear, scale, zero_point


def test_repq_scale_folding_is_exact_in_float():
    norm, linear, scale, zero_point = _norm_linear()
    x = torch.randn(20, 8)
    before = linear(norm(x))
    fold_scales(norm, linear, scale, zero_point)
    assert torch.allclose(linear(norm(x)), before, atol=1e-5)


def test_repq_folded_per_tensor_quantizer_equals_per_channel_one():
    norm, linear, scale, zero_point = _norm_linear(1)
    x = torch.randn(50, 8) * 3
    per_channel = linear(_fake_quant(norm(x), scale, zero_point, 4))
    target_scale, target_zp = fold_scales(norm, linear, scale, zero_point)
    assert target_scale.dim() == 0 and target_zp == target_zp.round()
    per_tensor = linear(_fake_quant(norm(x), target_scale, target_zp, 4))
    assert torch.allclose(per_tensor, per_channel, atol=1e-4)


def test_log_sqrt2_quantizer_on_known_values():
    x = torch.tensor([1.0, 0.5, 2 ** -0.5, 0.3, 2 ** -7.5, 2 ** -9, 0.0])
    out = LogSqrt2Quantizer.quantize(x, torch.tensor(1.0), bits=4)
    # levels round(-2 log2 x): 0, 2, 1, 3, 15 (the last of 4 bits), 18 (past the range -> 0), inf -> 0
    expected = [1.0, 0.5, 2 ** -0.5, 2 ** -1.5, 2 ** -7.5, 0.0, 0.0]
    assert out.tolist() == pytest.approx(expected, rel=1e-6)


def test_uniform_weight_quantizer_is_per_output_channel():
    """Rows that are multiples of one another get proportional scales: one range per output channel."""
    factors = torch.arange(1, 7).float()
    weight = factors[:, None] * torch.linspace(-1.0, 0.6, 10)[None]
    quant = UniformQuantizer(4, per_channel=True, channel_dim=0, channels=6)
    quant.calibrate(weight)
    assert quant.scale.shape == (6,) and torch.allclose(quant.scale, quant.scale[0] * factors, rtol=1e-4)
    levels = (quant(weight) / quant.scale[:, None]).round() + quant.zero_point[:, None]
    assert levels.min() >= 0 and levels.max() <= 15


def test_fit_compensation_recovers_a_linear_map_and_zeroes_when_r2_not_positive():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    true_w, true_b = torch.randn(4, 3), torch.randn(3)
    w, b, r2 = fit_compensation(x, x @ true_w + true_b)
    assert r2 > 0.999 and torch.allclose(w, true_w, atol=1e-4) and torch.allclose(b, true_b, atol=1e-4)
    x = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    y = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])  # uncorrelated with x and with the ones column
    w, b, r2 = fit_compensation(x, y)
    assert r2 <= 0 and not w.any() and not b.any()


def test_ptq_w8a8_close_to_float_and_w4a4_worse(images):
    reference = tiny().encode(images).pooled
    w8 = apply_ptq(tiny(), 8, 8, calib())
    w4 = apply_ptq(tiny(), 4, 4, calib())
    e8, e4 = relative_error(w8.encode(images).pooled, reference), relative_error(w4.encode(images).pooled, reference)
    assert e8 < 0.02 and e4 > e8


def _pre_norm_features(model, images):
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    return model.blocks(x)


def test_qwt_lowers_block_output_error_against_plain_ptq():
    images = calib()
    float_model = tiny()
    reference = _pre_norm_features(float_model, images[0])
    ptq = apply_ptq(tiny(), 4, 4, images)
    qwt = copy.deepcopy(ptq)
    r2s = apply_qwt(qwt, images)
    assert len(r2s) == len(qwt.blocks) and qwt._quant_config["qwt"]
    with torch.no_grad():
        plain_error = relative_error(_pre_norm_features(ptq, images[0]), reference)
        qwt_error = relative_error(_pre_norm_features(qwt, images[0]), reference)
        held_out = calib(seed=7)[0]
        held_reference = _pre_norm_features(float_model, held_out)
        assert relative_error(_pre_norm_features(qwt, held_out), held_reference) < relative_error(
            _pre_norm_features(ptq, held_out), held_reference)
    assert qwt_error < plain_error


def test_tome_plus_ptq_runs_with_fewer_tokens_and_refuses_qwt(images):
    model = tiny()
    apply_tome(model, r=4)
    merged = apply_ptq(model, 4, 4, calib())
    out = merged.encode(images)
    assert out.tokens.shape == (3, merged_token_counts(merged)[-1], 32) and out.tokens.shape[1] < 65
    assert torch.isfinite(out.tokens).all()
    with pytest.raises(ValueError, match="must keep its tokens"):
        apply_qwt(merged, calib())


def test_dtp_vit_ptq_with_qwt_builds_and_runs(images):
    """Calibration batches of different token counts (flat runs of different lengths) are fine."""
    model = apply_ptq(tiny("dtp_vit_tiny_patch8_64_4x"), 4, 4, calib(8) + calib(2, seed=3), qwt=True)
    out = model.encode(images)
    assert out.tokens.shape[0] == 3 and out.tokens.shape[2] == 32 and torch.isfinite(out.tokens).all()


def test_quantize_cli_checkpoint_reads_back_identically(tmp_path_factory, tmp_path):
    name = "PlainViT-Ti-8-64"
    _, path = saved_clip(tmp_path_factory, name, "clip.safetensors")
    data = make_wds(tmp_path / "evalset", [i % 3 for i in range(9)])
    out = tmp_path / "w4a4"
    result = quantize.main(["--model", name, "--checkpoint", str(path), "--calib-data", str(data),
                            "--calib-images", "8", "--qwt", "--qwt-images", "8", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == name and config["quantization"] == {"method": "repq", "w_bits": 4, "a_bits": 4, "ends": True,
                                                                   "qwt": True}
    assert result["calib_images"] == 8 and result["qwt_images"] == 8

    # the same quantization in memory (same images, deterministic calibration)
    expected, _, preprocess = create_clip_and_transforms(name, pretrained=str(path))
    images = calibration.calibration_images(data, preprocess, 8)
    apply_ptq(expected.visual.trunk, 4, 4, list(images.split(16)), qwt=True)
    weights, saved_name = resolve_checkpoint(out)
    loaded = create_clip_and_transforms(saved_name, pretrained=str(weights))[0].eval()  # zeroshot's loader
    probe = images[:4]
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(probe), expected.eval().encode_image(probe))
        float_clip = create_clip_and_transforms(name, pretrained=str(path))[0].eval()
        assert not torch.allclose(float_clip.encode_image(probe), loaded.encode_image(probe))
        encoder = create_encoder("plain_vit_tiny_patch8_64", checkpoint=weights)  # classify's / profile's loader
        assert torch.equal(encoder.eval().encode(probe).pooled, loaded.visual.trunk.encode(probe).pooled)

    top1 = zeroshot.main(["--checkpoint", str(out), "--data", str(data), "--workers", "0"])["top1"]
    assert top1 == run_zero_shot(expected, open_clip.get_tokenizer(name), data)["top1"]


def test_quantize_cli_bad_inputs_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("DTPCLIP_RUNS_DIR", str(tmp_path / "runs"))
    with pytest.raises(FileNotFoundError, match="no demo checkpoint.*clip_pretrain"):
        quantize.main([])
    with pytest.raises(ValueError, match="--calib-images must be at least 1"):
        calibration.calibration_images(tmp_path, lambda image: image, 0)


def test_calibration_images_from_train_shards_and_an_eval_set(small_demo):
    from open_clip.transform import image_transform

    preprocess = image_transform(64, is_train=False)
    shards = calibration.calibration_images(small_demo.root / "train", preprocess, 5)
    evalset = calibration.calibration_images(small_demo.eval_dir, preprocess, 5)
    assert shards.shape == evalset.shape == (5, 3, 64, 64)
    assert torch.equal(evalset, calibration.calibration_images(small_demo.eval_dir, preprocess, 5))  # seeded
    assert not torch.equal(evalset, calibration.calibration_images(small_demo.eval_dir, preprocess, 5, seed=1))
    assert torch.equal(shards, calibration.calibration_images(small_demo.root / "train", preprocess, 5))
    assert not torch.equal(shards, calibration.calibration_images(small_demo.root / "train", preprocess, 5, seed=1))


def test_vit_lite_ptq_is_close_at_w8a8_and_its_state_restores_exactly():
    """ViT-Lite's norm2 feeds the residual, so only norm1 is folded; its bias-free qkv gains a bias."""
    torch.manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = timm.create_model("vit_6_4_32", depth=2).eval()
    reference = model(images)
    norm2 = model.blocks[0].norm2.weight.clone()
    apply_ptq(model, 8, 8, [images], qwt=True)
    assert torch.equal(model.blocks[0].norm2.weight, norm2) and model.blocks[0].attn.qkv.bias is not None
    assert relative_error(model(images), reference) < 0.05
    fresh = apply_quant_config(timm.create_model("vit_6_4_32", depth=2).eval(), quant_config(model))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh(images), model(images))


def test_default_out_stays_outside_the_step_directories_training_prunes(tmp_path):
    run = tmp_path / "run"
    assert quantize.default_out(run / "step_5" / "model.safetensors", "quantized_w4a4") == run / "quantized_w4a4_step_5"
    assert quantize.default_out(run / "clip.safetensors", "quantized_w8a8") == run / "quantized_w8a8_clip"
    step = run / "checkpoints" / "step_00000010" / "model.safetensors"  # a training run's layout
    assert quantize.default_out(step, "quantized_w4a4") == run / "quantized_w4a4_step_00000010"


def test_qwt_fits_on_more_images_than_the_quantizers_calibrate_on():
    """RepQ's 32 calibrate the quantizers, QwT's 512 fit the compensation: here 2 of 6 images against all 6."""
    from dtpclip.encoders.ptq import leading_images
    batches = calib(4) + calib(2, seed=3)
    assert [len(b) for b in leading_images(batches, 5)] == [4, 1]
    few = apply_ptq(tiny(), 4, 4, leading_images(batches, 2), qwt=True)
    split = apply_ptq(tiny(), 4, 4, batches, qwt=True, repq_images=2)
    every = apply_ptq(tiny(), 4, 4, batches, qwt=True)
    quantizer = [m for m in split.modules() if hasattr(m, "scale") and m.__class__.__name__ == "UniformQuantizer"][1]
    assert torch.equal(quantizer.scale, [m for m in few.modules() if m.__class__.__name__ == "UniformQuantizer"][1].scale)
    assert not torch.equal(split.blocks[0].qwt.weight, few.blocks[0].qwt.weight)  # fitted on all six
    assert not torch.equal(quantizer.scale, [m for m in every.modules()
                                             if m.__class__.__name__ == "UniformQuantizer"][1].scale)


def reference_uniform_range(x, bits):
    """RepQ-ViT's UniformQuantizer.init_quantization_scale (per tensor), transcribed as the oracle."""
    best_score, delta, zero_point = 1e10, None, None
    for pct in (0.999, 0.9999, 0.99999):
        new_max, new_min = torch.quantile(x.reshape(-1), pct), torch.quantile(x.reshape(-1), 1.0 - pct)
        d = (new_max - new_min) / (2 ** bits - 1)
        z = (-new_min / d).round()
        x_q = (torch.clamp(torch.round(x / d) + z, 0, 2 ** bits - 1) - z) * d
        score = (x - x_q).abs().pow(2).mean()
        if score < best_score:
            best_score, delta, zero_point = score, d, z
    return delta, zero_point


def test_range_search_equals_repqs_candidates_without_forcing_zero():
    from dtpclip.encoders.ptq import mse_range
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 0.3 + 2.0  # all positive: zero outside
    for bits in (4, 8):
        scale, zero_point = mse_range(x[:, None], bits)
        delta, expected_zp = reference_uniform_range(x, bits)
        assert torch.allclose(scale[0], delta) and zero_point[0] == expected_zp
        assert zero_point[0] < 0  # zero is not forced into the range, as RepQ
        wide_scale, wide_zp = mse_range(x[:, None], bits, "wide")
        assert wide_zp[0] == 0 and wide_scale[0] > scale[0]  # the wider search keeps zero: a coarser step


@pytest.mark.parametrize("order", ["sequential", "float"])
def test_sequential_calibration_sees_the_quantized_layers_before(order):
    """RepQ's order: block 1 calibrates on what the quantized block 0 outputs; 'float' on the float network's."""
    model = tiny()
    float_inputs, seen = [], []
    images = calib(4)
    hook = model.blocks[1].register_forward_pre_hook(lambda module, args: float_inputs.append(args[0].clone()))
    model.encode(images[0])
    hook.remove()
    model.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    apply_ptq(model, 4, 4, images, calibration=order)
    differs = (seen[0] - float_inputs[0]).abs().max() > 1e-3
    assert differs == (order == "sequential")


def test_patch_embedding_and_head_are_quantized_as_repq_and_checkpoints_restore(tmp_path):
    """RepQ's quant_model quantizes every Conv2d and Linear: the patch embedding's input at 8 bits, the head's
    at the activation bits; `ends=False` keeps them float."""
    from dtpclip.encoders.quant import QuantConv2d, QuantLinear
    from dtpclip.factory import restore_structure
    model = apply_ptq(tiny("plain_vit_tiny_patch8_64", num_classes=5), 4, 4, calib(4))
    assert isinstance(model.patch_embed.proj, QuantConv2d) and model.patch_embed.proj.input_quant.bits == 8
    assert isinstance(model.head, QuantLinear) and model.head.input_quant.bits == 4
    assert model.head.input_quant.mode == "quant" and model.patch_embed.proj.weight_quant.per_channel
    images = calib(2, seed=5)[0]
    with torch.no_grad():
        codes = model.patch_embed.proj.input_quant(images)
        assert len(codes.unique()) <= 256  # 8-bit input
        fresh = restore_structure(tiny("plain_vit_tiny_patch8_64", num_classes=5), {"quantization": model._quant_config})
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh.eval()(images), model(images))
        floating = apply_ptq(tiny("plain_vit_tiny_patch8_64", num_classes=5), 4, 4, calib(4), ends=False)
    assert type(floating.patch_embed.proj) is torch.nn.Conv2d and type(floating.head) is torch.nn.Linear
