"""DTP-ViT's own pieces: segment pooling, the boundary predictor and its loss."""
import math

import pytest
import torch

from conftest import tiny
from dtpclip.encoders import BoundaryPredictor, segment_pool


def test_segment_pool_means_segments_and_keeps_trailing_open_segment():
    tokens = torch.arange(6.0).view(1, 6, 1).repeat(2, 1, 1)
    boundaries = torch.tensor([[0., 1., 0., 0., 1., 0.],   # [0 1] [2 3 4] [5]  (open trailing segment)
                               [1., 1., 1., 1., 1., 1.]])  # every token its own segment
    segments, mask = segment_pool(tokens, boundaries)
    assert segments.shape == (2, 6, 1)
    assert mask.tolist() == [[True] * 3 + [False] * 3, [True] * 6]
    assert segments[0, :3, 0].tolist() == [0.5, 3.0, 5.0]
    assert segments[1, :, 0].tolist() == [0., 1., 2., 3., 4., 5.]
    assert (segments[0, 3:] == 0).all()


def test_segment_pool_without_trailing_segment_when_last_token_closes():
    segments, mask = segment_pool(torch.ones(1, 4, 2), torch.tensor([[0., 1., 0., 1.]]))
    assert mask.tolist() == [[True, True]]


def test_gradient_reaches_boundary_predictor(images):
    model = tiny("dtp_vit_tiny_patch8_64").train()
    out = model.encode(images)
    out.pooled.square().sum().backward()  # the task loss alone, without the boundary loss
    grad = model.boundary_predictor.mlp[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_boundary_loss_is_binomial_nll_per_token():
    predictor = BoundaryPredictor(4, 8, prior=0.25)
    boundaries = torch.tensor([[1., 0., 0., 0.], [1., 1., 1., 0.]])
    # log C(4,k) + k log p + (4-k) log(1-p), k = 1 and 3
    nll = [-(math.log(math.comb(4, k)) + k * math.log(0.25) + (4 - k) * math.log(0.75)) for k in (1, 3)]
    assert abs(predictor.loss(boundaries).item() - sum(nll) / 2 / 4) < 1e-5


def test_training_samples_boundaries_at_rate_p_and_each_eval_rule():
    predictor = BoundaryPredictor(4, 8, prior=0.3)
    x = torch.randn(256, 64, 4)
    with torch.no_grad():
        predictor.mlp[-1].weight.zero_()  # p = prior for every token
        train_ratio = predictor.train()(x).mean().item()
        expected = predictor.eval()(x)
        predictor.eval_boundaries = "threshold"
        thresholded = predictor(x)
        predictor.eval_boundaries = "sample"
        sampled_ratio = predictor(x).mean().item()
    assert abs(train_ratio - 0.3) < 0.02 and abs(sampled_ratio - 0.3) < 0.02
    assert thresholded.sum() == 0  # p = 0.3 < 0.5 everywhere: thresholding puts no boundary
    assert (expected.sum(-1) == round(0.3 * 64)).all()  # the expected count, deterministically


def test_expected_eval_rule_keeps_the_most_probable_and_equals_threshold_when_confident():
    predictor = BoundaryPredictor(4, 8, prior=0.3).eval()
    logits = torch.tensor([[4.0, -4.0, 4.0, -4.0], [0.4, -2.0, 0.2, -0.1]])
    predictor.mlp = torch.nn.Identity()  # x -> logits, to set p directly
    expected = predictor(logits[..., None])  # row 2: p = .60 .12 .55 .48, sum 1.75 -> 2 boundaries
    predictor.eval_boundaries = "threshold"
    assert torch.equal(expected[0], predictor(logits[:1, :, None])[0])
    assert expected[1].tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="eval_boundaries must be one of"):
        BoundaryPredictor(4, 8, prior=0.3, eval_boundaries="mean")


def test_boundary_loss_moves_ratio_to_prior(images):
    """On a toy objective (boundary loss plus a small feature loss) the ratio goes from ~0.9 to the prior."""
    model = tiny("dtp_vit_tiny_patch8_64", compression=0.25).train()
    with torch.no_grad():
        model.boundary_predictor.mlp[-1].bias.fill_(math.log(0.9 / 0.1))
    start = model.encode(images).stats["boundary_ratio"].item()
    opt = torch.optim.Adam(model.boundary_predictor.parameters(), lr=3e-3)
    for _ in range(150):
        out = model.encode(images)
        loss = out.aux_loss + 1e-3 * out.pooled.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ratios = [model.encode(images).stats["boundary_ratio"].item() for _ in range(10)]
    assert start > 0.8
    assert abs(sum(ratios) / len(ratios) - 0.25) < 0.05


def test_packed_rows_round_trip_and_block_diagonal_mask():
    from dtpclip.encoders.packing import PackedRows
    lengths = torch.tensor([3, 1, 4, 2])
    padded = torch.arange(4 * 5, dtype=torch.float32).view(4, 5, 1) * (torch.arange(5) < lengths[:, None]).unsqueeze(-1)
    layout = PackedRows.plan(lengths, seq_len=5, max_row_len=5)
    assert layout.rows == 2 and layout.capacity == 5  # longest first to the emptiest row: [4, 1] [3, 2]
    rows = layout.pack(padded)
    assert rows.shape == (2, 5, 1) and rows.sum() == padded.sum()
    assert torch.equal(layout.unpack(rows, 4, 5), padded)
    mask = layout.attn_mask[:, 0]
    assert mask.diagonal(dim1=1, dim2=2).all()  # every slot sees itself (no empty softmax)
    assert mask.sum() == (lengths ** 2).sum()  # no empty slot left
    single = PackedRows.plan(torch.tensor([3]), seq_len=5, max_row_len=5)
    assert (single.rows, single.capacity) == (1, 3)  # one image: a row of exactly its length


def test_packed_path_equals_padded_reference(images):
    """Train mode (sampled boundaries, same seed): outputs and gradients agree within 1e-5."""
    results = []
    for packing in (True, False):
        model = tiny("dtp_vit_tiny_patch8_64", compression=0.3, token_packing=packing).train()
        torch.manual_seed(5)
        out = model.encode(images)
        (out.pooled.square().sum() + out.aux_loss).backward()
        results.append((out, model.blocks[3].attn.qkv.weight.grad, model.boundary_predictor.mlp[0].weight.grad))
    (packed, packed_grad, packed_pgrad), (padded, padded_grad, padded_pgrad) = results
    assert len(set(packed.token_mask.sum(1).tolist())) > 1, "test needs different lengths per image"
    assert torch.equal(packed.token_mask, padded.token_mask)
    assert (packed.tokens - padded.tokens).abs().max() < 1e-5
    assert (packed.pooled - padded.pooled).abs().max() < 1e-5
    assert (packed_grad - padded_grad).abs().max() < 1e-5
    assert (packed_pgrad - padded_pgrad).abs().max() < 1e-5
