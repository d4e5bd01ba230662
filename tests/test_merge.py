"""ToMe and DFE + LGTM: the r = 0 identity, the schedules, exact merges, spatial bookkeeping, the contract."""
import open_clip
import pytest
import timm
import torch
from fvcore.nn import FlopCountAnalysis

from conftest import tiny
from dtpclip.clip import encode_image
from dtpclip.encoders.merge import (apply_lgtm, apply_tome, bipartite_soft_matching, merge_source, merge_wavg,
                                    merged_token_counts, parse_r, remove_tome, window_partition,
                                    windowed_soft_matching)
from dtpclip.flops import count_macs, sdpa_mac_handle

PATCHES = 64  # the tiny ViT: 64x64 images, 8x8 patches, plus one class token


def tokens_per_block(model, images):
    """Token count after each block, read by forward hooks."""
    counts = []
    hooks = [b.register_forward_hook(lambda m, i, o: counts.append(o.shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return counts


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_tome_r0_is_exact_identity(pool, images):
    plain, merged = tiny(global_pool=pool), tiny(global_pool=pool)
    apply_tome(merged, r=0, trace_source=True)
    with torch.no_grad():
        ref, out = plain.encode(images), merged.encode(images)
        assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.pooled, ref.pooled)
        assert torch.equal(merged(images), plain(images))
    assert out.stats["tokens_per_image"] == PATCHES + 1


def test_lgtm_with_every_layer_dense_is_identity(images):
    plain, merged = tiny(), tiny()
    apply_lgtm(merged, r=8, dense_layers=len(merged.blocks), local_layers=2)
    with torch.no_grad():
        assert torch.equal(merged.encode(images).tokens, plain.encode(images).tokens)


def test_remove_tome_restores_the_plain_model(images):
    plain, model = tiny(), tiny()
    apply_tome(model, r=8)
    remove_tome(model)
    assert type(model) is type(plain) and not hasattr(model, "_tome_info")
    with torch.no_grad():
        assert torch.equal(model(images), plain(images))


@pytest.mark.parametrize("r, schedule, counts", [
    (8, [8, 8, 8, 8], [57, 49, 41, 33]),
    ([20, 0, 16], [20, 0, 16, 0], [45, 45, 29, 29]),
    ((8, -1), [16, 10, 5, 0], [49, 39, 34, 34]),  # ToMe's decreasing schedule
    ((8, 1), [0, 5, 10, 16], [65, 60, 50, 34]),
    (40, [40] * 4, [33, 17, 9, 5]),  # capped at half the unprotected tokens per layer
])
def test_token_counts_follow_the_schedule(r, schedule, counts, images):
    model = tiny()
    apply_tome(model, r=r)
    assert model._tome_info["r"] == schedule
    assert merged_token_counts(model) == counts
    assert tokens_per_block(model, images) == counts
    assert model._tome_info["size"].sum(1).flatten().tolist() == [PATCHES + 1.0] * len(images)


def test_parse_r_rejects_bad_schedules():
    with pytest.raises(ValueError, match="5 entries for 4 layers"):
        parse_r(4, [1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="inflection"):
        parse_r(4, (8, 2.0))
    with pytest.raises(ValueError, match=">= 0"):
        parse_r(4, [1, -1])


def test_merging_two_identical_tokens_gives_that_token_with_size_two():
    x = torch.randn(1, 5, 6, generator=torch.Generator().manual_seed(0))
    x[0, 2] = x[0, 1]  # position 2 (set A) duplicates position 1 (set B)
    merge, unmerge = bipartite_soft_matching(x, r=1, class_token=True)
    merged, size = merge_wavg(merge, x)
    assert merged.shape == (1, 4, 6)
    twin = (merged - x[0, 1]).abs().sum(-1).argmin()
    assert torch.equal(merged[0, twin], x[0, 1]) and size[0, twin, 0] == 2
    assert size.sum() == 5 and torch.equal(merged[0, 0], x[0, 0])  # the class token stays first, alone
    restored = unmerge(merged)
    assert torch.allclose(restored, x)  # every position gets back the token that holds it


def test_class_token_is_never_merged():
    x = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(0))
    x[:, 0] = x[:, 1]  # the class token is the most similar token there is
    merge, _ = bipartite_soft_matching(x, r=4, class_token=True)
    source = merge_source(merge, x)
    assert source.shape == (2, 5, 9)
    assert source[:, 0].sum(-1).tolist() == [1.0, 1.0] and source[:, 0, 0].tolist() == [1.0, 1.0]


def twin_patch_images():
    """Images whose patches come in identical horizontal pairs (patch 2m == patch 2m + 1)."""
    pairs = torch.randn(2, 3, 8, 4, generator=torch.Generator().manual_seed(2))  # one pixel per patch pair
    return pairs.repeat_interleave(16, dim=-1).repeat_interleave(8, dim=-2)  # [2, 3, 64, 64]


@pytest.mark.parametrize("fused", [True, False])
def test_merging_duplicates_with_proportional_attention_is_lossless(fused):
    """ToMe's property: k identical tokens merged into one of size k leave every output unchanged.

    With no position embedding, twin patches give identical tokens, which stay identical through
    every block. r = 32 in the first block merges each twin pair (cosine similarity 1); with
    proportional attention the merged model reproduces the plain model, without it it does not.
    """
    images = twin_patch_images()
    plain, merged = tiny(global_pool="token"), tiny(global_pool="token")  # the CLS token sees every merge
    for model in (plain, merged):
        with torch.no_grad():
            model.pos_embed.zero_()
        for block in model.blocks:
            block.attn.fused_attn = fused
    apply_tome(merged, r=[32], trace_source=True)
    with torch.no_grad():
        ref, out = plain.encode(images), merged.encode(images)
    assert out.tokens.shape == (2, 33, 32)
    assert (out.pooled - ref.pooled).abs().max() < 1e-5
    # every merged token equals each of the plain tokens it holds
    source = merged._tome_info["source"]
    assert torch.equal(source.sum(-1), merged._tome_info["size"][..., 0])
    assert sorted(source.sum(-1)[0].tolist()) == [1.0] + [2.0] * 32
    expanded = source.transpose(1, 2) @ out.tokens  # [B, N0, D]: each input position gets its token
    assert (expanded - ref.tokens).abs().max() < 1e-5

    apply_tome(merged, r=[32], prop_attn=False)
    with torch.no_grad():
        assert (merged.encode(images).pooled - ref.pooled).abs().max() > 1e-3


def test_source_bookkeeping_covers_every_patch_once(images):
    model = tiny()
    apply_tome(model, r=(12, -1), trace_source=True)
    with torch.no_grad():
        out = model.encode(images)
    source, size = model._tome_info["source"], model._tome_info["size"]
    assert source.shape == (3, out.tokens.shape[1], PATCHES + 1)
    assert torch.equal(source.sum(1), torch.ones(3, PATCHES + 1))  # each input token in exactly one token
    assert torch.equal(source.sum(-1), size[..., 0])


def test_window_partition_handles_even_and_odd_grids():
    assert [len(w) for w in window_partition((8, 8))] == [16] * 4
    odd = window_partition((7, 7), num_prefix_tokens=1)
    assert [len(w) for w in odd] == [16, 12, 12, 9]
    assert sorted(i for w in odd for i in w) == list(range(1, 50))
    assert odd[1][:4] == [5, 6, 7, 12]  # top-right: columns 4..6 of rows 0..3, after the class token
    assert [len(w) for w in window_partition((1, 5), 0)] == [3, 2]


def test_windowed_matching_on_an_odd_grid_merges_inside_each_window():
    metric = torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(0))
    windows = [torch.tensor(w) for w in window_partition((7, 7), 1)]
    merge, new_windows = windowed_soft_matching(metric, 2, windows, class_token=True)
    source = merge_source(merge, metric)
    assert [len(w) for w in new_windows] == [14, 10, 10, 7] and source.shape == (2, 42, 50)
    for window, tokens in zip(windows, new_windows):
        held = source[:, tokens].sum(1)  # [B, 50]: input tokens the window's tokens hold
        assert torch.equal(held[:, window], torch.ones(2, len(window))) and held.sum() == 2 * len(window)


def test_lgtm_schedule_and_local_merges_never_mix_windows(images):
    model = tiny()
    apply_lgtm(model, r=8, dense_layers=1, local_layers=2, trace_source=True)
    assert model._tome_info["r"] == [0, 8, 8, 8] and model._tome_info["local"] == [False, True, True, False]
    assert merged_token_counts(model) == tokens_per_block(model, images) == [65, 57, 49, 41]

    apply_lgtm(model, r=[8, 8, 8], dense_layers=1, local_layers=2, trace_source=True)  # no global layer
    with torch.no_grad():
        model.encode(images)
    source = model._tome_info["source"][..., 1:]  # [B, N, 64] over the patches
    window_of_patch = torch.zeros(PATCHES, dtype=torch.long)
    for w, positions in enumerate(window_partition((8, 8), 0)):
        window_of_patch[positions] = w
    windows_held = [(source[..., window_of_patch == w].sum(-1) > 0) for w in range(4)]
    assert torch.equal(sum(h.long() for h in windows_held)[:, 1:], torch.ones(3, 48, dtype=torch.long))
    assert torch.equal(source.sum(1), torch.ones(3, PATCHES))


def test_lgtm_rejects_negative_layer_counts():
    with pytest.raises(ValueError, match="dense_layers and local_layers must be >= 0"):
        apply_lgtm(tiny(), r=4, dense_layers=-1)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_encode_contract_on_merged_models(pool, images):
    model = tiny(global_pool=pool)
    apply_lgtm(model, r=8, dense_layers=1, local_layers=1)
    with torch.no_grad():
        out = model.encode(images)
        assert out.tokens.shape == (3, 41, 32) and out.token_mask.all() and out.token_mask.shape == (3, 41)
        assert out.stats["tokens_per_image"] == 41 and out.aux_loss == 0
        assert torch.equal(model.forward_features(images), out.tokens)
        assert torch.allclose(model(images), out.pooled)
    size = model._tome_info["size"]
    if pool == "avg":  # the mean over patches: each merged token weighted by the patches it holds
        expected = (out.tokens[:, 1:] * size[:, 1:]).sum(1) / PATCHES
    else:
        expected = out.tokens[:, 0]
    assert torch.allclose(out.pooled, expected, atol=1e-6)


def test_classification_head_works_on_merged_models(images):
    model = tiny(num_classes=7)
    apply_tome(model, r=8)
    assert model(images).shape == (3, 7)


def test_open_clip_tower_is_patched_in_place(images):
    torch.manual_seed(0)
    clip = open_clip.create_model("PlainViT-Ti-8-64").eval()
    with torch.no_grad():
        ref = clip.encode_image(images)
        trunk = apply_tome(clip, r=0)
        assert trunk is clip.visual.trunk and torch.equal(clip.encode_image(images), ref)
        apply_tome(clip, r=8)  # depth 6: 65 -> 57 -> ... -> 17
        features, out = encode_image(clip, images)
    assert features.shape == ref.shape and out.tokens.shape[1] == merged_token_counts(clip)[-1] == 17
    assert torch.allclose(features, clip.encode_image(images))
    assert (features - ref).abs().max() > 0


def test_dtp_and_non_vits_are_rejected():
    with pytest.raises(TypeError, match="does not apply to DTPViT"):
        apply_tome(tiny("dtp_vit_tiny_patch8_64"), r=4)
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        apply_tome(torch.nn.Linear(2, 2), r=4)


def test_gradient_checkpointing_is_refused_while_merging(images):
    model = tiny().train()
    apply_tome(model, r=4)
    model.set_grad_checkpointing(True)
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        model(images)


def test_macs_count_the_similarity_matmul(images):
    plain, merged = tiny(), tiny()
    apply_tome(merged, r=8)
    assert count_macs(merged, images[:1]).total < count_macs(plain, images[:1]).total
    analysis = FlopCountAnalysis(merged, images[:1])
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_mac_handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    # A @ B^T over keys averaged over heads (head_dim 16) at 65, 57, 49, 41 tokens
    assert analysis.by_operator()["matmul"] == 16 * sum((t + 1) // 2 * (t // 2) for t in (65, 57, 49, 41))


def test_lgtm_on_an_odd_grid_keeps_counts_and_windows():
    """A 7 x 7 patch grid (as ViT-B/32 at 224): windows of 16, 12, 12 and 9 patches."""
    model = tiny(img_size=56)
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    apply_lgtm(model, r=6, dense_layers=1, local_layers=2, trace_source=True)  # 2 per window, then 6
    assert merged_token_counts(model) == tokens_per_block(model, images) == [50, 42, 34, 28]
    source = model._tome_info["source"][..., 1:]
    assert torch.equal(source.sum(1), torch.ones(2, 49))


@pytest.mark.parametrize("method,apply", [("tome", apply_tome), ("lgtm", apply_lgtm)])
def test_named_merging_clip_equals_the_plain_clip_patched(method, apply):
    """`ToMe-ViT-Ti-8-64-r4` holds the plain CLIP's weights, merging as apply_* on the plain CLIP does."""
    prefix = {"tome": "ToMe", "lgtm": "LGTM"}[method]
    named = open_clip.create_model(f"{prefix}-ViT-Ti-8-64-r4")
    plain = open_clip.create_model("PlainViT-Ti-8-64")
    named.load_state_dict(plain.state_dict())  # a plain CLIP checkpoint loads unchanged
    apply(plain, 4)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(named.encode_image(images), plain.encode_image(images))
    assert merged_token_counts(named) == merged_token_counts(plain)
    assert merged_token_counts(named)[-1] < PATCHES + 1


def test_named_merging_encoder_is_its_r():
    assert merged_token_counts(timm.create_model("tome_vit_tiny_patch8_64_r4")) == \
        [PATCHES + 1 - 4 * (i + 1) for i in range(6)]
    with pytest.raises(ValueError, match=r"tome_vit_tiny_patch8_64_r4 is the variant \{'tome_r': 4\}.*build "
                                         r"tome_vit_tiny_patch8_64 with \{'tome_r': 2\}"):
        timm.create_model("tome_vit_tiny_patch8_64_r4", tome_r=2)
    assert merged_token_counts(timm.create_model("tome_vit_tiny_patch8_64", tome_r=2))[-1] == PATCHES + 1 - 12
