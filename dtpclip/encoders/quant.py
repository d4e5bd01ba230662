"""Low-bit fake quantization of registry ViTs: LSQ quantization-aware training and the shared patch layer.

LSQ: Esser et al. 2020, "Learned Step Size Quantization" (ICLR 2020, arXiv 1902.08153). A value v
is quantized as v_hat = round(clamp(v / s, -Qn, Qp)) * s with a learned step s; the rounding
passes gradients straight through, so ds follows the paper's Eq. 3 (-v/s + round(v/s) inside the
range, -Qn or Qp outside), times the gradient scale g = 1 / sqrt(N * Qp): N is the weight's number
of elements, and for activations the paper's N_F, the features of one example (tokens x channels
entering a Linear; heads x tokens x head_dim for q, k, v), or with `grad_scale='lsq-net'` the whole
batch's elements as zhutmost/lsq-net computes it. (DTP's flat runs hold a batch's tokens in one
row, so there N_F is the batch's.) s starts at
2 * mean(|v|) / sqrt(Qp) on the first batch it sees. LSQ+ (Bhalgat et al. 2020, arXiv 2004.09576)
adds a learned offset beta to activations: v_hat = round(clamp((v - beta) / s, -Qn, Qp)) * s + beta,
with its initialisation (Sec. 3.3): activations' (s, beta) of least MSE on the first batch (searched
here over clipping ranges between percentiles, `MSE_CLIP_PERCENTILES`), weights symmetric without an
offset, s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1). Reference implementations read: the paper's pseudo-code (its
Fig. 2), github.com/zhutmost/lsq-net.

The patch layer (ToMe style: swap module classes in place, keep the encoder's weights and names):
every `nn.Linear` inside the transformer blocks becomes a `QuantLinear` (weights + input
activations quantized), and with scope 'linear+attn' every attention module (the shared
`HookedAttention`) also quantizes q, k, v and the post-softmax probabilities (unsigned, with the
symmetric scheme's level count: at 2 bits (0, 1, 2), which the summary seed found better than
(-1, 0, 1) for attention). The patch embedding (first layer), DTP's boundary predictor, the final
norm and the head / CLIP projection (last layer) stay in float, as is conventional (LSQ keeps
first and last layers at 8 bits; float is the stricter-accuracy choice and the one the PTQ
literature, RepQ-ViT included, reports). The same patch covers PlainViT, ViT-Lite, DTP-ViT (its
padded and varlen paths run the same blocks) and ToMe-patched ViTs (apply ToMe first).
`dtpclip.encoders.ptq` reuses this layer with RepQ-style post-training quantizers.
"""
import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from dtpclip.encoders.attention import hook_attention
from dtpclip.specs import LSQ_GRAD_SCALES as GRAD_SCALES, QUANT_SCOPES
from dtpclip.encoders.vit import find_vit



def round_pass(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x forward, its gradient times `scale` backward (LSQ's g)."""
    return (x - x * scale).detach() + x * scale


MAX_BITS = 16  # fake quantization in float32 stays exact up to here


def check_bits(bits, what: str = "bit width") -> int:
    """`bits` if it is an integer in [2, MAX_BITS]; a ValueError naming `what` otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer in [2, {MAX_BITS}], got {bits!r}")
    return bits


def quant_range(bits: int, signed: bool, symmetric: bool = True) -> Tuple[int, int]:
    """(Qn, Qp): signed symmetric [-(2^(b-1) - 1), 2^(b-1) - 1] (2 bits: ternary {-1, 0, 1}),
    signed asymmetric [-2^(b-1), 2^(b-1) - 1] (the LSQ paper's); unsigned symmetric: the same 2^b - 1
    levels from 0, [0, 2^b - 2] (2 bits: (0, 1, 2), the attention levels the ViT-Lite study found better
    than (-1, 0, 1)); unsigned asymmetric [0, 2^b - 1]."""
    check_bits(bits)
    if not signed:
        return 0, 2 ** bits - (2 if symmetric else 1)
    half = 2 ** (bits - 1)
    return (half - 1 if symmetric else half), half - 1


MSE_CLIP_PERCENTILES = (0.0, 1e-4, 1e-3, 1e-2, 0.02, 0.05, 0.1)  # cut from each end in LSQ+'s MSE search
INITS = ("lsq", "3sigma")  # LSQ's 2 mean|v| / sqrt(Qp); LSQ+'s weight rule (learned offsets: least MSE)


@torch.no_grad()
def least_mse_step_offset(v: torch.Tensor, qn: int, qp: int):
    """LSQ+'s activation initialisation: (s, beta) of least quantization MSE on v, among the clipping ranges
    [quantile(p), quantile(1 - q)] for p, q in MSE_CLIP_PERCENTILES."""
    v = v.detach().float().flatten()
    if v.numel() > 1 << 20:  # a seeded sample: torch.quantile's input limit, and cheaper
        v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:1 << 20].to(v.device)]
    cuts = torch.tensor(MSE_CLIP_PERCENTILES, device=v.device)
    lows, highs = torch.quantile(v, cuts), torch.quantile(v, 1.0 - cuts)
    best = None
    for low in lows:
        for high in highs:
            step = ((high - low) / (qn + qp)).clamp_min(1e-8)
            offset = low + qn * step
            error = (torch.round(((v - offset) / step).clamp(-qn, qp)) * step + offset - v).square().mean()
            if best is None or error < best[0]:
                best = (error, step, offset)
    return best[1], best[2]


class LSQQuantizer(nn.Module):
    """Per-tensor LSQ (or LSQ+ with `learned_offset`) fake quantizer; see the module docstring.

    activation: N of g = 1 / sqrt(N * Qp) counts one example's elements ('paper') or the batch's
    ('lsq-net'); for weights N is their number of elements either way. init (without a learned offset):
    'lsq' or LSQ+'s weight rule '3sigma'.
    """

    def __init__(self, bits: int, signed: bool = True, symmetric: bool = True, learned_offset: bool = False,
                 activation: bool = False, grad_scale: str = "paper", init: str = "lsq"):
        super().__init__()
        if grad_scale not in GRAD_SCALES:
            raise ValueError(f"LSQ grad_scale must be one of {GRAD_SCALES}, got {grad_scale!r}")
        if init not in INITS:
            raise ValueError(f"LSQ init must be one of {INITS}, got {init!r}")
        self.init = init
        self.bits, self.signed, self.symmetric, self.learned_offset = bits, signed, symmetric, learned_offset
        self.qn, self.qp = quant_range(bits, signed, symmetric)
        self.activation, self.grad_scale = activation, grad_scale
        self.step = nn.Parameter(torch.tensor(1.0))
        self.offset = nn.Parameter(torch.tensor(0.0)) if learned_offset else None
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, v: torch.Tensor) -> None:
        """LSQ: s = 2 mean|v| / sqrt(Qp); LSQ+ (see the module docstring): least-MSE (s, beta) or the 3 sigma rule."""
        if self.learned_offset:
            step, offset = least_mse_step_offset(v, self.qn, self.qp)
            self.offset.copy_(offset)
        elif self.init == "3sigma":
            mean, std = v.mean(), v.std()
            step = (torch.maximum((mean - 3 * std).abs(), (mean + 3 * std).abs()) / 2 ** (self.bits - 1)).clamp_min(1e-8)
        else:
            step = (2 * v.abs().mean() / math.sqrt(self.qp)).clamp_min(1e-8)
        self.step.copy_(step)
        self.initialized.fill_(True)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self.initialize(v)
        n = v[0].numel() if self.activation and self.grad_scale == "paper" and v.dim() > 1 else v.numel()
        s = grad_scale(self.step, 1.0 / math.sqrt(n * self.qp))
        beta = 0.0 if self.offset is None else grad_scale(self.offset, 1.0 / math.sqrt(n * self.qp))
        return round_pass(((v - beta) / s).clamp(-self.qn, self.qp)) * s + beta

    def extra_repr(self) -> str:
        return f"bits={self.bits}, range=[-{self.qn}, {self.qp}], learned_offset={self.learned_offset}"


class QuantLinear(nn.Linear):
    """nn.Linear with `weight_quant` on its weight and `input_quant` on its input (made by class swap)."""

    weight_quant: nn.Module
    input_quant: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(x), self.weight_quant(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d with `weight_quant` on its weight and `input_quant` on its input (made by class swap)."""

    weight_quant: nn.Module
    input_quant: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quant(x), self.weight_quant(self.weight), self.bias)


def quantize_conv(conv: nn.Conv2d, weight_quant: nn.Module, input_quant: nn.Module) -> QuantConv2d:
    """Turn `conv` into a QuantConv2d in place (same parameters, same name in the state dict)."""
    conv.__class__ = QuantConv2d
    conv.weight_quant, conv.input_quant = weight_quant, input_quant
    return conv


def quantize_linear(linear: nn.Linear, weight_quant: nn.Module, input_quant: nn.Module) -> QuantLinear:
    """Turn `linear` into a QuantLinear in place (same parameters, same name in the state dict)."""
    linear.__class__ = QuantLinear
    linear.weight_quant, linear.input_quant = weight_quant, input_quant
    return linear


def quantize_attention(attn: nn.Module, q_quant: nn.Module, k_quant: nn.Module, v_quant: nn.Module,
                       attn_quant: nn.Module) -> nn.Module:
    """Give a timm attention module (ToMe-patched or not) quantizers on q, k, v and the probabilities."""
    attn = hook_attention(attn)
    attn.q_quant, attn.k_quant, attn.v_quant, attn.attn_quant = q_quant, k_quant, v_quant, attn_quant
    return attn


def find_encoder(model: nn.Module) -> VisionTransformer:
    """The timm ViT to quantize (see `vit.find_vit`); encoders whose contract says `quantizable = False` are refused."""
    vit = find_vit(model, "quantization")
    if not getattr(vit, "quantizable", False):
        raise TypeError(f"quantization does not apply to {type(vit).__name__} (its `quantizable` is False: its "
                        "blocks do not run timm's Linear / attention path)")
    return vit


def block_linears(block: nn.Module):
    """(name, module) of the nn.Linear layers of a transformer block (QuantLinear included)."""
    return [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def patch_blocks(vit: VisionTransformer, make_linear_quants: Callable, make_attn_quants: Optional[Callable]):
    """Quantize every block's Linears (`make_linear_quants(name, linear) -> (weight_quant, input_quant)`)
    and, when `make_attn_quants(attn)` is given, its attention (-> q, k, v, attn quantizers)."""
    if getattr(vit, "_quant_config", None) is not None:
        raise ValueError(f"{type(vit).__name__} is already quantized ({vit._quant_config}); build a fresh model")
    for block in vit.blocks:
        for name, linear in block_linears(block):
            quantize_linear(linear, *make_linear_quants(name, linear))
        if make_attn_quants is not None:
            quantize_attention(block.attn, *make_attn_quants(block.attn))


def quantize_model(model: nn.Module, w_bits: Optional[int], a_bits: Optional[int], scope: str = "linear",
                   symmetric: bool = True, learned_offset: bool = False, grad_scale: str = "paper") -> nn.Module:
    """LSQ quantization-aware training patch, in place; returns `model`.

    Weights: signed, per tensor; activations entering Linears, q, k, v: signed; attention
    probabilities: unsigned. None bits leave weights (or activations) float: the summary seed's
    weight-only and activation-only runs. symmetric: 2 bits is ternary; learned_offset: LSQ+ (offsets on
    activations, its initialisation); grad_scale:
    the activations' N in LSQ's g ('paper' or 'lsq-net', see LSQQuantizer). The
    step sizes are parameters (train them with the rest); they initialise on the first forward, so
    run one batch of real data before evaluating an untrained model.
    """
    if scope not in QUANT_SCOPES:
        raise ValueError(f"quantization scope must be one of {QUANT_SCOPES}, got {scope!r}")
    if w_bits is None and a_bits is None:
        raise ValueError("quantize_model needs w_bits or a_bits (or both)")
    for bits, what in ((w_bits, "weight bits (--w-bits)"), (a_bits, "activation bits (--a-bits)")):
        if bits is not None:
            check_bits(bits, what)
    vit = find_encoder(model)

    if grad_scale not in GRAD_SCALES:
        raise ValueError(f"LSQ grad_scale must be one of {GRAD_SCALES}, got {grad_scale!r}")

    def act(signed: bool = True) -> nn.Module:
        return nn.Identity() if a_bits is None else LSQQuantizer(a_bits, signed, symmetric, learned_offset, True,
                                                                 grad_scale)

    def linear_quants(name, linear):  # LSQ+ keeps weights symmetric, without an offset
        weight = nn.Identity() if w_bits is None else LSQQuantizer(w_bits, True, symmetric,
                                                                   init="3sigma" if learned_offset else "lsq")
        return weight, act()

    def attn_quants(attn):
        return act(), act(), act(), act(signed=False)

    patch_blocks(vit, linear_quants, attn_quants if scope == "linear+attn" else None)
    vit._quant_config = dict(method="lsq", w_bits=w_bits, a_bits=a_bits, scope=scope, symmetric=symmetric,
                             learned_offset=learned_offset, grad_scale=grad_scale)
    return model


def quant_config(model: nn.Module) -> Optional[dict]:
    """What `apply_quant_config` needs to rebuild the quantized structure of `model` (None: float)."""
    return getattr(find_vit(model, "quantization"), "_quant_config", None)


def _restore_lsq(model: nn.Module, config: dict) -> nn.Module:
    keys = ("w_bits", "a_bits", "scope", "symmetric", "learned_offset", "grad_scale")
    return quantize_model(model, **{k: config[k] for k in keys if k in config})


# quantization method (a checkpoint config's "quantization.method") -> rebuild its structure on a fresh model
QUANT_RESTORERS: Dict[str, Callable[[nn.Module, dict], nn.Module]] = {"lsq": _restore_lsq}


def apply_quant_config(model: nn.Module, config: dict) -> nn.Module:
    """Rebuild a saved quantized structure (LSQ, RepQ/QwT, ...) on a fresh model, so its state loads."""
    method = config.get("method")
    if method not in QUANT_RESTORERS:
        raise ValueError(f"unknown quantization method {method!r} in a checkpoint config; expected one of "
                         f"{sorted(QUANT_RESTORERS)}")
    return QUANT_RESTORERS[method](model, config)
