"""DTP's entropy-spike boundaries: the reference's spike rule, targets that cannot see the patch they
predict, deterministic boundaries, the Gumbel path's segment semantics, and where gradients flow."""
import pytest
import torch

from conftest import tiny
from dtpclip.encoders.dtp import entropy_spikes


def reference_get_spikes(vector, spikes_left):
    """dynamic-pooling's hourglass.get_spikes, on its [T, B] layout."""
    total = torch.ones_like(vector).bool()
    for i in range(1, spikes_left + 1):
        total[i:] &= vector[i:] > vector[:-i]
    return total


def test_spikes_equal_the_references_rule():
    entropy = torch.tensor([[0.5, 0.2, 0.9, 0.8, 1.0, 0.1, 0.3, 0.4]])
    assert entropy_spikes(entropy, 2)[0].tolist() == [True, False, True, False, True, False, False, True]
    random = torch.rand(5, 50, generator=torch.Generator().manual_seed(0))
    for spikes_left in (1, 2, 3):
        assert torch.equal(entropy_spikes(random, spikes_left), reference_get_spikes(random.T, spikes_left).T)


def entropy_dtp():
    return tiny("dtp_vit_tiny_patch8_64_entropy")


def test_targets_at_a_patch_do_not_see_the_patch_they_predict(images):
    model = entropy_dtp()
    head = model.entropy_predictor
    edited = images.clone()
    edited[:, :, 0:8, 8:16] = 3.0  # patch 1 (row 0, column 1) in raster order
    prefix = model.num_prefix_tokens
    before = head.next_code_log_probs(model._embed(images)[:, prefix:])
    after = head.next_code_log_probs(model._embed(edited)[:, prefix:])
    changed = (before - after).abs().amax(-1).amax(0) > 0
    assert changed.tolist() == [i == 1 for i in range(64)]  # only patch 1's own prediction (of patch 2)
    assert head.codes(edited)[:, 1].eq(63).all()  # the bright patch lands in the top colour bin


def test_boundaries_are_deterministic_thresholded_and_pool_as_the_gumbel_path(images):
    model = entropy_dtp().train()
    first, second = model.forward_pooled(images), model.forward_pooled(images)
    assert torch.equal(first.boundaries, second.boundaries)
    assert torch.equal(first.boundaries, (torch.sigmoid(first.logits) > 0.5).float())
    gumbel = tiny("dtp_vit_tiny_patch8_64", eval_boundaries="threshold").eval()
    gumbel.load_state_dict(model.state_dict(), strict=False)
    model.eval()
    with torch.no_grad():
        ours, theirs = model.encode(images), gumbel.encode(images)
    assert torch.equal(ours.tokens, theirs.tokens) and torch.equal(ours.token_mask, theirs.token_mask)


def test_gradients_reach_the_predictor_from_its_bce_not_the_task_and_the_head_observes(images):
    model = entropy_dtp().train()
    out = model.encode(images)
    out.pooled.square().sum().backward(retain_graph=True)  # the task loss alone
    assert model.boundary_predictor.mlp[0].weight.grad is None or not model.boundary_predictor.mlp[0].weight.grad.any()
    model.zero_grad()
    out.aux_loss.backward()  # BCE into the predictor and, as in the reference, the blocks below it
    assert model.boundary_predictor.mlp[0].weight.grad.abs().sum() > 0
    assert model.entropy_predictor.head[1].weight.grad.abs().sum() > 0
    assert 0 < out.stats["spike_ratio"] < 1 and "spike_accuracy" in out.stats
    model.zero_grad()
    _, head_loss = model.entropy_predictor(model._embed(images)[:, model.num_prefix_tokens:], images)
    head_loss.backward()  # the entropy head observes: its loss trains itself, not the encoder
    assert model.entropy_predictor.head[1].weight.grad.abs().sum() > 0
    assert model.patch_embed.proj.weight.grad is None


def test_unknown_boundary_predictor_is_refused():
    with pytest.raises(ValueError, match="boundary_predictor must be one of"):
        tiny("dtp_vit_tiny_patch8_64", boundary_predictor="unigram")
