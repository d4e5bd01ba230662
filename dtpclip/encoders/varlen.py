"""Variable-length attention: sequences of different lengths, no mask and no work across sequences.

After DTP pools, each image keeps its own number of tokens. `VarlenBatch` lays the real tokens of
a padded batch [B, N, D] out as one flat run [1, T, D], images ordered by length, so every
per-token layer (norms, MLP, qkv) costs what the real tokens cost and timm's unmodified blocks run
on it. Attention (`VarlenBatch.attention`, reached through `HookedAttention`) then costs
sum(n_i^2), never rows x C^2:

- CUDA, fp16/bf16: one FlashAttention varlen call on the whole run (PyTorch's `varlen_attn`, with
  cu_seqlens): no mask, no padding, no cross-image pairs. Chosen over nested jagged tensors, which
  reach the same kernel through a tensor subclass (more overhead, weaker `torch.compile` support),
  and over FlexAttention, whose default 128-token blocks skip no block of this layout (the issue's
  analysis); `benchmarks/gpu_suite.py` measures the choice against the bucket path where a GPU is lent.
- Everywhere else (CPU, fp32, attention dropout, quantized or explicit attention): length buckets.
  Images of one length are contiguous, so each distinct length is one dense [b, H, n, hd] SDPA call
  on views of the run, without a mask (on CUDA, Flash accepts it). `benchmarks/varlen_attention.py`
  on this 2-core CPU, B/16 4x batch of 256 (fp32, fwd+bwd of one attention call): 621 ms against
  788 ms padded with a key mask; the block-diagonal packed rows this replaced computed 3.85x the
  scores needed (1.80x padded, 1.00x buckets). In a one-off comparison at batch 32 the packed rows
  took 2.5x the buckets' time at B/16 4x, one SDPA per image 1.0-2.1x, nested jagged SDPA 4-10x.

Planning costs one host sync: the lengths, which the caller reads once per forward and passes in.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

try:  # PyTorch >= 2.10 ships FlashAttention varlen; older versions run the bucket path everywhere
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

FLASH_DTYPES = (torch.float16, torch.bfloat16)

# Dense attention on one bucket [b, H, n, hd] (q, k, v) -> out, with no mask.
DenseAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class VarlenBatch:
    """Where each real token of a padded batch [B, N, D] sits in the flat run [1, T, D]."""

    source: torch.Tensor  # [T] flat index into the padded batch (b * N + n), images ordered by length
    cu_seqlens: torch.Tensor  # [B + 1] int32 start of each image in the run (in run order)
    buckets: Tuple[Tuple[int, int], ...]  # (images, length) per distinct length, in run order
    max_len: int

    @classmethod
    @torch.compiler.disable  # host-side planning: compiled code calls it as a function and keeps its graphs
    def plan(cls, lengths: torch.Tensor, host_lengths: list, seq_len: int) -> "VarlenBatch":
        """lengths [B] (on the batch's device) and the same as a list: real tokens of each image, at the front
        of its padded row of `seq_len`. Everything device-side is derived from `lengths`, so no further sync."""
        device = lengths.device
        order = torch.argsort(lengths, stable=True)
        ordered = lengths[order]
        total = sum(host_lengths)
        cu_seqlens = F.pad(torch.cumsum(ordered, 0), (1, 0)).to(torch.int32)
        slot = torch.repeat_interleave(torch.arange(len(host_lengths), device=device), ordered, output_size=total)
        rank = torch.arange(total, device=device) - cu_seqlens[:-1].long()[slot]
        source = order[slot] * seq_len + rank
        buckets = {}
        for length in sorted(host_lengths):  # the same stable order as the argsort
            buckets[length] = buckets.get(length, 0) + 1
        return cls(source, cu_seqlens, tuple((count, length) for length, count in buckets.items()),
                   max(host_lengths))

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [1, T, D]: the real tokens only."""
        return padded.reshape(-1, padded.shape[-1])[self.source].unsqueeze(0)

    def unpack(self, flat: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
        """[1, T, D] -> [B, N, D] with zeros at padded positions."""
        padded = flat.new_zeros(batch * seq_len, flat.shape[-1])
        return padded.index_copy(0, self.source, flat[0]).view(batch, seq_len, -1)

    def uses_flash(self, q: torch.Tensor, dropout_p: float) -> bool:
        return (varlen_attn is not None and q.is_cuda and q.dtype in FLASH_DTYPES and dropout_p == 0.0
                and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                  dense: Optional[DenseAttention] = None) -> torch.Tensor:
        """q, k, v [1, H, T, hd] -> [1, H, T, hd], each image attending to itself only.

        `dense` replaces SDPA on each bucket (explicit or quantized attention); without it, the fused kernels run.
        """
        if dense is None and self.uses_flash(q, dropout_p):
            heads_first = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]  # [T, H, hd], as the kernel reads
            out = varlen_attn(*heads_first, self.cu_seqlens, self.cu_seqlens, self.max_len, self.max_len)
            return out.transpose(0, 1).unsqueeze(0)
        return self._bucket_attention(q, k, v, dropout_p, dense)

    @torch.compiler.disable  # a loop over this batch's lengths: traced, every new batch would recompile
    def _bucket_attention(self, q, k, v, dropout_p, dense):
        if dense is None:
            def dense(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        heads, _, head_dim = q.shape[1:]
        sizes = [images * length for images, length in self.buckets]
        outs = []  # split, not slices: its backward is one concatenation, not a full-size gradient per bucket
        for (images, length), *bucket in zip(self.buckets, *(t[0].split(sizes, dim=1) for t in (q, k, v))):
            bucket = [t.view(heads, images, length, head_dim).transpose(0, 1) for t in bucket]
            outs.append(dense(*bucket).transpose(0, 1).reshape(heads, images * length, head_dim))
        return torch.cat(outs, dim=1).unsqueeze(0)
