"""RepQ-style post-training quantization with QwT compensation, for any registry ViT.

RepQ-ViT: Li et al. 2023, "RepQ-ViT: Scale Reparameterization for Post-Training Quantization of
Vision Transformers" (ICCV 2023, github.com/zkkli/RepQ-ViT):
  - weights: uniform asymmetric, per output channel;
  - post-LayerNorm activations (inputs of qkv and fc1): calibrated per channel, then made per tensor
    by the scale reparameterization: with per-channel (s_c, z_c) and targets s = mean(s_c),
    z = round(mean(z_c)), r1 = s_c / s and r2 = z_c - z, LayerNorm gets gamma / r1 and
    (beta + s_c r2) / r1, and the next Linear W r1 (per input column) and b - W (s_c r2). The
    per-tensor quantizer on the new activations equals the per-channel one on the old (exactly);
    in float the block is unchanged (a test proves both);
  - post-softmax attention: the log-sqrt(2) quantizer, q = clamp(round(-2 log2(x / delta)), 0, 2^b - 1),
    x_hat = delta * 2^(-q / 2) (values past the range become 0);
  - other activations (proj and fc2 inputs, q, k, v): uniform asymmetric per tensor;
  - the patch embedding (its input at 8 bits) and a Linear classifier head, as RepQ's quant_model quantizes
    every Conv2d and Linear (`ends=False` keeps them float; a CLIP's projection belongs to the CLIP wrapper
    and stays float);
  - order: as RepQ-ViT's test_quant.py, weights quantized first, then one forward of the calibration
    images in which each activation quantizer calibrates on its first input and quantizes it, so each
    layer calibrates on the quantized layers before it (`calibration='float'`: all on float activations;
    on DTP's bucketed attention the attention quantizers calibrate on the first bucket);
  - ranges: the least-MSE of RepQ's percentile candidates (the 99.9th, 99.99th and 99.999th percentile
    and their mirrors as the range, as they fall), on 32 calibration images; `ranges='wide'` adds the max
    and lower percentiles and keeps zero inside the range.
QwT: Fu et al. 2025, "Quantization without Tears" (CVPR 2025, github.com/wujx2001/QwT): per block,
out = Block_q(x) + x W + b, with [W; b] the least-squares fit of Block_fp(x) - Block_q(x) on [x, 1],
x being the block input in the already compensated quantized model (greedy, block by block); a
block whose fit has R^2 <= 0 gets W = 0, b = 0.

Blocks whose norm2 output also feeds the residual (ViT-Lite's post-norm layout,
`norm2_feeds_residual`) keep norm2 unfolded: its fc1 input is calibrated per tensor directly.
QwT needs a block's output tokens to match its input, so it refuses ToMe-merging blocks.
"""
from typing import Iterable, List, Optional

import torch
import torch.nn as nn

from dtpclip.encoders.quant import (QUANT_RESTORERS, block_linears, check_bits, find_encoder, patch_blocks,
                                   quantize_conv, quantize_linear)
from dtpclip.registry import REQUIRED, register_transform

# Clipping candidates of the least-MSE range search: RepQ-ViT's (quantizer.py: the 0.999, 0.9999 and 0.99999
# percentiles, the range taken as they fall) or a wider search ('wide': the max and down to the 90th
# percentile, zero kept inside the range), the choice before RepQ's was followed.
RANGES = {"repq": dict(percentiles=(0.999, 0.9999, 0.99999), keep_zero=False),
          "wide": dict(percentiles=(1.0, 0.99999, 0.9999, 0.999, 0.99, 0.98, 0.95, 0.9), keep_zero=True)}
MAX_SAMPLES = 1 << 22  # values per tensor kept for the range search (torch.quantile's limit is 2^24)


def _thin(rows: torch.Tensor, limit: int = MAX_SAMPLES // 4) -> torch.Tensor:
    """At most about `limit` values of rows [N, C] kept for calibration: every k-th row, deterministic."""
    step = -(-rows.numel() // limit)
    return rows.detach()[::step] if step > 1 else rows.detach()


def _fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    q = (torch.round(x / scale) + zero_point).clamp(0, 2 ** bits - 1)
    return (q - zero_point) * scale


def _params(low: torch.Tensor, high: torch.Tensor, bits: int, keep_zero: bool):
    if keep_zero:
        low, high = low.clamp(max=0.0), high.clamp(min=0.0)
    scale = ((high - low) / (2 ** bits - 1)).clamp_min(1e-8)
    return scale, torch.round(-low / scale)


@torch.no_grad()
def mse_range(x: torch.Tensor, bits: int, ranges: str = "repq"):
    """Per-column (scale, zero_point) of x [N, C]: among the `ranges` percentile clippings, the least-MSE one."""
    x = x.float()
    best = best_scale = best_zp = None
    for p in RANGES[ranges]["percentiles"]:
        high = x.max(0).values if p == 1.0 else torch.quantile(x, p, dim=0)
        low = x.min(0).values if p == 1.0 else torch.quantile(x, 1.0 - p, dim=0)
        scale, zp = _params(low, high, bits, RANGES[ranges]["keep_zero"])
        err = (_fake_quant(x, scale, zp, bits) - x).square().mean(0)
        if best is None:
            best, best_scale, best_zp = err, scale, zp
        else:
            better = err < best
            best = torch.where(better, err, best)
            best_scale, best_zp = torch.where(better, scale, best_scale), torch.where(better, zp, best_zp)
    return best_scale, best_zp


class UniformQuantizer(nn.Module):
    """Asymmetric uniform fake quantizer, per tensor or per channel of the last dim (activations) /
    first dim (weights, `channel_dim=0`). mode: 'quant' applies it, 'calib' records inputs and passes
    them through, 'calib_now' calibrates on its input and quantizes it (RepQ's initialisation on first use,
    so later layers calibrate on quantized inputs), 'off' passes through (the float reference QwT fits against)."""

    def __init__(self, bits: int, per_channel: bool = False, channel_dim: int = -1, channels: int = 0,
                 ranges: str = "repq"):
        super().__init__()
        self.bits, self.per_channel, self.channel_dim, self.ranges = bits, per_channel, channel_dim, ranges
        shape = (channels,) if per_channel else ()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.mode, self.samples = "quant", []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode in ("calib", "calib_now"):
            self.samples.append(_thin(x.reshape(-1, x.shape[-1])))
            if self.mode == "calib":
                return x
            self.calibrate()
        if self.mode == "off":
            return x
        shape = [1] * x.dim()
        if self.per_channel:
            shape[self.channel_dim] = -1
        return _fake_quant(x, self.scale.view(shape), self.zero_point.view(shape), self.bits)

    @torch.no_grad()
    def calibrate(self, data: Optional[torch.Tensor] = None) -> None:
        """Set scale / zero point from `data` (weights) or the recorded samples; back to 'quant'."""
        if data is None:
            if not self.samples:
                raise RuntimeError("no calibration samples reached this quantizer")
            data, self.samples = torch.cat(self.samples), []
        if self.channel_dim == 0:  # weights [out, in] -> columns are output channels
            data = data.reshape(data.shape[0], -1).T
        data = _thin(data, MAX_SAMPLES)  # whole rows, so a stride never aliases with the channels
        data = data if self.per_channel else data.reshape(-1, 1)
        scale, zp = mse_range(data, self.bits, self.ranges)
        self.set_params(scale if self.per_channel else scale[0], zp if self.per_channel else zp[0])
        self.mode = "quant"

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale, self.zero_point = scale.clone(), zero_point.clone()
        self.per_channel = scale.dim() > 0

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"


class LogSqrt2Quantizer(nn.Module):
    """RepQ-ViT's log-sqrt(2) quantizer for post-softmax attention (values in [0, 1]); modes as above."""

    def __init__(self, bits: int, ranges: str = "repq"):
        super().__init__()
        self.bits, self.ranges = bits, ranges
        self.register_buffer("delta", torch.tensor(1.0))
        self.mode, self.samples = "quant", []

    @staticmethod
    def quantize(x: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
        levels = torch.round(-2.0 * torch.log2((x / delta).clamp_min(1e-30)))
        out = delta * torch.pow(2.0, -levels.clamp(0, 2 ** bits - 1) / 2)
        return torch.where(levels >= 2 ** bits, torch.zeros_like(out), out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode in ("calib", "calib_now"):
            self.samples.append(_thin(x.reshape(-1, x.shape[-1])).flatten())  # keys vary per batch (DTP, ToMe)
            if self.mode == "calib":
                return x
            self.calibrate()
        return x if self.mode == "off" else self.quantize(x, self.delta, self.bits)

    @torch.no_grad()
    def calibrate(self) -> None:
        """delta among the max and the top percentiles of the recorded samples, by least MSE."""
        data, self.samples = torch.cat(self.samples).float(), []
        if data.numel() > MAX_SAMPLES:  # a seeded pick: a stride could alias with the key positions
            data = data[torch.randperm(data.numel(), generator=torch.Generator().manual_seed(0))[:MAX_SAMPLES]
                        .to(data.device)]
        percentiles = RANGES[self.ranges]["percentiles"]
        candidates = [data.max() if p == 1.0 else torch.quantile(data, p) for p in percentiles[:5]]
        errors = [(self.quantize(data, d, self.bits) - data).square().mean() for d in candidates]
        self.delta = candidates[int(torch.stack(errors).argmin())].clone().clamp_min(1e-8)
        self.mode = "quant"

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


# --------------------------------------------------------------------------------------------
# QwT compensation

class _QwTBlock:
    """Mixed in before a block's class: out = block(x) + qwt(x), qwt a Linear D -> D (zeros: a no-op)."""

    qwt: nn.Linear

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return super().forward(x, *args, **kwargs) + self.qwt(x)


_QWT_CLASSES: dict = {}


def add_qwt(block: nn.Module, dim: int) -> nn.Module:
    """Give `block` a zero QwT compensation (class swap); errors for blocks that change the token count."""
    if getattr(block, "merges_tokens", False):
        raise ValueError("QwT adds x W + b to a block's output, so the block must keep its tokens; "
                         "this block merges tokens (ToMe r > 0): use PTQ without --qwt")
    cls = type(block)
    if cls not in _QWT_CLASSES:
        _QWT_CLASSES[cls] = type(f"QwT{cls.__name__}", (_QwTBlock, cls), {})
    block.__class__ = _QWT_CLASSES[cls]
    ref = next(block.parameters())
    block.qwt = nn.Linear(dim, dim, device=ref.device, dtype=ref.dtype)
    nn.init.zeros_(block.qwt.weight)
    nn.init.zeros_(block.qwt.bias)
    return block


@torch.no_grad()
def fit_compensation(x: torch.Tensor, residual: torch.Tensor, ridge: float = 1e-6):
    """QwT's closed form: [W; b] = argmin |[x, 1] [W; b] - residual|^2 (x, residual [N, D]).

    Returns (W [D, D] as x @ W, b [D], R^2); W and b are zero when R^2 <= 0.
    """
    x, y = x.double(), residual.double()
    x1 = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    gram = x1.T @ x1
    reg = ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    reg[-1, -1] = 0.0  # the bias is not regularised
    wb = torch.linalg.solve(gram + reg, x1.T @ y)
    ss_res = (y - x1 @ wb).square().sum()
    ss_tot = (y - y.mean(0)).square().sum()
    r2 = float(1.0 - ss_res / ss_tot.clamp_min(1e-30))
    if r2 <= 0.0:
        wb = torch.zeros_like(wb)
    return wb[:-1].float(), wb[-1].float(), r2


def _set_modes(module: nn.Module, mode: str, kinds=("act", "weight")) -> None:
    for m in module.modules():
        if isinstance(m, (UniformQuantizer, LogSqrt2Quantizer)):
            is_weight = isinstance(m, UniformQuantizer) and m.channel_dim == 0
            if ("weight" if is_weight else "act") in kinds:
                m.mode = mode


def _block_io(vit: nn.Module, block: nn.Module, images: Iterable[torch.Tensor]):
    """Inputs (x, args, kwargs) and outputs of `block` while the encoder runs on the image batches."""
    record: List = []

    def hook(module, args, kwargs, output):
        record.append((args, kwargs, output))

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        for batch in images:
            vit.encode(batch)
    finally:
        handle.remove()
    return record


@torch.no_grad()
def apply_qwt(model: nn.Module, images: List[torch.Tensor]) -> List[float]:
    """Fit QwT compensation greedily, block by block, on calibration image batches; returns each R^2."""
    vit = find_encoder(model)
    for block in vit.blocks:
        if not hasattr(block, "qwt"):
            add_qwt(block, vit.embed_dim)
    r2s = []
    for block in vit.blocks:
        xs, residuals = [], []
        for args, kwargs, quant_out in _block_io(vit, block, images):
            _set_modes(block, "off")
            float_out = block(*args, **kwargs)
            _set_modes(block, "quant")
            xs.append(args[0].reshape(-1, args[0].shape[-1]))
            residuals.append((float_out - quant_out).reshape(-1, quant_out.shape[-1]))
        weight, bias, r2 = fit_compensation(torch.cat(xs), torch.cat(residuals))
        block.qwt.weight.copy_(weight.T)
        block.qwt.bias.copy_(bias)
        r2s.append(r2)
    vit._quant_config["qwt"] = True
    return r2s


# --------------------------------------------------------------------------------------------
# RepQ-style PTQ

def _post_norm_pairs(block: nn.Module):
    """(LayerNorm, the Linear it alone feeds) pairs whose scales RepQ folds."""
    pairs = [(block.norm1, block.attn.qkv)]
    if not getattr(block, "norm2_feeds_residual", False):
        pairs.append((block.norm2, block.mlp.fc1))
    return pairs


def _ensure_bias(linear: nn.Linear) -> None:
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device))


@torch.no_grad()
def fold_scales(norm: nn.LayerNorm, linear: nn.Linear, scale: torch.Tensor, zero_point: torch.Tensor):
    """RepQ-ViT's scale reparameterization of per-channel (scale, zero_point) of norm's output into
    norm and linear; returns the per-tensor (scale, zero_point) that now quantizes identically."""
    target_scale, target_zp = scale.mean(), zero_point.mean().round()
    r1, r2 = scale / target_scale, zero_point - target_zp
    shift = scale * r2
    _ensure_bias(linear)
    linear.bias.sub_(linear.weight @ shift)
    linear.weight.mul_(r1)
    norm.bias.add_(shift).div_(r1)
    norm.weight.div_(r1)
    return target_scale, target_zp


def _ends(vit: nn.Module) -> list:
    """The patch embedding's conv and a Linear classifier head, where quantized (RepQ's quant_model quantizes
    every Conv2d and Linear of the model)."""
    head = vit.get_classifier()
    return [vit.patch_embed.proj] + ([head] if isinstance(head, nn.Linear) else [])


def _install(vit: nn.Module, w_bits: int, a_bits: int, per_channel_inputs: set, ranges: str = "repq",
             ends: bool = True) -> None:
    def linear_quants(name, linear):
        weight = UniformQuantizer(w_bits, True, channel_dim=0, channels=linear.out_features, ranges=ranges)
        per_channel = id(linear) in per_channel_inputs
        return weight, UniformQuantizer(a_bits, per_channel, channels=linear.in_features if per_channel else 0,
                                        ranges=ranges)

    def attn_quants(attn):
        return (UniformQuantizer(a_bits, ranges=ranges), UniformQuantizer(a_bits, ranges=ranges),
                UniformQuantizer(a_bits, ranges=ranges), LogSqrt2Quantizer(a_bits, ranges))

    patch_blocks(vit, linear_quants, attn_quants)
    if ends:  # RepQ: the patch embedding's input at 8 bits, the head's at a_bits; weights per output channel
        conv, *head = _ends(vit)
        quantize_conv(conv, UniformQuantizer(w_bits, True, channel_dim=0, channels=conv.out_channels, ranges=ranges),
                      UniformQuantizer(8, ranges=ranges))
        for linear in head:
            quantize_linear(linear, UniformQuantizer(w_bits, True, channel_dim=0, channels=linear.out_features,
                                                     ranges=ranges), UniformQuantizer(a_bits, ranges=ranges))
    for block in vit.blocks:  # a bias for every folded Linear (ViT-Lite's qkv has none), so states match
        for _, linear in _post_norm_pairs(block):
            _ensure_bias(linear)


@torch.no_grad()
def leading_images(batches: List[torch.Tensor], count: int) -> List[torch.Tensor]:
    """The first `count` images of a list of batches, as batches (the last one cut)."""
    taken = []
    for batch in batches:
        if count <= 0:
            break
        taken.append(batch[:count])
        count -= len(taken[-1])
    return taken


CALIBRATIONS = ("sequential", "float")


def apply_ptq(model: nn.Module, w_bits: int, a_bits: int, images: List[torch.Tensor], qwt: bool = False,
              repq_images: Optional[int] = None, ranges: str = "repq", calibration: str = "sequential",
              ends: bool = True) -> nn.Module:
    """RepQ-style PTQ of `model`'s ViT in place on calibration batches, then QwT when `qwt`; returns `model`.
    The quantizers calibrate on the first `repq_images` images (None: all; RepQ-ViT uses 32) and QwT fits its
    compensation on all of them (QwT's ImageNet script: 512). `ranges`: the clipping candidates (RANGES).
    calibration: 'sequential' as RepQ-ViT's test_quant.py (weights quantized, then one forward of the
    calibration images in which each activation quantizer calibrates on its first input and quantizes it, so
    every layer sees the quantized layers before it); 'float' calibrates every quantizer on the float
    network's activations (the images in their batches). ends: also quantize the patch embedding (its input at 8
    bits) and a Linear head, as RepQ; False keeps them float. Run in eval mode; the weights change (folding)."""
    if ranges not in RANGES:
        raise ValueError(f"PTQ ranges must be one of {sorted(RANGES)}, got {ranges!r}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"PTQ calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    check_bits(w_bits, "weight bits (--w-bits)")
    check_bits(a_bits, "activation bits (--a-bits)")
    if not images:
        raise ValueError("PTQ calibrates on images: got no calibration batches")
    vit = find_encoder(model)
    was_training = vit.training
    vit.eval()
    post_norm = {id(lin) for block in vit.blocks for _, lin in _post_norm_pairs(block)}
    _install(vit, w_bits, a_bits, post_norm, ranges, ends)
    weighted = [linear for block in vit.blocks for _, linear in block_linears(block)] + (_ends(vit) if ends else [])
    calibration_images = leading_images(images, repq_images) if repq_images is not None else images
    if calibration == "sequential":
        for layer in weighted:
            layer.weight_quant.calibrate(layer.weight)
        _set_modes(vit, "calib_now", kinds=("act",))
        vit(torch.cat(calibration_images))  # forward, not encode: the head's quantizer calibrates too
    else:
        _set_modes(vit, "calib", kinds=("act",))
        _set_modes(vit, "off", kinds=("weight",))
        for batch in calibration_images:
            vit(batch)
        for m in vit.modules():
            if isinstance(m, (UniformQuantizer, LogSqrt2Quantizer)) and m.mode == "calib":
                m.calibrate()
    for block in vit.blocks:
        for norm, linear in _post_norm_pairs(block):
            quant = linear.input_quant
            quant.set_params(*fold_scales(norm, linear, quant.scale, quant.zero_point))
    for layer in weighted:
        layer.weight_quant.calibrate(layer.weight)
    vit._quant_config = dict(method="repq", w_bits=w_bits, a_bits=a_bits, qwt=False, ends=ends)
    if qwt:
        apply_qwt(vit, images)
    vit.train(was_training)
    return model


def restore_ptq(model: nn.Module, config: dict) -> nn.Module:
    """The structure `apply_ptq` leaves (per-tensor activations, per-channel weights, QwT layers),
    uncalibrated, so a saved state dict loads into it."""
    vit = find_encoder(model)
    ends = bool(config.get("ends", False))  # checkpoints from before RepQ's ends were quantized have none
    _install(vit, config["w_bits"], config["a_bits"], set(), ends=ends)
    if config.get("qwt"):
        for block in vit.blocks:
            add_qwt(block, vit.embed_dim)
    vit._quant_config = dict(method="repq", w_bits=config["w_bits"], a_bits=config["a_bits"],
                             qwt=bool(config.get("qwt")), ends=ends)
    return model


def _apply_ptq_transform(model: nn.Module, calibration: List[torch.Tensor], w: int = REQUIRED, a: int = REQUIRED,
                         qwt: bool = False, repq_images: int = 32, ranges: str = "repq",
                         order: str = "sequential", ends: bool = True) -> None:
    apply_ptq(model, w, a, calibration, qwt=qwt, repq_images=repq_images, ranges=ranges, calibration=order,
              ends=ends)


QUANT_RESTORERS["repq"] = restore_ptq
register_transform("ptq", _apply_ptq_transform,
                   {"w": REQUIRED, "a": REQUIRED, "qwt": False, "repq_images": 32, "ranges": "repq",
                    "order": "sequential", "ends": True},
                   lambda encoder: getattr(encoder, "quantizable", False), calibration=True,
                   example="ptq:w=8,a=8",
                   summary="RepQ-style post-training quantization at w/a bits, optionally with QwT compensation",
                   title="RepQ-style PTQ")
