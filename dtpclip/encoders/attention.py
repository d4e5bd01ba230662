"""One attention forward for every in-place transform: timm's Attention plus the hooks they need.

Token merging (ToMe) adds proportional attention (log of each key's size joins the logits) and
reads the keys as its merge metric; quantization (LSQ, RepQ-style PTQ) fake-quantizes q, k, v and
the post-softmax probabilities. Both patch a block's attention by swapping its class to
`HookedAttention` (same parameters, same state-dict names), so they stack in either order.
Without attention quantizers the fused SDPA kernel stays in use.

A mask may also be an object that computes attention itself: anything with a method
`attention(q, k, v, dropout_p, dense)` ([B, H, N, hd] in and out; `dense(q, k, v)` is this module's
explicit attention when it must be used, else None). varlen.py's `VarlenBatch` (variable-length
runs) and DynamicViT's keep policy are such masks; timm's blocks hand them on unchanged.
"""
from typing import Optional

import torch
import torch.nn as nn
from timm.layers.attention import Attention


def as_additive_mask(attn_mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A boolean keep-mask as 0 / -inf (SDPA's additive form); float masks pass through."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros_like(attn_mask, dtype=dtype).masked_fill_(~attn_mask, float("-inf"))


def with_log_size(attn_mask: Optional[torch.Tensor], size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Proportional attention as an additive float mask over keys, [B, 1, 1, N]."""
    bias = size[..., 0].log()[:, None, None, :].to(dtype)
    return bias if attn_mask is None else as_additive_mask(attn_mask, dtype) + bias


class HookedAttention(Attention):
    """timm's Attention (1.0) with optional hooks; see the module docstring.

    forward(x, attn_mask, is_causal, size=None, return_metric=False): `size` [B, N, 1] switches on
    proportional attention; `return_metric` also returns the keys averaged over heads [B, N, head_dim].
    Quantizers, when set as attributes (`q_quant`, `k_quant`, `v_quant`, `attn_quant`), apply in an
    explicit attention computation.
    """

    @property
    def quantized(self) -> bool:
        return "attn_quant" in self._modules

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                size: Optional[torch.Tensor] = None, return_metric: bool = False):
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = self._attend(q, k, v, attn_mask, is_causal, size)
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            out = out * gate
        out = self.proj_drop(self.proj(out))
        return (out, k.mean(1)) if return_metric else out

    def _attend(self, q, k, v, attn_mask, is_causal, size):
        fused = not self.quantized and self.fused_attn
        dropout_p = self.attn_drop.p if self.training else 0.0
        if callable(getattr(attn_mask, "attention", None)):
            return attn_mask.attention(q, k, v, dropout_p, None if fused else self._explicit_attention)
        if size is not None:
            attn_mask = with_log_size(attn_mask, size, q.dtype)
        if fused:
            return nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
        return self._explicit_attention(q, k, v, attn_mask, is_causal)

    def _explicit_attention(self, q, k, v, attn_mask=None, is_causal=False):
        quantized = self.quantized
        if quantized:
            if is_causal:
                raise NotImplementedError("quantized attention is bidirectional (ViT); is_causal=True is not supported")
            q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if is_causal:
            attn = attn + attn.new_full(attn.shape[-2:], float("-inf")).triu_(1)
        elif attn_mask is not None:
            attn = attn + as_additive_mask(attn_mask, attn.dtype)
        attn = attn.softmax(dim=-1)
        if quantized:
            attn = self.attn_quant(attn)
        return self.attn_drop(attn) @ v


def hook_attention(attn: nn.Module) -> HookedAttention:
    """Swap a timm Attention module's class for `HookedAttention` in place (once); others are refused."""
    if type(attn) is Attention:
        attn.__class__ = HookedAttention
    elif not isinstance(attn, HookedAttention):
        raise TypeError(f"in-place transforms patch timm's Attention; got {type(attn).__name__}")
    return attn
