"""The splice: each image's own real tokens at its placeholder, nothing padded reaches the LM;
the vision tower's select layer / feature; the projectors."""
import pytest
import torch
import torch.nn as nn
from conftest import tiny
from transformers import LlamaConfig, LlamaForCausalLM

from llava_bridge.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_bridge.model import LlavaModel, VisionTower, splice_visual_tokens
from llava_bridge.projector import build_projector

PAD = 0
SENTINEL = 1e4  # what padded image-token slots hold: must never reach the LM input


def tiny_lm(hidden: int = 16, vocab: int = 50):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        tie_word_embeddings=False)).eval()


def varying_dtp(**kwargs):
    """A tiny DTP-ViT whose untrained predictor puts boundaries at about half the patches (eval: p > 0.5)."""
    model = tiny("dtp_vit_tiny_patch8_64", compression=0.5, **kwargs)
    nn.init.normal_(model.boundary_predictor.mlp[-1].weight, std=1.0)
    nn.init.zeros_(model.boundary_predictor.mlp[-1].bias)
    return model


def test_splice_places_each_images_real_tokens_at_its_placeholder():
    embed = nn.Embedding(20, 4)
    # sample 0: text, image, text; sample 1: image first; sample 2: text only (padded)
    input_ids = torch.tensor([[5, 6, IMAGE_TOKEN_INDEX, 7, 8], [IMAGE_TOKEN_INDEX, 9, 10, PAD, PAD],
                              [11, 12, 13, PAD, PAD]])
    attention_mask = (torch.arange(5) < torch.tensor([[5], [3], [3]])).long()
    labels = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    labels[labels == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
    features = torch.randn(2, 4, 4)
    feature_mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    features[~feature_mask] = SENTINEL
    out = splice_visual_tokens(input_ids, attention_mask, labels, features, feature_mask, embed)
    assert out.visual_counts == [3, 1, 0]
    assert out.attention_mask.sum(1).tolist() == [4 + 3, 2 + 1, 3]
    assert out.inputs_embeds.shape == (3, 7, 4)
    assert not (out.inputs_embeds == SENTINEL).any()
    e = embed.weight
    assert torch.equal(out.inputs_embeds[0], torch.cat([e[[5, 6]], features[0, :3], e[[7, 8]]]))
    assert torch.equal(out.inputs_embeds[1, :3], torch.cat([features[1, :1], e[[9, 10]]]))
    assert torch.equal(out.inputs_embeds[2, :3], e[[11, 12, 13]])
    assert (out.inputs_embeds[1:, 3:].abs().sum() == 0) and (out.inputs_embeds[2, 3:].abs().sum() == 0)
    assert out.labels.tolist() == [[5, 6, -100, -100, -100, 7, 8], [-100, 9, 10, -100, -100, -100, -100],
                                   [11, 12, 13, -100, -100, -100, -100]]


def test_splice_counts_placeholders_against_images():
    embed = nn.Embedding(20, 4)
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX]])
    with pytest.raises(ValueError, match="batch holds only 0 images"):
        splice_visual_tokens(ids, torch.ones_like(ids), None, None, None, embed)
    with pytest.raises(ValueError, match="holds 2 images but 1"):
        splice_visual_tokens(ids, torch.ones_like(ids), None, torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=bool), embed)


def test_dtp_tower_splices_each_images_own_token_count(images):
    encoder = varying_dtp()
    model = LlavaModel(VisionTower(encoder), tiny_lm(), "mlp2x_gelu")
    token_mask = encoder.encode(images).token_mask[:, encoder.num_prefix_tokens:]
    counts = token_mask.sum(1).tolist()
    assert len(set(counts)) > 1  # the test needs different counts per image
    input_ids = torch.tensor([[3, IMAGE_TOKEN_INDEX, 4]] * 3)
    spliced = model.splice(input_ids, torch.ones_like(input_ids), input_ids.clamp_min(0), images)
    assert spliced.visual_counts == counts
    assert spliced.attention_mask.sum(1).tolist() == [2 + c for c in counts]
    for b, c in enumerate(counts):
        assert (spliced.labels[b, 1: 1 + c] == IGNORE_INDEX).all() and spliced.labels[b, 1 + c] == 4


def test_select_layer_minus_two_is_the_hidden_state_after_the_second_last_block(images):
    encoder = tiny()
    tokens, mask = VisionTower(encoder, select_layer=-2, select_feature="patch")(images)
    reference = encoder.forward_intermediates(images, indices=[len(encoder.blocks) - 2], norm=False,
                                              intermediates_only=True, output_fmt="NLC")[0]
    assert torch.allclose(tokens, reference, atol=1e-6) and mask.all()
    with_cls, _ = VisionTower(encoder, select_layer=-1, select_feature="cls_patch")(images)
    assert torch.equal(with_cls, encoder.encode(images).tokens)


def test_select_layer_minus_two_of_dtp_is_its_pooled_segments_with_their_mask(images):
    encoder = varying_dtp()
    tokens, mask = VisionTower(encoder, select_layer=-2)(images)
    reference = encoder.forward_intermediates(images, indices=[len(encoder.blocks) - 2], output_fmt="NLC",
                                              intermediates_only=True, output_dict=True)
    assert torch.equal(tokens, reference["image_intermediates"][0])
    assert torch.equal(mask, reference["image_intermediates_mask"][0])
    assert torch.equal(mask, encoder.encode(images).token_mask[:, encoder.num_prefix_tokens:])  # same pooling
    with pytest.raises(ValueError, match="select_feature must be one of"):
        VisionTower(tiny(), select_feature="cls")
    with pytest.raises(ValueError, match=r"select_layer must be in \[-4, -1\]"):
        VisionTower(tiny(), select_layer=-5)


def test_projectors_map_vision_width_to_lm_width():
    mlp, linear = build_projector("mlp2x_gelu", 32, 16), build_projector("linear", 32, 16)
    assert [type(m) for m in mlp] == [nn.Linear, nn.GELU, nn.Linear]
    assert mlp[0].weight.shape == (16, 32) and mlp[2].weight.shape == (16, 16)
    assert linear.weight.shape == (16, 32)
    with pytest.raises(ValueError, match="unknown projector 'mlp3x'"):
        build_projector("mlp3x", 32, 16)


def test_tome_tower_splices_the_merged_token_count(images):
    from dtpclip.encoders.merge import apply_tome
    encoder = tiny()
    apply_tome(encoder, r=8)  # 64 patches + CLS, 8 merges in each of 4 blocks
    model = LlavaModel(VisionTower(encoder), tiny_lm(), "linear")
    input_ids = torch.tensor([[3, IMAGE_TOKEN_INDEX, 4]] * 3)
    assert model.splice(input_ids, torch.ones_like(input_ids), None, images).visual_counts == [64 - 32] * 3


def test_batched_generation_equals_each_sample_alone(images):
    """Prompts of different lengths and images of different token counts (DTP) in one batch: left padding
    after the splice gives each sample the tokens it gets alone."""
    model = LlavaModel(VisionTower(varying_dtp()), tiny_lm(), "mlp2x_gelu").eval()
    prompts = [[3, IMAGE_TOKEN_INDEX, 4], [5, 6, 7, IMAGE_TOKEN_INDEX, 8], [9, IMAGE_TOKEN_INDEX, 10, 11]]
    alone = [model.generate(torch.tensor([p]), images[i:i + 1], max_new_tokens=6, pad_token_id=PAD)[0].tolist()
             for i, p in enumerate(prompts)]
    length = max(map(len, prompts))
    input_ids = torch.full((3, length), PAD)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):  # right-padded text: the splice re-pads on the left
        input_ids[row, :len(ids)], attention_mask[row, :len(ids)] = torch.tensor(ids), 1
    batched = model.generate(input_ids, images, attention_mask=attention_mask, max_new_tokens=6, pad_token_id=PAD)
    assert batched.tolist() == alone
