"""W8A8 on integer kernels: the 8-bit Linears of a calibrated RepQ-style PTQ model run as int8 GEMMs.

`apply_ptq` quantizes by fake quantization (float compute on quantize-dequantized values), so it shows
accuracy but no speed. `lower_to_int8` keeps each QuantLinear's calibration, its per-tensor activation
(scale, zero point) and its quantized weight, and swaps the Linear for an `Int8Linear` whose product runs in
integers:

- CPU ('onednn'): oneDNN's u8 x s8 GEMM with an fp32 output, `torch.ops.onednn.qlinear_pointwise`, the kernel
  Inductor's x86 int8 lowering calls. torchao's int8 tensors are not used here: on CPU they run
  `torch._int_mm`, measured 18x slower than the fp32 Linear (ViT-B/32 fc1, AVX2, one thread).
- CUDA ('torchao'): torchao's static int8 activation x int8 weight tensors (`Int8StaticActivationInt8WeightConfig`,
  `torch._int_mm` with the zero-point correction), given the same calibrated activation parameters.

The activation's codes are the PTQ quantizer's exactly (u8, or shifted by 128 to s8 for torchao). Weights
become symmetric s8 per output channel, requantized from the fake-quantized weight. On CPUs without VNNI,
AVX2's u8 x s8 pair sums saturate at int16, so weights keep 7 bits there (torchao's `should_reduce_range`),
as x86 int8 backends do. Attention (q, k, v, probabilities) and the patch embedding stay fake-quantized:
no int8 kernel serves them, so their quantizers keep the PTQ model's numerics.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from dtpclip.encoders.ptq import UniformQuantizer
from dtpclip.encoders.quant import QuantLinear, find_encoder
from dtpclip.registry import register_transform

BACKENDS = ("auto", "onednn", "torchao")


def _reduce_range(device: torch.device) -> bool:
    from torchao.utils import should_reduce_range  # torchao only where int8 kernels are asked for
    return should_reduce_range(device)


@torch.no_grad()
def symmetric_int8(weight: torch.Tensor, levels: int = 127):
    """Per-output-channel symmetric codes of `weight` [out, in] in [-levels, levels] and their scales."""
    scale = weight.abs().amax(dim=1).clamp_min(1e-12) / levels
    return torch.round(weight / scale[:, None]).clamp(-levels, levels).to(torch.int8), scale.float()


class Int8Linear(nn.Module):
    """y = dequant(int8 GEMM(u8 codes of x, s8 weight codes)) + bias, for one calibrated QuantLinear."""

    def __init__(self, linear: QuantLinear, backend: str):
        super().__init__()
        quant = linear.input_quant
        if not isinstance(quant, UniformQuantizer) or quant.per_channel or quant.bits != 8:
            raise ValueError(f"int8 kernels need an 8-bit per-tensor input quantizer; this Linear has {quant}")
        self.in_features, self.out_features, self.backend = linear.in_features, linear.out_features, backend
        self.x_scale, self.x_zero_point = float(quant.scale), int(quant.zero_point)
        weight = linear.weight_quant(linear.weight).detach().float()
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone())
        if backend == "onednn":
            codes, scale = symmetric_int8(weight, 63 if _reduce_range(weight.device) else 127)
            self.register_buffer("weight_zero_point", torch.zeros(len(scale), dtype=torch.long))
            self._packed = torch.ops.onednn.qlinear_prepack(codes, None)  # oneDNN's opaque layout, not in the state dict
        else:
            self._torchao_linear = self._build_torchao(weight)
            codes, scale = self._torchao_linear.weight.qdata, self._torchao_linear.weight.scale.flatten()
        self.weight_codes = nn.Parameter(codes, requires_grad=False)  # a parameter: counted as the layer's weight
        self.register_buffer("weight_scale", scale)

    def _build_torchao(self, weight: torch.Tensor) -> nn.Linear:
        from torchao.quantization import Int8StaticActivationInt8WeightConfig, PerRow, PerTensor, quantize_
        from torchao.quantization.quant_primitives import MappingType
        zero_point = self.x_zero_point - 128  # the u8 codes shifted to s8
        if not -128 <= zero_point <= 127:
            raise ValueError(f"activation zero point {self.x_zero_point} lies outside [0, 255]; torchao's int8 "
                             "activations cannot hold it (backend='onednn' can)")
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device=weight.device)
        linear.weight.data.copy_(weight)
        quantize_(linear, Int8StaticActivationInt8WeightConfig(
            act_quant_scale=torch.tensor([[self.x_scale]], device=weight.device),
            act_quant_zero_point=torch.tensor([[zero_point]], dtype=torch.int8, device=weight.device),
            granularity=[PerTensor(), PerRow()], act_mapping_type=MappingType.ASYMMETRIC, set_inductor_config=False))
        return linear

    def _input_codes(self, x: torch.Tensor) -> torch.Tensor:
        return (x / self.x_scale).round_().add_(self.x_zero_point).clamp_(0, 255).to(torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if torch.jit.is_tracing():  # fvcore counts MACs on a trace, to which the kernels are opaque: the same product
            codes = self._input_codes(rows).float() - self.x_zero_point
            out = F.linear(codes * self.x_scale, self.weight_codes.float() * self.weight_scale[:, None], self.bias)
        elif self.backend == "torchao":
            out = self._torchao_linear(rows.float())
            out = out if self.bias is None else out + self.bias
        else:
            out = torch.ops.onednn.qlinear_pointwise(
                self._input_codes(rows), self.x_scale, self.x_zero_point, self._packed, self.weight_scale,
                self.weight_zero_point, self.bias, 1.0, 0, torch.float32, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"int8 backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "torchao" if device.type == "cuda" else "onednn"
    if backend == "onednn" and device.type != "cpu":
        raise ValueError(f"int8 backend 'onednn' runs on CPU; the model is on {device}")
    return backend


def is_w8a8_ptq(vit: nn.Module) -> bool:
    config = getattr(vit, "_quant_config", None) or {}
    return config.get("method") == "repq" and (config.get("w_bits"), config.get("a_bits")) == (8, 8)


@torch.no_grad()
def lower_to_int8(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap every 8-bit QuantLinear of a W8A8 PTQ'd model's ViT for an Int8Linear, in place; returns `model`."""
    vit = find_encoder(model)
    config = getattr(vit, "_quant_config", None) or {}
    if not is_w8a8_ptq(vit):
        raise ValueError("int8 kernels run a W8A8 RepQ PTQ model: apply ptq:w=8,a=8 first (or load its checkpoint); "
                         f"this model's quantization is {config or 'none (float)'}")
    backend = resolve_backend(backend, next(vit.parameters()).device)
    linears = [name for name, module in vit.named_modules() if isinstance(module, QuantLinear)]
    for name in linears:
        parent, _, attr = name.rpartition(".")
        owner = vit.get_submodule(parent) if parent else vit
        setattr(owner, attr, Int8Linear(getattr(owner, attr), backend))
    config["kernel"] = backend
    return model


def _apply_int8_transform(model: nn.Module, calibration, backend: str = "auto") -> None:
    lower_to_int8(model, backend)


register_transform("int8", _apply_int8_transform, {"backend": "auto"}, is_w8a8_ptq, example="int8",
                   summary="W8A8 PTQ's Linears on integer kernels (oneDNN on CPU, torchao on CUDA); after ptq:w=8,a=8",
                   title="int8 kernels")
