"""DTP-ViT's own pieces: segment pooling, the boundary predictor and its loss."""
import math

import pytest
import torch

from conftest import tiny
from dtpclip.encoders import BoundaryPredictor, segment_pool
from dtpclip.encoders.dtp import segment_ids
from dtpclip.encoders.varlen import VarlenBatch


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


def test_varlen_batch_round_trip_orders_images_by_length():
    lengths = torch.tensor([3, 1, 4, 3])
    padded = torch.arange(4 * 5, dtype=torch.float32).view(4, 5, 1) * (torch.arange(5) < lengths[:, None]).unsqueeze(-1)
    layout = VarlenBatch.plan(lengths, lengths.tolist(), seq_len=5)
    assert layout.buckets == ((1, 1), (2, 3), (1, 4)) and layout.max_len == 4
    assert layout.cu_seqlens.tolist() == [0, 1, 4, 7, 11]
    flat = layout.pack(padded)
    assert flat.shape == (1, 11, 1) and flat[0, :, 0].tolist() == [5, 0, 1, 2, 15, 16, 17, 10, 11, 12, 13]
    assert torch.equal(layout.unpack(flat, 4, 5), padded)


def test_varlen_attention_sees_only_its_own_image():
    """Each bucket's SDPA on the flat run equals attention on each image alone."""
    torch.manual_seed(0)
    lengths = [3, 1, 4, 3]
    layout = VarlenBatch.plan(torch.tensor(lengths), lengths, seq_len=4)
    q, k, v = torch.randn(3, 1, 2, sum(lengths), 8).unbind(0)
    out = layout.attention(q, k, v)
    starts = layout.cu_seqlens.tolist()
    for first, last in zip(starts, starts[1:]):
        alone = torch.nn.functional.scaled_dot_product_attention(*(t[:, :, first:last] for t in (q, k, v)))
        assert (out[:, :, first:last] - alone).abs().max() < 1e-6


def test_varlen_flash_call_gets_the_runs_layout(monkeypatch):
    """The CUDA kernel's inputs (cu_seqlens, max length, [T, H, hd]), checked on CPU with a stand-in kernel."""
    from dtpclip.encoders import varlen

    def per_sequence(q, k, v, cu_q, cu_k, max_q, max_k):
        assert q.shape[1:] == (2, 8) and torch.equal(cu_q, cu_k) and max_q == max_k == 4
        assert cu_q.dtype == torch.int32
        starts = cu_q.tolist()
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1) for a, b in zip(starts, starts[1:])])

    lengths = [3, 1, 4, 3]
    layout = VarlenBatch.plan(torch.tensor(lengths), lengths, seq_len=4)
    q, k, v = torch.randn(3, 1, 2, sum(lengths), 8).unbind(0)
    buckets = layout.attention(q, k, v)
    monkeypatch.setattr(varlen, "varlen_attn", per_sequence)
    monkeypatch.setattr(VarlenBatch, "uses_flash", lambda self, q, dropout_p: True)
    assert (layout.attention(q, k, v) - buckets).abs().max() < 1e-6


def test_segments_under_bf16_autocast_equal_fp32_at_576_patches():
    """336 px / patch 14: segment ids past 256 are exact, no token in two segments or none."""
    torch.manual_seed(0)
    boundaries = (torch.rand(4, 576) < 0.1).to(torch.bfloat16)  # as a bf16 predictor hands them over
    tokens = torch.randn(4, 576, 8)
    ref_segments, ref_mask = segment_pool(tokens, boundaries.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        segments, mask = segment_pool(tokens.bfloat16(), boundaries)
    assert torch.equal(mask, ref_mask) and ref_mask.sum() > 4 * 256 * 0.1
    assert torch.equal(segment_ids(boundaries).float(), segment_ids(boundaries.float()))
    assert (segments.float() - ref_segments).abs().max() < 0.05  # bf16 rounding of the means only


def test_boundaries_sampled_at_the_prior_in_bf16():
    torch.manual_seed(0)
    predictor = BoundaryPredictor(8, 8, prior=0.1).to(torch.bfloat16).train()
    expected = torch.sigmoid(predictor.mlp[-1].bias.float()).item()  # the prior as bf16 holds it
    x = torch.zeros(256, 576, 8, dtype=torch.bfloat16)
    boundaries = predictor(x)
    assert boundaries.dtype == torch.float32
    assert abs(boundaries.mean().item() - expected) < 0.002  # the bf16-noise bug sampled 0.0973


def test_one_host_sync_per_forward(images, monkeypatch):
    """Every read of a tensor value on the host goes through `.tolist()`/`.item()`/`int()`; DTP's forward makes one."""
    model = tiny("dtp_vit_tiny_patch8_64", compression=0.3).train()
    reads = []
    for name in ("tolist", "item", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name: reads.append(_n) or _f(self, *a))
    model.encode(images)
    assert reads == ["tolist"]


def test_varlen_path_equals_padded_reference(images):
    """Train mode (sampled boundaries, same seed): outputs and gradients agree within 1e-5."""
    results = []
    for layout in ("varlen", "padded"):
        model = tiny("dtp_vit_tiny_patch8_64", compression=0.3, token_layout=layout).train()
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


def test_torch_compile_matches_eager_with_dynamic_token_counts():
    """Training's case: a fixed batch size whose token counts change each batch. Once the counts have turned
    dynamic (a recompile or two), new counts reuse the graphs; a short last batch still matches eager."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = tiny("dtp_vit_tiny_patch8_64", compression=0.3).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model)
    lengths, graphs = set(), []
    with torch.no_grad():
        for batch in (4, 4, 4, 4, 4, 3):
            images = torch.randn(batch, 3, 64, 64)
            lengths.add(tuple(model.encode(images).token_mask.sum(1).tolist()))
            assert (compiled(images) - model(images)).abs().max() < 1e-5
            graphs.append(counters["stats"]["unique_graphs"])
    assert len(lengths) >= 4 and graphs[4] == graphs[3]


def test_annealed_rate_shifts_the_boundaries_and_the_loss_to_it():
    torch.manual_seed(0)
    predictor = BoundaryPredictor(8, 8, prior=0.25).train()
    with torch.no_grad():
        predictor.mlp[-1].weight.zero_()  # p = prior for every token, before the shift
    x = torch.zeros(256, 576, 8)
    for strength, rate in ((0.0, BoundaryPredictor.MAX_RATE), (0.5, 0.25 + 0.5 * (BoundaryPredictor.MAX_RATE - 0.25))):
        predictor.set_strength(strength)
        assert abs(predictor(x).mean().item() - rate) < 0.005
        sampled = predictor(x)  # the loss is least at the annealed rate, not at the prior
        assert predictor.loss(sampled) < BoundaryPredictor(8, 8, prior=0.25).loss(sampled)
    predictor.set_strength(1.0)
    assert predictor.logit_offset == 0.0 and predictor.rate == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"reduction strength must be in \[0, 1\], got 1.5"):
        predictor.set_strength(1.5)


def test_entropy_boundaries_refuse_an_anneal():
    with pytest.raises(ValueError, match="no boundary rate to anneal"):
        tiny("dtp_vit_tiny_patch8_64", boundary_predictor="entropy").set_reduction_strength(0.5)
