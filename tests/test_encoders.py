"""The encoder contract and the identity checks that tie DTP-ViT to the plain ViT."""
import pytest
import timm
import torch

import dtpclip
from conftest import tiny


def force_every_boundary(model):
    """Push the predictor's output far positive: p = 1 everywhere, each patch its own segment."""
    with torch.no_grad():
        model.boundary_predictor.mlp[-1].bias.fill_(100.0)
    return model


def test_registry_lists_every_family_and_size():
    names = {i.name for i in dtpclip.list_encoders()}
    for size in dtpclip.registry.SIZES:
        assert f"plain_vit_{size}" in names
        for suffix in ("", "_2x", "_4x", "_10x"):
            assert f"dtp_vit_{size}{suffix}" in names
    assert dtpclip.encoder_info("dtp_vit_base_patch32_224_10x").compression == 0.1
    assert {i.family for i in dtpclip.list_encoders("dtp")} == {"dtp"}
    assert "dtp_vit_base_patch32_224" in timm.list_models("dtp_vit_*")


def test_timm_create_model_takes_compression_kwarg():
    model = timm.create_model("dtp_vit_tiny_patch8_64", compression=0.1, embed_dim=32, depth=4, num_heads=2)
    assert model.boundary_predictor.prior == 0.1
    assert model.pre_layers == 2 and model.shortened_layers == 2


def test_unknown_encoder_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown encoder 'dtp_vit_huge'"):
        dtpclip.create_encoder("dtp_vit_huge")


@pytest.mark.parametrize("name", ["plain_vit_tiny_patch8_64", "dtp_vit_tiny_patch8_64_4x"])
def test_encode_output_shapes_and_timm_api(name, images):
    model = tiny(name)
    out = model.encode(images)
    B, N, D = out.tokens.shape
    assert (B, D) == (3, 32) and out.token_mask.shape == (B, N) and out.token_mask.dtype == torch.bool
    assert out.pooled.shape == (B, D) and out.aux_loss.ndim == 0
    assert torch.equal(model.forward_features(images), out.tokens)
    assert torch.allclose(model(images), out.pooled)  # num_classes=0: forward returns pooled features
    assert (out.tokens[~out.token_mask] == 0).all()


def test_classification_head_works_through_timm_api(images):
    model = tiny("dtp_vit_tiny_patch8_64_4x", num_classes=7)
    assert model(images).shape == (3, 7)
    model.reset_classifier(5)
    assert model(images).shape == (3, 5)


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_dtp_all_boundaries_equals_vit(pool, images):
    plain = tiny("plain_vit_tiny_patch8_64", global_pool=pool)
    dtp = force_every_boundary(tiny("dtp_vit_tiny_patch8_64", global_pool=pool))
    missing, unexpected = dtp.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("boundary_predictor.") for k in missing)
    ref, out = plain.encode(images), dtp.encode(images)
    assert out.token_mask.all() and out.tokens.shape == ref.tokens.shape
    assert (out.tokens - ref.tokens).abs().max() < 1e-5
    assert (out.pooled - ref.pooled).abs().max() < 1e-5
    assert out.stats["boundary_ratio"] == 1.0


def test_dtp_variable_lengths_match_per_image_runs(images):
    """Padding and key masks do not leak: each image alone gives the same tokens as in the batch."""
    dtp = tiny("dtp_vit_tiny_patch8_64", compression=0.3)
    with torch.no_grad():
        dtp.boundary_predictor.mlp[-1].bias.fill_(0.0)
    batch = dtp.encode(images)
    assert len(set(batch.token_mask.sum(1).tolist())) > 1, "test needs different lengths per image"
    for i in range(len(images)):
        single = dtp.encode(images[i:i + 1])
        n = int(single.token_mask.sum())
        assert int(batch.token_mask[i].sum()) == n
        assert (batch.tokens[i, :n] - single.tokens[0, :n]).abs().max() < 1e-5
        assert (batch.pooled[i] - single.pooled[0]).abs().max() < 1e-5


def test_grad_checkpointing_keeps_outputs_and_gradients(images):
    model = tiny("dtp_vit_tiny_patch8_64").train()
    torch.manual_seed(3)
    ref = model.encode(images).pooled.square().sum()
    ref.backward()
    ref_grad = model.blocks[3].mlp.fc1.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(3)
    out = model.encode(images).pooled.square().sum()
    out.backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(model.blocks[3].mlp.fc1.weight.grad, ref_grad, atol=1e-5)


def test_no_weight_decay_and_group_matcher_cover_dtp():
    model = tiny("dtp_vit_tiny_patch8_64")
    assert {"pos_embed", "cls_token"} <= model.no_weight_decay()
    from timm.models import group_parameters
    groups = group_parameters(model, model.group_matcher())
    grouped = {n for params in groups.values() for n in params}
    assert grouped == {n for n, _ in model.named_parameters()}
    predictor_group = next(g for g, params in groups.items() if "boundary_predictor.mlp.0.weight" in params)
    assert "blocks.1.mlp.fc1.weight" in groups[predictor_group]  # with the last pre-layer


@pytest.mark.parametrize("name", ["plain_vit_tiny_patch16_64", "dtp_vit_tiny_patch16_64_4x"])
def test_fresh_class_token_features_differ_between_images(name):
    """The class token starts at zero, so pre-norm cannot blow it up into one vector that every
    image's feature shares (timm's 1e-6 init gave cosine ~0.99 between images)."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    assert model.global_pool == "token" and not model.cls_token.any() and not model.pos_embed[:, 0].any()
    with torch.no_grad():
        features = torch.nn.functional.normalize(model.encode(torch.randn(8, 3, 64, 64)).pooled, dim=-1)
    cosine = features @ features.t()
    assert cosine[~torch.eye(8, dtype=torch.bool)].mean() < 0.5
