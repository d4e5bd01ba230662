"""VQ-ViT: FSQ against the reference FSQ, token-wise reparametrization, the seed's parameter counts."""
import math

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny
from open_clip.loss import ClipLoss
from safetensors.torch import save_file
from vector_quantize_pytorch import FSQ

from dtpclip.clip import create_clip_and_transforms, encode_image
from dtpclip.encoders.vit import TIMM_IMAGENET_LAYOUT
from dtpclip.encoders.vq import FSQuantizer, VQFFNBlock, VQMSABlock, round_ste
from dtpclip.factory import create_encoder
from dtpclip.registry import list_encoders


def unit_temperature(quantizer: FSQuantizer) -> FSQuantizer:
    with torch.no_grad():
        quantizer.T_raw.fill_(math.log(math.e - 1))  # softplus of it is exactly 1.0 in float32
    assert torch.equal(quantizer.temperature(), torch.ones_like(quantizer.T_raw))
    return quantizer


@pytest.mark.parametrize("levels", [[3, 3, 3, 3], [8, 5, 5, 5], [4, 3, 7]])
def test_fsq_indices_and_codes_equal_vector_quantize_pytorch_at_unit_temperature(levels):
    ours, reference = unit_temperature(FSQuantizer(16, levels)), FSQ(levels)  # no projections: dim == d
    z = 2 * torch.randn(4, 1000, len(levels), generator=torch.Generator().manual_seed(0))
    codes, indices = ours.quantize(z)
    ref_codes, ref_indices = reference(z)
    assert torch.equal(indices, ref_indices.long())
    assert torch.equal(codes, ref_codes)
    assert torch.equal(ours.codebook(), reference.implicit_codebook)
    for j, level in enumerate(levels):  # the comparison covers every grid point of every dimension
        assert len(codes[..., j].unique()) == level


def test_fsq_codes_are_the_grid_scaled_by_temperature():
    quantizer = FSQuantizer(8, [3, 4])
    with torch.no_grad():
        quantizer.T_raw.copy_(torch.tensor([0.3, -2.0]))
    T = F.softplus(quantizer.T_raw)
    codes, indices = quantizer.quantize(torch.randn(1000, 2, generator=torch.Generator().manual_seed(0)))
    grid0, grid1 = torch.tensor([-1.0, 0.0, 1.0]) * T[0], torch.tensor([-1.0, -0.5, 0.0, 0.5]) * T[1]
    assert torch.isclose(codes[:, :1], grid0).any(1).all() and torch.isclose(codes[:, 1:], grid1).any(1).all()
    assert torch.allclose(quantizer.codebook()[indices], codes)


def test_fsq_dict_loss_is_mse_to_detached_codes():
    quantizer = FSQuantizer(8, [3, 3, 3])
    x = torch.randn(2, 5, 8)
    codes, _, loss = quantizer.encode(x)
    assert torch.allclose(loss, (quantizer.compress(x) - codes).square().mean())


def test_fsq_rejects_levels_below_two():
    with pytest.raises(ValueError, match="levels must be"):
        FSQuantizer(8, [3, 1])


def test_gradient_flows_through_the_straight_through_round():
    x = torch.linspace(-2, 2, 9, requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(9))
    model = tiny("vqvit_tiny_patch8_64", levels=[3, 3, 3]).train()
    out = model.encode(torch.randn(2, 3, 64, 64))
    (out.pooled.square().mean() + out.aux_loss).backward()
    for name in ("patch_embed.proj.weight", "blocks.0.vq.compress.weight", "blocks.0.vq.T_raw",
                 "blocks.1.vq1.compress.weight", "blocks.1.vq2.T_raw", "blocks.1.attn.qkv.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_blocks_alternate_vq_ffn_and_vq_msa():
    model = tiny("vqvit_tiny_patch8_64")
    assert [type(b) for b in model.blocks] == [VQFFNBlock, VQMSABlock] * 2


def test_dict_loss_sums_blocks_and_vq_msa_averages_its_two(images):
    model = tiny("vqvit_tiny_patch8_64", levels=[3, 3, 3])
    losses = {}
    for name, module in model.named_modules():
        if isinstance(module, FSQuantizer):
            module.register_forward_hook(lambda m, i, o, name=name: losses.__setitem__(name, o[2]))
    out = model.encode(images)
    assert torch.equal(model.blocks[0].dict_loss, losses["blocks.0.vq"])
    assert torch.equal(model.blocks[1].dict_loss, (losses["blocks.1.vq1"] + losses["blocks.1.vq2"]) / 2)
    assert torch.allclose(out.aux_loss, sum(block.dict_loss for block in model.blocks))
    assert out.aux_loss > 0 and 0 < out.stats["codebook_usage"] <= 1


def test_reparameterize_keeps_outputs_of_both_block_types(images):
    model = tiny("vqvit_tiny_patch8_64", levels=[3, 3, 3], num_classes=10)
    with torch.no_grad():
        before, logits_before = model.encode(images), model(images)
        model.reparameterize()
        after, logits_after = model.encode(images), model(images)
    assert torch.allclose(after.tokens, before.tokens, atol=1e-5)
    assert torch.allclose(logits_after, logits_before, atol=1e-5)
    assert torch.allclose(after.aux_loss, before.aux_loss, atol=1e-6)
    assert before.stats["codebook_usage"] > 0.2  # many codes in play, not one constant row
    even, odd = model.blocks[0], model.blocks[1]
    assert even.mlp_table.num_embeddings == 27 and not hasattr(even, "mlp") and not hasattr(even, "norm2")
    assert odd.qkv_table.num_embeddings == 27 and not hasattr(odd, "norm1") and not hasattr(odd.attn, "qkv")
    assert not hasattr(odd.vq2, "expand") and odd.vq1.T_raw is None and hasattr(odd.vq1, "T")


def test_reparameterize_twice_is_an_error():
    model = tiny("vqvit_tiny_patch8_64", levels=[3, 3])
    model.reparameterize()
    with pytest.raises(ValueError, match="already reparameterized"):
        model.reparameterize()


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_reparameterized_vqvit_small_has_the_seeds_parameter_count():
    """The seed's 12.36M (12,364,720) for vqvit_small_patch16_224 with levels [3,3,3,3] against timm's
    ViT-S/16 with its 1000-class head (22,050,664): timm's ImageNet layout, T a buffer after reparam."""
    with torch.device("meta"):
        plain = timm.create_model("vit_small_patch16_224")
        ours_plain = timm.create_model("plain_vit_small_patch16_224", **TIMM_IMAGENET_LAYOUT)
        vq = timm.create_model("vqvit_small_patch16_224", levels=[3, 3, 3, 3], **TIMM_IMAGENET_LAYOUT)
    assert count(plain) == count(ours_plain) == 22_050_664
    assert count(vq.reparameterize()) == 12_364_720


def test_reparameterized_cifar_vqvit_small_patch32_has_the_seeds_12_18m():
    """The seed's CIFAR-10 model: vqvit_small_patch32_224, levels [3, 3, 3], 10 classes, '12.18M'."""
    with torch.device("meta"):
        vq = timm.create_model("vqvit_small_patch32_224", levels=[3, 3, 3],
                               **{**TIMM_IMAGENET_LAYOUT, "num_classes": 10})
    assert count(vq.reparameterize()) == 12_182_848


def test_vqvit_sizes_are_registered_with_the_vq_family():
    names = {i.name: i for i in list_encoders("vq")}
    for width in ("tiny", "small", "base"):
        for patch in (16, 32):
            assert f"vqvit_{width}_patch{patch}_224" in names
    assert names["vqvit_tiny_patch8_64"].clip_name == "VQ-ViT-Ti-8-64"
    with torch.device("meta"):
        ti = timm.create_model("vqvit_tiny_patch32_224")
    shape = (ti.embed_dim, len(ti.blocks), ti.blocks[0].attn.num_heads, ti.patch_embed.patch_size)
    assert shape == (192, 12, 3, (32, 32))


def test_vqvit_loads_plain_vit_weights_with_fresh_quantizers(tmp_path):
    plain = tiny()
    path = tmp_path / "plain.safetensors"
    save_file(plain.state_dict(), str(path))
    vq = create_encoder("vqvit_tiny_patch8_64", checkpoint=path, embed_dim=32, depth=4, num_heads=2)
    own = vq.state_dict()
    assert all(torch.equal(own[k], v) for k, v in plain.state_dict().items())
    assert any(".vq" in k for k in own)


def test_vqvit_trains_in_the_demo_clip():
    """open_clip.create_model(clip_name) builds it; contrastive + dict loss fall on a fixed batch."""
    torch.manual_seed(0)
    model = open_clip.create_model("VQ-ViT-Ti-8-64")
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    texts = torch.randint(1, 1000, (8, 24), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn, history = ClipLoss(), []
    for _ in range(8):
        image_features, out = encode_image(model, images)
        text_features = model.encode_text(texts)
        contrastive = loss_fn(F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1),
                              model.logit_scale.exp())
        optimizer.zero_grad()
        (contrastive + out.aux_loss).backward()
        optimizer.step()
        history.append((contrastive.item(), out.aux_loss.item()))
    assert history[0][1] > 0
    assert history[-1][0] < history[0][0] and history[-1][1] < history[0][1]
    with torch.no_grad():  # open_clip's own path (the timm tower's forward) agrees with the encoder contract
        model.eval()
        assert torch.allclose(model.encode_image(images), encode_image(model, images)[0], atol=1e-5)


def test_vqvit_clip_starts_from_a_plain_vit_clip_checkpoint(tmp_path):
    """The seed's recipe in CLIP: a trained plain-ViT CLIP initialises the VQ-ViT CLIP; only quantizers are new."""
    torch.manual_seed(0)
    plain = open_clip.create_model("PlainViT-Ti-8-64")
    save_file(plain.state_dict(), str(tmp_path / "plain.safetensors"))
    vq, _, _ = create_clip_and_transforms("VQ-ViT-Ti-8-64", pretrained=str(tmp_path / "plain.safetensors"))
    own = vq.state_dict()
    assert all(torch.equal(own[k], v) for k, v in plain.state_dict().items())
    assert {k.split(".vq")[0] for k in own if k not in plain.state_dict()} == {
        f"visual.trunk.blocks.{i}" for i in range(len(vq.visual.trunk.blocks))}
