"""W8A8 on integer kernels: the integer product is exact, the lowered model agrees with the fake one, errors."""
import copy

import pytest
import torch
from conftest import tiny
from test_ptq import calib, relative_error
from test_zeroshot import make_wds, saved_clip

from dtpclip import quantize, zeroshot
from dtpclip.encoders.int8 import Int8Linear, _reduce_range, lower_to_int8, symmetric_int8
from dtpclip.encoders.ptq import apply_ptq
from dtpclip.encoders.quant import QuantLinear
from dtpclip.factory import apply_transforms

BACKENDS = ["onednn", "torchao"]  # torchao's int8 path runs on CPU too (slowly): its numerics are tested here


@pytest.fixture(scope="module")
def w8a8():
    return apply_ptq(tiny(), 8, 8, calib())


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_linear_is_the_exact_integer_product_of_the_calibrated_codes(w8a8, backend):
    """What the kernel must compute, in float64 from the codes; a saturating int16 sum (AVX2 u8 x s8 at full
    range) breaks it by whole units."""
    fc1 = w8a8.blocks[0].mlp.fc1
    x = torch.randn(2, 17, fc1.in_features, generator=torch.Generator().manual_seed(0)) * 3
    quant = fc1.input_quant
    x_codes = torch.clamp(torch.round(x / quant.scale) + quant.zero_point, 0, 255).double()
    layer = Int8Linear(fc1, backend)
    if backend == "onednn":
        w_codes, w_scale = symmetric_int8(fc1.weight_quant(fc1.weight), 63 if _reduce_range(x.device) else 127)
    else:  # torchao picks its own symmetric weight scales
        weight = layer._torchao_linear.weight
        w_codes, w_scale = weight.qdata, weight.scale.flatten()
    expected = ((x_codes - quant.zero_point) * quant.scale.double()) @ (w_codes.double() * w_scale.double()[:, None]).T
    expected = expected + fc1.bias.double()
    out = layer(x)
    assert out.shape == (2, 17, fc1.out_features) and out.dtype == torch.float32
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["plain_vit_tiny_patch8_64", "dtp_vit_tiny_patch8_64_4x"])
def test_lowered_model_agrees_with_the_fake_quantized_one(name, backend):
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fake = apply_ptq(tiny(name), 8, 8, calib())
    lowered = lower_to_int8(copy.deepcopy(fake), backend)
    assert not any(isinstance(m, QuantLinear) for m in lowered.modules())
    assert sum(isinstance(m, Int8Linear) for m in lowered.modules()) == 4 * len(lowered.blocks)
    with torch.no_grad():
        reference, floating = fake.encode(images).pooled, tiny(name).encode(images).pooled
        error = relative_error(lowered.encode(images).pooled, reference)
    assert error < 0.2 * relative_error(reference, floating)  # the kernels add far less than W8A8 itself


def test_int8_needs_a_w8a8_ptq_model():
    with pytest.raises(ValueError, match=r"apply ptq:w=8,a=8 first.*none \(float\)"):
        lower_to_int8(tiny())
    with pytest.raises(ValueError, match=r"W8A8 RepQ.*'w_bits': 4"):
        lower_to_int8(apply_ptq(tiny(), 4, 4, calib()))
    with pytest.raises(ValueError, match="int8 backend must be one of"):
        apply_transforms(tiny(), ["ptq:w=8,a=8", "int8:backend=tpu"], calib())


def test_zeroshot_of_a_w8a8_checkpoint_on_int8_kernels(tmp_path_factory, tmp_path):
    """quantize writes the fake W8A8 CLIP; zeroshot --transform int8 runs it on the kernels, agreeing in top-1."""
    name = "PlainViT-Ti-8-64"
    _, path = saved_clip(tmp_path_factory, name, "clip.safetensors")
    data = make_wds(tmp_path / "evalset", [i % 3 for i in range(9)])
    out = tmp_path / "w8a8"
    fake = quantize.main(["--model", name, "--checkpoint", str(path), "--calib-data", str(data), "--calib-images",
                          "8", "--w-bits", "8", "--a-bits", "8", "--out", str(out), "--eval-data", str(data)])
    real = zeroshot.main(["--checkpoint", str(out), "--data", str(data), "--workers", "0", "--transform", "int8"])
    assert abs(real["top1"] - fake["zeroshot_top1"]) <= 1 / 9 + 1e-9  # at most one of nine images flips
