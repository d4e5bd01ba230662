"""VQ-ViT: finite-scalar-quantized tokens, and token-wise reparametrization for inference.

After "VQ-ViT: Accelerating Vision Transformer via Token-wise Reparametrization" (its timm code,
`vision_transformer_vq.py`, quantizer type "tfsq"): FSQ (Mentzer et al. 2023, "Finite Scalar
Quantization: VQ-VAE Made Simple") with a learned temperature per code dimension. Blocks alternate:

  even (MSA + VQ-FFN):  x = x + attn(norm1(x));  x = x + mlp(norm2(VQ(x)))
  odd  (VQ-MSA + FFN):  q, k, v = qkv(norm1(VQ1(x)));  x = x + proj(VQ2(attention));  x = x + mlp(norm2(x))

Every quantized input takes one of prod(levels) values, so whatever a Linear/LayerNorm/MLP computes
from it is a table lookup: `reparameterize()` replaces those layers by nn.Embedding tables.
"""
import math
from functools import partial
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from dtpclip.encoders.output import EncoderOutput
from dtpclip.encoders.vit import PlainViT, find_vit, register_vit_family
from dtpclip.registry import register_transform

DEFAULT_LEVELS = (3, 3, 3, 3)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in value, identity in gradient (straight-through estimator)."""
    return x + (x.round() - x).detach()


class FSQuantizer(nn.Module):
    """FSQ with a learned per-dimension temperature ("tfsq"): D -> d scalars on a fixed grid -> D.

    z = compress(x) [.., d]; T = softplus(T_raw);
    bounded = tanh(z / T + atanh(offset / half_l)) * half_l - offset, half_l = (L - 1)(1 + eps) / 2,
    offset = 0.5 for even L, 0 for odd (so even L gets L grid points, as in FSQ);
    codes = round_ste(bounded) / floor(L / 2) * T;  out = expand(codes);  dict loss mean((z - sg(codes))^2).
    At T = 1 the grid and the code indices are FSQ's (vector-quantize-pytorch's `FSQ`).
    After `reparameterize()` T is a fixed buffer and `expand` is gone (its consumers became tables).
    """

    def __init__(self, dim: int, levels: Sequence[int] = DEFAULT_LEVELS, T_init: float = -1.0, eps: float = 1e-3):
        super().__init__()
        levels = [int(level) for level in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be a non-empty list of ints >= 2, got {levels}")
        self.levels_list = levels
        self.compress = nn.Linear(dim, len(levels))
        self.expand = nn.Linear(len(levels), dim)
        self.T_raw = nn.Parameter(torch.full((len(levels),), float(T_init)))
        level = torch.tensor(levels, dtype=torch.int32)
        half_l = (level - 1) * (1 + eps) / 2
        offset = torch.where(level % 2 == 0, 0.5, 0.0)
        for name, value in dict(half_l=half_l, offset=offset, shift=torch.atanh(offset / half_l),
                                half_width=level // 2, levels=level,
                                basis=torch.cumprod(torch.tensor([1] + levels[:-1]), 0)).items():
            self.register_buffer(name, value, persistent=False)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels_list)

    def temperature(self) -> torch.Tensor:
        return F.softplus(self.T_raw) if self.T_raw is not None else self.T

    def quantize(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """z [.., d] (compressed) -> (codes [.., d], straight-through gradient; indices [..] in [0, prod(levels)))."""
        T = self.temperature()
        bounded = torch.tanh(z.float() / T + self.shift) * self.half_l - self.offset
        rounded = round_ste(bounded)
        indices = ((rounded.detach().round().long() + self.half_width) * self.basis).sum(-1)
        return (rounded / self.half_width * T).to(z.dtype), indices

    def codebook(self) -> torch.Tensor:
        """The implicit codebook [prod(levels), d]: codes of every index, in index order."""
        index = torch.arange(self.codebook_size, device=self.basis.device)
        level_index = (index[:, None] // self.basis) % self.levels
        return (level_index - self.half_width) / self.half_width * self.temperature()

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [.., D] -> (codes [.., d], indices [..], dict loss)."""
        z = self.compress(x)
        codes, indices = self.quantize(z)
        return codes, indices, (z.float() - codes.detach().float()).square().mean()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [.., D] -> (quantized x [.., D], indices [..], dict loss)."""
        codes, indices, loss = self.encode(x)
        return self.expand(codes), indices, loss

    def usage(self, indices: torch.Tensor) -> torch.Tensor:
        """Fraction of the codebook the batch used (no host sync)."""
        used = torch.zeros(self.codebook_size, device=indices.device)
        return used.index_fill_(0, indices.flatten(), 1.0).mean()

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Freeze T into a buffer and drop `expand` (the caller has folded it into tables)."""
        T = F.softplus(self.T_raw).detach()
        self.T_raw = None
        self.register_buffer("T", T)
        del self.expand


def _table(rows: torch.Tensor) -> nn.Embedding:
    return nn.Embedding.from_pretrained(rows.detach().clone(), freeze=False)


class VQBlock(Block):
    """A timm Block that records its dict loss and codebook usage of the last forward (read by VQViT)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.attn.q_norm, nn.Identity) or not isinstance(self.attn.norm, nn.Identity) \
                or self.attn.gate is not None:
            raise ValueError("VQ-ViT blocks take plain attention (qk_norm, scale_attn_norm and gating off)")
        self.dict_loss = self.code_usage = None
        self.reparameterized = False


class VQFFNBlock(VQBlock):
    """Even block: MSA, then the FFN on the quantized residual stream (the residual add is unquantized)."""

    def __init__(self, *args, levels=DEFAULT_LEVELS, T_init=-1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.vq = FSQuantizer(self.norm1.normalized_shape[0], levels, T_init)

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        if self.reparameterized:
            _, indices, self.dict_loss = self.vq.encode(x)
            ffn = self.mlp_table(indices)
        else:
            xq, indices, self.dict_loss = self.vq(x)
            ffn = self.mlp(self.norm2(xq))
        self.code_usage = self.vq.usage(indices)
        return x + self.drop_path2(self.ls2(ffn))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """mlp(norm2(expand(code))) for every code -> `mlp_table`."""
        self.mlp_table = _table(self.mlp(self.norm2(self.vq.expand(self.vq.codebook()))))
        del self.norm2, self.mlp
        self.vq.reparameterize()
        self.reparameterized = True


class VQMSABlock(VQBlock):
    """Odd block: q, k, v from the quantized input, the attention output quantized before proj; plain FFN."""

    def __init__(self, *args, levels=DEFAULT_LEVELS, T_init=-1.0, **kwargs):
        super().__init__(*args, **kwargs)
        dim = self.norm1.normalized_shape[0]
        self.vq1 = FSQuantizer(dim, levels, T_init)
        self.vq2 = FSQuantizer(self.attn.attn_dim, levels, T_init)

    def _attention(self, x, attn_mask, is_causal):
        attn = self.attn
        B, N, _ = x.shape
        if self.reparameterized:  # q already carries the attention scale
            _, idx1, loss1 = self.vq1.encode(x)
            qkv, scale = self.qkv_table(idx1), 1.0
        else:
            xq, idx1, loss1 = self.vq1(x)
            qkv, scale = attn.qkv(self.norm1(xq)), attn.scale
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                             dropout_p=attn.attn_drop.p if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, N, attn.attn_dim)
        if self.reparameterized:
            _, idx2, loss2 = self.vq2.encode(out)
            out = self.proj_table(idx2)
        else:
            out, idx2, loss2 = self.vq2(out)
            out = attn.proj(out)
        self.dict_loss = (loss1 + loss2) / 2
        self.code_usage = (self.vq1.usage(idx1) + self.vq2.usage(idx2)) / 2
        return attn.proj_drop(out)

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.drop_path1(self.ls1(self._attention(x, attn_mask, is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """qkv(norm1(expand1(code))) with q pre-scaled -> `qkv_table`; proj(expand2(code)) -> `proj_table`."""
        attn = self.attn
        qkv = attn.qkv(self.norm1(self.vq1.expand(self.vq1.codebook())))
        qkv[:, : attn.attn_dim] *= attn.scale
        self.qkv_table = _table(qkv)
        self.proj_table = _table(attn.proj(self.vq2.expand(self.vq2.codebook())))
        del self.norm1, attn.qkv, attn.proj
        self.vq1.reparameterize()
        self.vq2.reparameterize()
        self.reparameterized = True


def vq_block(*args, depth: int = 0, levels=DEFAULT_LEVELS, T_init=-1.0, **kwargs) -> VQBlock:
    """timm `block_fn`: block `depth` (its index) is a VQ-FFN block when even, a VQ-MSA block when odd."""
    block_cls = VQFFNBlock if depth % 2 == 0 else VQMSABlock
    return block_cls(*args, depth=depth, levels=levels, T_init=T_init, **kwargs)


class VQViT(PlainViT):
    """ViT with FSQ-quantized token streams; `encode`'s aux_loss is the summed dict loss of all blocks.

    levels: FSQ levels per code dimension (d = len(levels); [3, 3, 3, 3] = 81 codes).
    fsq_Tinit: initial T_raw (T = softplus(T_raw)), the seed's `fsq_Tinit`.
    Attention, norms and MLPs keep the plain ViT's names, so plain ViT and CLIP weights load; only
    the quantizers start fresh.
    """

    mergeable = False  # its blocks are VQ blocks, not timm's
    has_aux_loss = True  # the FSQ dict loss
    quantizable = False  # its blocks compute attention themselves, past the quantization hooks

    def __init__(self, levels: Sequence[int] = DEFAULT_LEVELS, fsq_Tinit: float = -1.0, **kwargs):
        super().__init__(block_fn=partial(vq_block, levels=tuple(levels), T_init=fsq_Tinit), **kwargs)
        self.fresh_parameter_prefixes = tuple(f"blocks.{i}.vq" for i in range(len(self.blocks)))

    @property
    def reparameterized(self) -> bool:
        return all(block.reparameterized for block in self.blocks)

    @torch.no_grad()
    def reparameterize(self) -> "VQViT":
        """Token-wise reparametrization (the seed's `--reparam`): quantized-input layers become tables.

        Outputs are unchanged (in eval mode); parameters drop to the tables' size. Irreversible.
        """
        if self.reparameterized:
            raise ValueError("this VQ-ViT is already reparameterized")
        for block in self.blocks:
            block.reparameterize()
        return self

    def settings(self) -> dict:
        return {"levels": list(self.blocks[0].vq.levels_list)}

    def encode(self, images) -> EncoderOutput:
        tokens = self.forward_features(images)
        out = EncoderOutput.dense(tokens, self.forward_head(tokens, pre_logits=True))
        out.aux_loss = torch.stack([block.dict_loss for block in self.blocks]).sum()
        out.stats = {"dict_loss": out.aux_loss.detach(),
                     "codebook_usage": torch.stack([block.code_usage for block in self.blocks]).mean()}
        return out


def _apply_reparameterize(model: nn.Module, calibration=None) -> None:
    vit = find_vit(model, "reparam")
    if not isinstance(vit, VQViT):
        raise TypeError(f"reparam applies to VQ-ViT encoders (vqvit_*), got {type(vit).__name__}")
    vit.reparameterize()


register_vit_family("vq", VQViT, "vqvit_{size}", "VQ-ViT-{tag}")
register_transform("reparam", _apply_reparameterize, {}, lambda encoder: isinstance(encoder, VQViT),
                   example="reparam", title="VQ-ViT reparameterization",
                   summary="VQ-ViT's token-wise reparametrization: quantized-input layers become lookup tables")
