"""TokenLearner-ViT: the v1.1 module's maps and tokens, shapes, masks and where gradients flow."""
import pytest
import torch

from conftest import tiny
from dtpclip.encoders.token_learner import TokenLearner


def test_learned_tokens_are_softmax_maps_over_positions_of_the_raw_tokens():
    torch.manual_seed(0)
    learner = TokenLearner(dim=16, num_tokens=4, bottleneck_dim=8)
    x = torch.randn(2, 9, 16) * 3
    tokens, maps = learner(x)
    logits = learner.mlp.fc2(torch.nn.functional.gelu(learner.mlp.fc1(learner.norm(x)), approximate="tanh"))
    expected_maps = torch.softmax(logits, dim=1)  # over the 9 positions, per learned token
    assert torch.allclose(maps, expected_maps.transpose(1, 2), atol=1e-6)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4))
    assert torch.allclose(tokens, torch.einsum("bns,bnd->bsd", expected_maps, x), atol=1e-5)


def test_encode_shapes_mask_and_the_class_token_kept(images):
    model = tiny("tokenlearner_vit_tiny_patch8_64_16tok")
    out = model.encode(images)
    assert out.tokens.shape == (3, 1 + 16, 32) and out.token_mask.all() and out.pooled.shape == (3, 32)
    assert model.settings() == {"num_tokens": 16, "learner_layer": 2}
    groups, boundaries = model.token_groups(images)
    assert groups.shape == (3, 8, 8) and boundaries is None and int(groups.max()) < 16


def test_gradients_reach_the_learner_and_the_blocks_before_it(images):
    model = tiny("tokenlearner_vit_tiny_patch8_64_8tok").train()
    model.encode(images).pooled.square().sum().backward()
    for name in ("token_learner.mlp.fc1.weight", "token_learner.norm.weight", "blocks.0.attn.qkv.weight",
                 "blocks.3.mlp.fc2.weight", "patch_embed.proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_plain_vit_weights_load_and_only_the_learner_is_new():
    plain = tiny("plain_vit_tiny_patch8_64")
    model = tiny("tokenlearner_vit_tiny_patch8_64", seed=1)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(model.fresh_parameter_prefixes) for k in missing)


def test_learner_layer_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"learner_layer must be in \[1, depth - 1\] = \[1, 3\], got 4"):
        tiny("tokenlearner_vit_tiny_patch8_64", learner_layer=4)
