"""Token merging for any ViT of the registry, training-free: ToMe, and DFE + LGTM.

ToMe: Bolya et al. 2023, "Token Merging: Your ViT But Faster" (ICLR 2023, arXiv 2210.09461),
reference code github.com/facebookresearch/ToMe (tome/merge.py, tome/patch/timm.py, tome/utils.py).
In every block, after attention and before the MLP, the tokens are split alternately into sets A
and B; each A token's edge goes to its most similar B token (cosine similarity of the attention
keys, averaged over heads); the r best edges are merged (size-weighted average, sizes tracked);
the class token is never merged. Attention then counts a token of size s as s tokens
(proportional attention: log s added to its attention logits).

DFE + LGTM: Heo et al. 2023, "A Fast Training-free Compression Framework for Vision Transformers"
(arXiv 2303.02331; the paper's repository github.com/johnheo/fast-compress-vit has no code).
The first `dense_layers` blocks merge nothing (dense feature extractor); the next `local_layers`
blocks merge locally: the H x W patch grid is split into four windows (2 x 2 quadrants) and
ceil(r / 4) tokens are merged inside each window, so a merged token never spans two windows;
the remaining blocks merge globally with ToMe's r.

Layout, as in ToMe: pure functions that know nothing of timm (`bipartite_soft_matching`,
`windowed_soft_matching`, `merge_wavg`, `merge_source`, `parse_r`), then one patch layer that
swaps the classes of the encoder's timm `Block` and `Attention` modules and keeps its state in
one dict, `encoder._tome_info`:

    r            per-layer merges (after `parse_r`; LGTM: 0 in the dense layers)
    local        per-layer flag: merge inside the four windows (ceil(r / 4) per window)
    size         [B, N, 1] patches each token holds, after the last forward (None: all 1)
    source       [B, N, N0] which of the N0 input tokens (CLS first) each token holds, when
                 `trace_source` (for visualisation and LLaVA); None otherwise
    windows      during a forward with local layers: each window's token positions (LongTensors)
    grid         (H, W) patch grid; class_token, prop_attn, trace_source: the settings

The token order after a merge is ToMe's (unmerged A tokens, then B tokens), not raster order;
`source` says where each token came from. The class token stays first.
"""
import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers.attention import Attention
from timm.models import generate_default_cfgs
from timm.models.vision_transformer import Block, VisionTransformer

from dtpclip.encoders.vit import PlainViT, build_vit_family, default_cfg
from dtpclip.encoders.vit import find_vit as find_any_vit  # merge.find_vit adds the DTP refusal
from dtpclip.registry import CLIP_TAGS, VIT_SIZES, EncoderInfo, register_encoder

RSchedule = Union[int, List[int], Tuple[int, float]]  # see parse_r
MergeFn = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------------------------
# Pure functions (no timm)
# --------------------------------------------------------------------------------------------

def _keep(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    return x


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = True) -> Tuple[MergeFn, MergeFn]:
    """ToMe's bipartite soft matching: (merge, unmerge) closures that remove r tokens.

    metric [B, N, C]: the similarity features (ToMe: attention keys averaged over heads).
    Tokens at even positions form set A, odd positions set B; each A token's edge goes to its
    most similar B token (cosine similarity); the r A tokens with the strongest edges are merged
    into their B tokens. With `class_token`, token 0 (in A) is never merged and stays first.
    r is capped at half the unprotected tokens, as in ToMe. `merge(x, mode)` maps [B, N, C] to
    [B, N - r, C] as (unmerged A tokens, in input order when `class_token`; then all B tokens),
    reducing merged rows with `mode` ('mean', 'sum', 'amax', ...: torch.scatter_reduce);
    `unmerge` maps back, copying each merged token to every position it came from.
    """
    num_tokens = metric.shape[1]
    r = min(r, (num_tokens - int(class_token)) // 2)
    if r <= 0:
        return _keep, _keep

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # [B, Na, Nb] cosine similarities
        if class_token:
            scores[:, 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)  # each A token's best B token
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]  # [B, Na, 1]
        unm_idx = edge_idx[:, r:]  # A tokens kept
        src_idx = edge_idx[:, :r]  # A tokens merged away
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)  # their B tokens
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]  # the class token back to position 0

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        n, t_a, c = src.shape
        unm = src.gather(dim=1, index=unm_idx.expand(n, t_a - r, c))
        src = src.gather(dim=1, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        unm_len = unm_idx.shape[1]
        unm, dst = x[:, :unm_len], x[:, unm_len:]
        n, _, c = unm.shape
        src = dst.gather(dim=1, index=dst_idx.expand(n, r, c))
        out = x.new_zeros(n, num_tokens, c)
        out[:, 1::2] = dst
        out.scatter_(dim=1, index=(2 * unm_idx).expand(n, unm_len, c), src=unm)
        out.scatter_(dim=1, index=(2 * src_idx).expand(n, r, c), src=src)
        return out

    return merge, unmerge


def window_partition(grid_size: Tuple[int, int], num_prefix_tokens: int = 1) -> List[List[int]]:
    """Token positions (raster patch order after the prefix tokens) of the 2 x 2 quadrants.

    LGTM splits the H x W grid into four equal windows. For an odd side the first half takes the
    extra row / column (a 7 x 7 grid gives 4x4, 4x3, 3x4 and 3x3 windows); a side of 1 gives two
    windows instead of four. Windows are listed top-left, top-right, bottom-left, bottom-right.
    """
    height, width = grid_size
    row_halves = [range(0, math.ceil(height / 2)), range(math.ceil(height / 2), height)]
    col_halves = [range(0, math.ceil(width / 2)), range(math.ceil(width / 2), width)]
    windows = [[num_prefix_tokens + i * width + j for i in rows for j in cols]
               for rows in row_halves for cols in col_halves]
    return [w for w in windows if w]


def windowed_soft_matching(metric: torch.Tensor, r: int, windows: Sequence[torch.Tensor],
                           class_token: bool = True) -> Tuple[MergeFn, List[torch.Tensor]]:
    """LGTM's local merging: bipartite soft matching inside each window, r merges per window.

    metric [B, N, C]; windows: LongTensors of token positions (the same for every image), which
    together cover every token but the class token (position 0). Returns `merge` (as from
    `bipartite_soft_matching`; output order: class token, then window 0's tokens, window 1's,
    ...) and the windows of the merged sequence (contiguous ranges). r is capped per window at
    half its tokens, so every image keeps the same count per window.
    """
    prefix = int(class_token)
    if sum(len(w) for w in windows) + prefix != metric.shape[1]:
        raise ValueError(f"windows hold {sum(len(w) for w in windows)} tokens, expected "
                         f"{metric.shape[1] - prefix} (all but the class token)")
    merges, new_windows, start = [], [], prefix
    for idx in windows:
        merge_w, _ = bipartite_soft_matching(metric.index_select(1, idx), r, class_token=False)
        kept = len(idx) - max(0, min(r, len(idx) // 2))
        merges.append((idx, merge_w))
        new_windows.append(torch.arange(start, start + kept, device=idx.device))
        start += kept

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        parts = [x[:, :prefix]] + [merge_w(x.index_select(1, idx), mode) for idx, merge_w in merges]
        return torch.cat(parts, dim=1)

    return merge, new_windows


def merge_wavg(merge: MergeFn, x: torch.Tensor, size: Optional[torch.Tensor] = None):
    """Size-weighted average merge: x [B, N, C], size [B, N, 1] (None: all 1) -> merged x and size."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: MergeFn, x: torch.Tensor, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Track which input tokens each token holds: source [B, N, N0] one-hot rows at the start."""
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device, dtype=x.dtype)[None].expand(n, t, t)
    return merge(source, mode="amax")


def parse_r(num_layers: int, r: RSchedule) -> List[int]:
    """ToMe's r schedule as a per-layer list.

    int: r in every layer. list: r per layer (missing layers 0). tuple (r, inflection): from
    int(r (1 - inflection)) to 2 r - that, linearly over the layers; inflection -1 decreases
    (ToMe's 'decreasing schedule'), 0 is constant, +1 increases; any value in [-1, 1].
    """
    inflection = 0.0
    if isinstance(r, list):
        schedule = [int(v) for v in r]
        if len(schedule) > num_layers:
            raise ValueError(f"r schedule has {len(schedule)} entries for {num_layers} layers")
        schedule += [0] * (num_layers - len(schedule))
    else:
        if isinstance(r, tuple):
            if len(r) != 2:
                raise ValueError(f"an r tuple is (r, inflection), got {r}; give a per-layer schedule as a list")
            r, inflection = r
            if not -1.0 <= inflection <= 1.0:
                raise ValueError(f"r inflection must be in [-1, 1], got {inflection}")
        r = int(r)
        min_val = int(r * (1.0 - inflection))
        max_val = 2 * r - min_val
        step = (max_val - min_val) / (num_layers - 1) if num_layers > 1 else 0.0
        schedule = [int(min_val + step * i) for i in range(num_layers)]
    if any(v < 0 for v in schedule):
        raise ValueError(f"r must be >= 0 in every layer, got {schedule}")
    return schedule


# --------------------------------------------------------------------------------------------
# The timm patch
# --------------------------------------------------------------------------------------------

def _with_log_size(attn_mask: Optional[torch.Tensor], size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Proportional attention as an additive float mask over keys, [B, 1, 1, N], for SDPA."""
    bias = size[..., 0].log()[:, None, None, :].to(dtype)
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask + bias


class ToMeAttention(Attention):
    """timm's Attention plus proportional attention (`size`) and the merge metric.

    The forward is timm 1.0's with two additions: log(size) joins the logits as a float
    `attn_mask` over keys, so the fused SDPA kernel stays in use; with `return_metric` it returns
    (output, keys averaged over heads [B, N, head_dim]) instead of the output alone.
    """

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                size: Optional[torch.Tensor] = None, return_metric: bool = False):
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if size is not None:
            attn_mask = _with_log_size(attn_mask, size, q.dtype)

        if self.fused_attn:
            out = nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if is_causal:
                attn = attn + attn.new_full((N, N), float("-inf")).triu_(1)
            elif attn_mask is not None:
                if attn_mask.dtype == torch.bool:
                    attn_mask = torch.zeros_like(attn_mask, dtype=attn.dtype).masked_fill_(~attn_mask, float("-inf"))
                attn = attn + attn_mask
            out = self.attn_drop(attn.softmax(dim=-1)) @ v

        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            out = out * gate
        out = self.proj_drop(self.proj(out))
        return (out, k.mean(1)) if return_metric else out


class ToMeBlock(Block):
    """timm's Block with merging between attention and MLP (ToMe), by this block's schedule entry."""

    _tome_info: dict
    _tome_layer: int

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        info = self._tome_info
        if self._tome_layer == 0:
            _reset_state(info)
        r = info["r"][self._tome_layer]
        size = info["size"] if info["prop_attn"] else None
        out = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, size=size, return_metric=r > 0)
        x_attn, metric = out if r > 0 else (out, None)
        x = x + self.drop_path1(self.ls1(x_attn))
        if r > 0:
            x = _merge_step(info, self._tome_layer, x, metric)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def _reset_state(info: dict) -> None:
    info["size"] = info["source"] = info["windows"] = None


def _merge_step(info: dict, layer: int, x: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    r, class_token = info["r"][layer], info["class_token"]
    if info["local"][layer]:
        windows = info["windows"]
        if windows is None:  # first local layer: tokens are still in raster order
            expected = int(class_token) + info["grid"][0] * info["grid"][1]
            if x.shape[1] != expected:
                raise ValueError(f"local merging needs the full {info['grid']} patch grid ({expected} tokens), "
                                 f"got {x.shape[1]}: are local layers after global ones?")
            windows = [torch.tensor(w, device=x.device) for w in window_partition(info["grid"], int(class_token))]
        merge, info["windows"] = windowed_soft_matching(metric, math.ceil(r / 4), windows, class_token)
    else:
        merge, _ = bipartite_soft_matching(metric, r, class_token)
    if info["trace_source"]:
        info["source"] = merge_source(merge, x, info["source"])
    x, info["size"] = merge_wavg(merge, x, info["size"])
    return x


class _ToMeEncoder:
    """Mixed in before the encoder's class: size-weighted 'avg' pooling and a token-count stat."""

    _tome_info: dict

    def forward_features(self, *args, **kwargs):
        if self.grad_checkpointing and torch.is_grad_enabled() and any(self._tome_info["r"]):
            raise NotImplementedError("token merging keeps state across blocks; gradient checkpointing "
                                      "would recompute merges on stale state: turn one of them off")
        return super().forward_features(*args, **kwargs)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """'avg' over merged tokens weighs each by its size, i.e. the mean over the patches it holds."""
        pool_type = self.global_pool if pool_type is None else pool_type
        size = self._tome_info["size"]
        if (pool_type == "avg" and size is not None and self.attn_pool is None and not self.pool_include_prefix
                and size.shape[:2] == x.shape[:2]):
            weight = size[:, self.num_prefix_tokens:].to(x.dtype)
            return (x[:, self.num_prefix_tokens:] * weight).sum(1) / weight.sum(1)
        return super().pool(x, pool_type)

    def encode(self, images: torch.Tensor):
        out = super().encode(images)
        out.stats["tokens_per_image"] = torch.tensor(float(out.tokens.shape[1]), device=out.tokens.device)
        return out


_PATCHED_CLASSES: dict = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"ToMe{cls.__name__}", (_ToMeEncoder, cls), {"_tome_base": cls})
    return _PATCHED_CLASSES[cls]


def find_vit(model: nn.Module) -> VisionTransformer:
    """The timm ViT to patch (see `vit.find_vit`); DTP-ViT is refused."""
    from dtpclip.encoders.dtp import DTPViT

    vit = find_any_vit(model, "token merging")
    if isinstance(vit, DTPViT):
        raise TypeError("token merging does not apply to DTP-ViT: it pools its own tokens into variable-length "
                        "segments; use a plain ViT (plain_vit_*)")
    return vit


def _patch(vit: VisionTransformer) -> dict:
    """Swap the classes (once) and return the shared state dict."""
    if hasattr(vit, "_tome_info"):
        return vit._tome_info
    if vit.num_prefix_tokens != int(vit.cls_token is not None):
        raise NotImplementedError(f"token merging protects the class token only; this ViT has "
                                  f"{vit.num_prefix_tokens} prefix tokens (register / distillation tokens)")
    for i, block in enumerate(vit.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise TypeError(f"token merging patches timm's Block / Attention; block {i} is "
                            f"{type(block).__name__} with {type(block.attn).__name__}")
    info = {"r": [0] * len(vit.blocks), "local": [False] * len(vit.blocks), "size": None, "source": None,
            "windows": None, "class_token": vit.cls_token is not None, "prop_attn": True, "trace_source": False,
            "grid": tuple(vit.patch_embed.grid_size)}
    vit.__class__ = _patched_class(type(vit))
    vit._tome_info = info
    for i, block in enumerate(vit.blocks):
        block.__class__ = ToMeBlock
        block.attn.__class__ = ToMeAttention
        block._tome_info, block._tome_layer = info, i
    return info


def apply_tome(model: nn.Module, r: RSchedule = 0, prop_attn: bool = True,
               trace_source: bool = False) -> VisionTransformer:
    """Patch a registry ViT (or a dtpclip CLIP's visual trunk) in place with ToMe; returns the ViT.

    r: merges per block as `parse_r` reads it (an int, a per-layer list, or (r, inflection)).
    r = 0 leaves every output unchanged. prop_attn: proportional attention (ToMe's choice for
    off-the-shelf models). trace_source: keep `_tome_info['source']` after each forward.
    Calling it again (or `apply_lgtm`) reconfigures the same patch.
    """
    vit = find_vit(model)
    info = _patch(vit)
    info.update(r=parse_r(len(vit.blocks), r), local=[False] * len(vit.blocks), prop_attn=prop_attn,
                trace_source=trace_source)
    _reset_state(info)
    return vit


def apply_lgtm(model: nn.Module, r: RSchedule, dense_layers: int = 2, local_layers: int = 2,
               prop_attn: bool = True, trace_source: bool = False) -> VisionTransformer:
    """Patch with DFE + LGTM (Heo et al. 2023): dense, then local (2 x 2 windows), then global merging.

    The r schedule is read as in `apply_tome` over all blocks; the first `dense_layers` blocks
    merge nothing; the next `local_layers` blocks merge ceil(r / 4) tokens inside each window;
    the rest merge r tokens globally. The defaults (2 dense, 2 local) are our choice for 12-block
    ViTs: the paper's text gives no single setting. dense_layers >= depth is the unpatched model.
    """
    if dense_layers < 0 or local_layers < 0:
        raise ValueError(f"dense_layers and local_layers must be >= 0, got {dense_layers}, {local_layers}")
    vit = apply_tome(model, r, prop_attn, trace_source)
    info = vit._tome_info
    depth = len(vit.blocks)
    info["r"] = [0 if i < dense_layers else v for i, v in enumerate(info["r"])]
    info["local"] = [dense_layers <= i < dense_layers + local_layers for i in range(depth)]
    return vit


def remove_tome(model: nn.Module) -> VisionTransformer:
    """Undo the patch: the original classes back, the state dict gone."""
    vit = find_vit(model)
    if not hasattr(vit, "_tome_info"):
        return vit
    vit.__class__ = vit._tome_base
    del vit._tome_info
    for block in vit.blocks:
        block.__class__, block.attn.__class__ = Block, Attention
        del block._tome_info, block._tome_layer
    return vit


def merged_token_counts(model: nn.Module) -> List[int]:
    """Tokens after each block under the configured schedule (class token included), without running it."""
    vit = find_vit(model)
    info = vit._tome_info
    prefix = int(info["class_token"])
    tokens, windows, counts = prefix + info["grid"][0] * info["grid"][1], None, []
    for r, local in zip(info["r"], info["local"]):
        if r > 0 and local:
            windows = windows or [len(w) for w in window_partition(info["grid"], prefix)]
            per_window = math.ceil(r / 4)
            windows = [n - min(per_window, n // 2) for n in windows]
            tokens = prefix + sum(windows)
        elif r > 0:
            tokens -= max(0, min(r, (tokens - prefix) // 2))
        counts.append(tokens)
    return counts


# Named merging variants, so timm and open_clip (a config can only name a model) build them:
# `tome_vit_{size}_r{r}` / `lgtm_vit_{size}_r{r}`, open_clip `ToMe-ViT-{tag}-r{r}` / `LGTM-ViT-{tag}-r{r}`.
# They hold the plain ViT's weights (a plain CLIP checkpoint loads), patched at build time; the
# `tome_r` kwarg overrides r. The r values: ToMe's headline settings (B/16 r=13, L/14 r=8) and
# about half the FLOPs for each size (the profiler's `--tome-r` sweeps any other r).
MERGE_R = {
    "tiny_patch16_64": (1, 2), "tiny_patch8_64": (4, 8), "small_patch16_224": (13,), "base_patch32_224": (2, 3),
    "base_patch16_224": (8, 13, 16), "large_patch14_224": (8,),
}
MERGE_METHODS = {"tome": ("ToMe", apply_tome), "lgtm": ("LGTM", apply_lgtm)}


def _build_merging_vit(method: str, variant: str, size: str, r: int, pretrained: bool = False, **kwargs):
    tome_r = kwargs.pop("tome_r", r)
    model = build_vit_family(PlainViT, variant, size, pretrained, **kwargs)
    MERGE_METHODS[method][1](model, tome_r)
    return model


def _register_merging(method: str, size: str, r: int) -> None:
    name = f"{method}_vit_{size}_r{r}"
    register_encoder(
        lambda pretrained=False, **kwargs: _build_merging_vit(method, name, size, r, pretrained, **kwargs),
        EncoderInfo(name=name, family=method, size=size,
                    clip_name=f"{MERGE_METHODS[method][0]}-ViT-{CLIP_TAGS[size]}-r{r}"),
    )


default_cfgs = generate_default_cfgs({
    f"{method}_vit_{size}_r{r}": default_cfg(size) for method in MERGE_METHODS for size in VIT_SIZES
    for r in MERGE_R[size]
})
for _method in MERGE_METHODS:
    for _size in VIT_SIZES:
        for _r in MERGE_R[_size]:
            _register_merging(_method, _size, _r)
