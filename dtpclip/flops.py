"""MAC counting with fvcore, fused attention included (1 MAC = 1 FLOP, as fvcore counts).

fvcore traces the model and counts ops it has handles for; it has none for fused attention
(`scaled_dot_product_attention`, which timm's Attention calls), so that op is added here. The
DRIP / DTP-ViT runs counted open_clip's nn.MultiheadAttention, whose fused fast path fvcore also
skips: their figures leave out the whole attention module (qkv, attention, out-projection).
`MacCount.attention_free` reproduces that figure so readers can compare. fvcore alone (as timm's and
the VQ-ViT seed's validate.py use it) leaves out only the attention matmuls: `without_attention_matmuls`.
"""
import math
import re
import warnings
from dataclasses import dataclass

import torch

with warnings.catch_warnings():  # fvcore's focal loss calls the deprecated torch.jit.script when imported
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

ATTENTION_MODULE = re.compile(r"(.*\.)?blocks\.\d+\.attn")


def sdpa_mac_handle(inputs, outputs) -> int:
    """MACs of softmax(q k^T) v: q [.., Lq, d], k [.., Lk, d], v [.., Lk, dv] -> Lq Lk (d + dv) per head."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


@dataclass
class MacCount:
    total: float  # MACs per image, attention included
    attention: float  # MACs per image inside the blocks' attention modules
    attention_matmuls: float = 0.0  # MACs per image of softmax(q k^T) v itself

    @property
    def attention_free(self) -> float:
        """The figure fvcore gives when it misses the attention modules (DRIP's GFLOPs column)."""
        return self.total - self.attention

    @property
    def without_attention_matmuls(self) -> float:
        """The figure fvcore gives without a handle for fused attention (timm's, the VQ-ViT seed's)."""
        return self.total - self.attention_matmuls


@torch.no_grad()
def count_macs(model: torch.nn.Module, images: torch.Tensor) -> MacCount:
    """MACs per image, averaged over `images` traced one at a time.

    One image per trace: a model whose token count varies per image (DTP) is counted on its actual
    tokens, not on a batch padded to the longest image.
    """
    total = attention = matmuls = 0.0
    for image in images:
        analysis = FlopCountAnalysis(model, image.unsqueeze(0))
        analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_mac_handle)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total += analysis.total()
        attention += sum(v for name, v in analysis.by_module().items() if ATTENTION_MODULE.fullmatch(name))
        matmuls += analysis.by_operator().get("scaled_dot_product_attention", 0)
    return MacCount(total / len(images), attention / len(images), matmuls / len(images))
