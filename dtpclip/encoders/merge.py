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
swaps the classes of the encoder's timm `Block` (to `ToMeBlock`) and `Attention` (to the shared
`HookedAttention`) modules and keeps its state in one dict, `encoder._tome_info`:

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
from timm.models.vision_transformer import Block, VisionTransformer

from dtpclip.encoders.attention import HookedAttention, hook_attention
from dtpclip.encoders.vit import TOKEN_FEATURE_CFG, PlainViT, register_vit_family
from dtpclip.encoders.vit import find_vit as find_any_vit
from dtpclip.registry import register_transform

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

class ToMeBlock(Block):
    """timm's Block with merging between attention and MLP (ToMe), by this block's schedule entry."""

    _tome_info: dict
    _tome_layer: int

    @property
    def merges_tokens(self) -> bool:
        """Whether the patched encoder merges anywhere (then a block's output tokens differ from its input)."""
        return any(self._tome_info["r"])

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

    @property
    def grid_layers(self) -> int:
        """Blocks before the first merge keep the grid."""
        return next((i for i, r in enumerate(self._tome_info["r"][: len(self.blocks)]) if r > 0), len(self.blocks))

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

    @torch.no_grad()
    def token_groups(self, images: torch.Tensor):
        """(merged token holding each patch [B, H, W], None), traced on one forward of `images`."""
        info = self._tome_info
        trace, info["trace_source"] = info["trace_source"], True
        try:
            self.forward_features(images)
        finally:
            info["trace_source"] = trace
        grid = tuple(self.patch_embed.grid_size)
        if info["source"] is None:  # nothing merged: every patch its own token
            return super().token_groups(images)
        patches = info["source"][..., int(info["class_token"]):]  # [B, N, H*W]
        return patches.argmax(1).view(-1, *grid).cpu(), None

    def settings(self) -> dict:
        info = self._tome_info
        return {**super().settings(), "merge_r": list(info["r"]), "local_layers": sum(info["local"])}


_PATCHED_CLASSES: dict = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"ToMe{cls.__name__}", (_ToMeEncoder, cls), {"_tome_base": cls})
    return _PATCHED_CLASSES[cls]


def find_vit(model: nn.Module) -> VisionTransformer:
    """The timm ViT to patch (see `vit.find_vit`); encoders whose contract says `mergeable = False` are refused."""
    vit = find_any_vit(model, "token merging")
    if not getattr(vit, "mergeable", False):
        raise TypeError(f"token merging does not apply to {type(vit).__name__} (its `mergeable` is False: it "
                        "changes its own token set, or its blocks are not timm's); use a plain ViT (plain_vit_*)")
    return vit


def _patch(vit: VisionTransformer) -> dict:
    """Swap the classes (once) and return the shared state dict."""
    if hasattr(vit, "_tome_info"):
        return vit._tome_info
    if vit.num_prefix_tokens != int(vit.cls_token is not None):
        raise NotImplementedError(f"token merging protects the class token only; this ViT has "
                                  f"{vit.num_prefix_tokens} prefix tokens (register / distillation tokens)")
    for i, block in enumerate(vit.blocks):
        if type(block) is not Block or type(block.attn) not in (Attention, HookedAttention):
            raise TypeError(f"token merging patches timm's Block / Attention; block {i} is "
                            f"{type(block).__name__} with {type(block.attn).__name__}")
    info = {"r": [0] * len(vit.blocks), "local": [False] * len(vit.blocks), "size": None, "source": None,
            "windows": None, "class_token": vit.cls_token is not None, "prop_attn": True, "trace_source": False,
            "grid": tuple(vit.patch_embed.grid_size)}
    vit.__class__ = _patched_class(type(vit))
    vit._tome_info = info
    for i, block in enumerate(vit.blocks):
        block.__class__ = ToMeBlock
        hook_attention(block.attn)
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
        block.__class__ = Block
        if not block.attn.quantized:
            block.attn.__class__ = Attention
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


MERGE_METHODS = {"tome": apply_tome, "lgtm": apply_lgtm}


def merging_vit(method: str) -> Callable[..., PlainViT]:
    """A constructor of a plain ViT patched with `method` at `tome_r` (LGTM: and its layer split)."""
    def build(tome_r: RSchedule = 0, dense_layers: int = 2, local_layers: int = 2, **kwargs) -> PlainViT:
        model = PlainViT(**kwargs)
        extra = dict(dense_layers=dense_layers, local_layers=local_layers) if method == "lgtm" else {}
        MERGE_METHODS[method](model, tome_r, **extra)
        return model

    build.__module__ = __name__
    return build


def _apply_tome_transform(model: nn.Module, calibration=None, r: int = 8, prop_attn: bool = True) -> None:
    apply_tome(model, r, prop_attn)


def _apply_lgtm_transform(model: nn.Module, calibration=None, r: int = 8, dense: int = 2, local: int = 2,
                          prop_attn: bool = True) -> None:
    apply_lgtm(model, r, dense, local, prop_attn)


# Named variants hold the plain ViT's weights (a plain CLIP checkpoint loads), patched at build time,
# so timm and open_clip (whose configs can only name a model) build them: `tome_vit_{size}_r{r}`,
# `ToMe-ViT-{tag}-r{r}` at each size's `merge_r`, and `tome_vit_{size}` at any `tome_r` (default 0).
for _method, _clip in (("tome", "ToMe"), ("lgtm", "LGTM")):
    register_vit_family(_method, merging_vit(_method), f"{_method}_vit_{{size}}", f"{_clip}-ViT-{{tag}}",
                        feature_cfg=TOKEN_FEATURE_CFG,
                        variants=lambda size: {"": {}, **{f"r{r}": {"tome_r": r} for r in size.merge_r}})
def _mergeable(encoder: nn.Module) -> bool:
    return getattr(encoder, "mergeable", False)


register_transform("tome", _apply_tome_transform, {"r": 8, "prop_attn": True}, _mergeable, example="tome:r=2",
                   summary="ToMe (Bolya et al. 2023): r merges per block", title="ToMe")
register_transform("lgtm", _apply_lgtm_transform, {"r": 8, "dense": 2, "local": 2, "prop_attn": True}, _mergeable,
                   example="lgtm:r=4,dense=1,local=1",
                   summary="DFE + LGTM (Heo et al. 2023): dense blocks, 2x2-window merges, then global",
                   title="DFE + LGTM")
