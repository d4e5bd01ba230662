"""The encoder contract, checked on one encoder of every registered family at every kind of small size:
a new family gets these tests without writing them."""
import open_clip
import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

import dtpclip
from conftest import TINY
from dtpclip.flops import count_macs
from dtpclip.profile import VisualTower
from llava_bridge.conversation import IMAGE_TOKEN_INDEX
from llava_bridge.model import VisionTower, splice_visual_tokens


def contract_names():
    """The last name of each (family, size) among the sizes of at most 64 pixels (the 224 ones differ in numbers
    only): the last variant, which for the merging families is one that merges."""
    chosen = {}
    for info in dtpclip.list_encoders():
        if info.size.img_size <= 64:
            chosen[(info.family, info.size.name)] = info.name
    return sorted(chosen.values())


NAMES = contract_names()


def build(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **{**TINY, **kwargs}).eval()


def images_for(model, n=3):
    size = model.patch_embed.img_size
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(1))


def test_every_family_is_covered():
    assert {dtpclip.encoder_info(n).family for n in NAMES} >= {"vit", "dtp", "tome", "lgtm", "vq"}


@pytest.mark.parametrize("name", NAMES)
def test_encode_shapes_mask_and_scalar_aux_loss(name):
    model = build(name)
    with torch.no_grad():
        out = model.encode(images_for(model))
    batch, tokens, dim = out.tokens.shape
    assert batch == 3 and dim == model.num_features
    assert out.token_mask.shape == (3, tokens) and out.token_mask.dtype == torch.bool and out.token_mask.any(1).all()
    assert (out.tokens[~out.token_mask] == 0).all()
    assert out.pooled.shape == (3, dim) and out.aux_loss.ndim == 0 and torch.isfinite(out.aux_loss)
    assert all(v.ndim == 0 for v in out.stats.values())


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_the_head_of_the_pooled_features(name):
    model = build(name, num_classes=5)
    images = images_for(model)
    with torch.no_grad():
        logits, pooled = model(images), model.encode(images).pooled
        assert logits.shape == (3, 5)
        assert torch.allclose(logits, model.get_classifier()(pooled), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip(name, tmp_path):
    model = build(name)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    loaded = dtpclip.create_encoder(name, checkpoint=str(tmp_path / "model.safetensors"), **TINY).eval()
    images = images_for(model)
    with torch.no_grad():
        assert torch.equal(loaded.encode(images).pooled, model.encode(images).pooled)


@pytest.mark.parametrize("name", NAMES)
def test_each_transform_applies_or_refuses_clearly(name):
    for transform in dtpclip.list_transforms():
        model = build(name)
        images = images_for(model)
        calibration = [images] if transform.calibration else None
        if not transform.applies_to(model):
            with pytest.raises((TypeError, ValueError)):
                dtpclip.apply_transforms(model, [transform.example], calibration)
            continue
        with torch.no_grad():
            before = model.encode(images)
            dtpclip.apply_transforms(model, [transform.example], calibration)
            after = model.encode(images)
        unreduced = model.patch_embed.num_patches + model.num_prefix_tokens
        assert after.tokens.shape[0] == 3 and after.tokens.shape[1] <= unreduced
        assert torch.isfinite(after.pooled).all()
        cosine = nn.functional.cosine_similarity(after.pooled, before.pooled).min()
        assert cosine > 0.5, f"{transform.example} on {name}: pooled features moved too far (cosine {cosine:.2f})"


@pytest.mark.parametrize("name", [n for n in NAMES if dtpclip.encoder_info(n).clip_name])
def test_open_clip_builds_the_clip(name):
    info = dtpclip.encoder_info(name)
    torch.manual_seed(0)
    clip = open_clip.create_model(info.clip_name).eval()
    assert type(clip.visual.trunk).__name__.endswith(type(build(name)).__name__)
    with torch.no_grad():
        features = clip.encode_image(images_for(clip.visual.trunk, 2))
    assert features.shape == (2, clip.text_projection.shape[1]) and torch.isfinite(features).all()


@pytest.mark.parametrize("name", NAMES)
def test_llava_splices_each_images_real_tokens(name):
    tower = VisionTower(build(name))
    tokens, mask = tower(images_for(tower.encoder))
    embed, project = nn.Embedding(8, 6), nn.Linear(tower.hidden_size, 6)
    input_ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 2]] * 3)
    with torch.no_grad():
        spliced = splice_visual_tokens(input_ids, torch.ones_like(input_ids), None, project(tokens), mask, embed)
    assert spliced.visual_counts == mask.sum(1).tolist()
    assert spliced.attention_mask.sum(1).tolist() == [2 + n for n in spliced.visual_counts]


@pytest.mark.parametrize("name", NAMES)
def test_profile_counts_macs_and_params(name):
    model = build(name, num_classes=0)
    tower = VisualTower(model, embed_dim=16)
    macs = count_macs(tower.eval(), images_for(model, 2))
    assert macs.total > macs.attention_free > 0 or macs.total == macs.attention_free > 0
    assert dtpclip.encoder_info(name).settings(**TINY) == model.settings()


@pytest.mark.parametrize("name", NAMES)
def test_timm_feature_api_is_true_to_encode(name):
    """timm's `forward_intermediates` gives the tokens each block really holds: the final features are `encode`'s
    tokens (its pooled through `forward_head`), the last block's normed tokens its patch tokens (with their
    mask); NCHW maps exist for the blocks that keep the grid, equal to running those blocks, and are refused past them;
    `features_only=True` equals the same features."""
    model = build(name)
    images = images_for(model, 3)
    depth, prefix = len(model.blocks), model.num_prefix_tokens
    with torch.no_grad():
        out = model.encode(images)
        result = model.forward_intermediates(images, norm=True, output_fmt="NLC", output_dict=True)
        pooled = model.forward_head(result["image_features"], pre_logits=True)
    assert torch.allclose(result["image_features"], out.tokens, atol=1e-5)
    assert torch.allclose(pooled, out.pooled, atol=1e-5)
    assert torch.allclose(result["image_intermediates"][-1], out.tokens[:, prefix:], atol=1e-5)
    if "image_intermediates_mask" in result:  # variable-length tokens
        assert torch.equal(result["image_intermediates_mask"][-1], out.token_mask[:, prefix:])
    if model.grid_layers < depth:
        with pytest.raises(ValueError, match="output_fmt='NLC'"):
            model.forward_intermediates(images, indices=[depth - 1])
    if model.grid_layers:
        with torch.no_grad():
            grid = model.forward_intermediates(images, indices=[model.grid_layers - 1], intermediates_only=True)[0]
            expected = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
            for block in model.blocks[:model.grid_layers]:
                expected = block(expected)
            expected = expected[:, prefix:]
        assert grid.shape == (3, TINY["embed_dim"], *model.patch_embed.grid_size)
        assert torch.allclose(grid.flatten(2).transpose(1, 2), expected, atol=1e-5)
    torch.manual_seed(0)
    features = timm.create_model(name, **TINY, features_only=True, out_indices=(depth - 1,)).eval()
    with torch.no_grad():
        last = features(images)[0]
        expected = model.forward_intermediates(images, indices=[depth - 1], output_fmt="NLC",
                                               intermediates_only=True)[0]
    assert torch.allclose(last.flatten(2).transpose(1, 2) if last.ndim == 4 else last, expected, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_training_through_forward_warns_when_the_aux_loss_is_dropped(name):
    import warnings
    model = build(name).train()
    images = images_for(model, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.encode(images)
        assert not caught
        model(images)
    dropped = [w for w in caught if "cannot return its aux_loss" in str(w.message)]
    assert bool(dropped) == model.has_aux_loss


@pytest.mark.parametrize("name", NAMES)
def test_training_through_forward_hands_the_aux_loss_to_a_collector(name):
    import warnings
    from dtpclip.encoders.vit import collecting_aux_losses
    model = build(name).train()
    images = images_for(model, 2)
    torch.manual_seed(3)
    expected = model.encode(images)
    with collecting_aux_losses() as handed, warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(3)
        logits = model(images)
    assert torch.allclose(logits, model.head(expected.pooled), atol=1e-6)
    assert len(handed) == int(model.has_aux_loss)
    if handed:
        assert torch.equal(handed[0].aux_loss, expected.aux_loss) and handed[0].aux_loss.requires_grad
