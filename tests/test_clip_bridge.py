"""open_clip interop: CLIP checkpoints load into our encoders and CLIPs, our names build in open_clip."""
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import dtpclip
from dtpclip.clip import create_clip_and_transforms, encode_image


@pytest.fixture(scope="module")
def openclip_b32(tmp_path_factory):
    """open_clip's own ViT-B-32 with random weights, saved to disk as a user's checkpoint would be."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    path = tmp_path_factory.mktemp("ckpt") / "vit_b32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


@pytest.fixture(scope="module")
def batch():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def test_plain_vit_reproduces_open_clip_visual(openclip_b32, batch):
    reference, path = openclip_b32
    encoder = dtpclip.create_encoder("plain_vit_base_patch32_224", checkpoint=path).eval()
    with torch.no_grad():
        ours = encoder.encode(batch).pooled @ reference.visual.proj
        theirs = reference.encode_image(batch)
    assert (ours - theirs).abs().max() < 1e-4


def test_timm_pretrained_file_path_loads_clip_weights(openclip_b32, batch):
    reference, path = openclip_b32
    encoder = timm.create_model("plain_vit_base_patch32_224", pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert (encoder(batch) @ reference.visual.proj - reference.encode_image(batch)).abs().max() < 1e-4


def test_dtp_loads_clip_weights_into_its_blocks(openclip_b32):
    reference, path = openclip_b32
    dtp = dtpclip.create_encoder("dtp_vit_base_patch32_224_10x", checkpoint=path)
    assert torch.equal(dtp.blocks[7].attn.qkv.weight, reference.visual.transformer.resblocks[7].attn.in_proj_weight)
    assert torch.equal(dtp.cls_token.flatten(), reference.visual.class_embedding)


def test_full_open_clip_checkpoint_loads_into_our_clip(openclip_b32, batch):
    reference, path = openclip_b32
    model, _, preprocess = create_clip_and_transforms("PlainViT-B-32", pretrained=str(path))
    model.eval()
    text = open_clip.tokenize(["a photo of a cat", "a red triangle"])
    with torch.no_grad():
        assert (model.encode_image(batch) - reference.encode_image(batch)).abs().max() < 1e-4
        assert (model.encode_text(text) - reference.encode_text(text)).abs().max() < 1e-5
        features, out = encode_image(model, batch)
        assert torch.equal(features, model.encode_image(batch))
    assert preprocess(Image.new("RGB", (300, 200))).shape == (3, 224, 224)


def test_mismatched_checkpoint_is_a_clear_error(openclip_b32):
    _, path = openclip_b32
    with pytest.raises(ValueError, match="vit_b32.safetensors.*does not match"):
        dtpclip.create_encoder("plain_vit_small_patch16_224", checkpoint=path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors' does not exist"):
        dtpclip.create_encoder("plain_vit_tiny_patch8_64", checkpoint="nope.safetensors")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read checkpoint .*bad.pt"):
        dtpclip.create_encoder("plain_vit_tiny_patch8_64", checkpoint=bad)


def test_open_clip_builds_our_names_with_encode_reaching_aux_loss():
    assert {"PlainViT-B-32", "DTP-ViT-B-32-2x", "DTP-ViT-B-32-4x", "DTP-ViT-B-32-10x", "DTP-ViT-Ti-8-64-4x"} \
        <= set(open_clip.list_models())
    model, _, preprocess = open_clip.create_model_and_transforms("DTP-ViT-Ti-8-64-4x")
    assert type(model.visual.trunk).__name__ == "DTPViT" and model.visual.trunk.boundary_predictor.prior == 0.25
    images = preprocess(Image.new("RGB", (80, 80))).unsqueeze(0).repeat(2, 1, 1, 1)
    assert images.shape == (2, 3, 64, 64)
    model.train()
    features, out = encode_image(model, images)
    assert features.shape == (2, 128) and out.aux_loss > 0 and "boundary_ratio" in out.stats


@pytest.mark.parametrize("name", ["DTP-ViT-Ti-8-64-4x", "ToMe-ViT-Ti-8-64-r8"])
def test_open_clip_forward_intermediates_image_features_equal_encode_image(name):
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        result = model.forward_intermediates(image=images, image_indices=2, image_output_fmt="NLC")
        features, _ = encode_image(model, images)
    assert torch.allclose(result["image_features"], F.normalize(features, dim=-1), atol=1e-5)  # normalize=True
    assert len(result["image_intermediates"]) == 2


def test_lock_image_tower_and_grad_checkpointing():
    model = open_clip.create_model("DTP-ViT-Ti-8-64-4x")
    model.lock_image_tower()
    assert not any(p.requires_grad for p in model.visual.trunk.parameters())
    assert any(p.requires_grad for p in model.transformer.parameters())
    model = open_clip.create_model("DTP-ViT-Ti-8-64-4x")
    model.lock_image_tower(unlocked_groups=1)  # timm groups the final norm with the last block
    trainable = {n for n, p in model.visual.trunk.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.visual.trunk.named_parameters() if n.startswith(("blocks.5.", "norm."))}
    model.set_grad_checkpointing(True)
    assert model.visual.trunk.grad_checkpointing


def test_encode_image_rejects_open_clip_native_towers():
    with pytest.raises(TypeError, match="no registry encoder"):
        encode_image(open_clip.create_model("RN50"), torch.zeros(1, 3, 224, 224))


def test_model_kwargs_reach_the_clip_tower_and_its_preprocess():
    clip, _, preprocess = create_clip_and_transforms("DTP-ViT-Ti-8-64", model_kwargs={"compression": 0.2,
                                                                                   "pre_layers": 3})
    trunk = clip.visual.trunk
    assert trunk.boundary_predictor.prior == 0.2 and trunk.pre_layers == 3
    assert dtpclip.encoder_info("DTP-ViT-Ti-8-64").compression == 0.25  # the registered default is untouched
    clip, _, preprocess = create_clip_and_transforms("PlainViT-Ti-8-64", model_kwargs={"img_size": 32})
    image = preprocess(Image.new("RGB", (80, 80)))
    assert image.shape == (3, 32, 32) and encode_image(clip, image[None])[0].shape == (1, 128)


def test_registry_metadata_is_read_off_the_built_model():
    """One fact in one place: the registry's compression is the built model's boundary prior."""
    for info in (i for i in dtpclip.list_encoders("dtp") if i.size.img_size <= 64):
        with torch.device("meta"):
            model = timm.create_model(info.name)
        # entropy boundaries fall where the spikes do: no compression to report
        assert info.compression == (None if model.boundary_kind == "entropy" else model.boundary_predictor.prior)
    assert dtpclip.encoder_info("dtp_vit_tiny_patch16_64").compression == 0.25
