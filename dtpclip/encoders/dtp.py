"""DTP-ViT: a ViT that pools its patch tokens into a variable number of segments.

Dynamic token pooling after Nawrot et al. 2023, "Efficient Transformers with Dynamic Token
Pooling" (github.com/PiotrNawrot/dynamic-pooling), carried to ViTs as in the DTP-ViT / DRIP
CLIP runs: `pre_layers` full blocks, a boundary predictor on the patch tokens, segment-mean
pooling, then the remaining blocks over the shortened sequence.

Two of the reference's boundary predictors (`boundary_predictor=`):
  'gumbel'   (default) a Gumbel-sigmoid per patch, trained end to end through the pooling, its rate
             held at the prior by a binomial loss (`BoundaryPredictor`).
  'entropy'  boundaries where an auxiliary predictor's entropy spikes (`NextPatchEntropy`): the
             boundary MLP is trained by BCE to predict the spikes and thresholded at 0.5, in
             training as at eval (deterministic; no gradient through the pooling), as the reference.
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.distributions import Binomial, RelaxedBernoulli

from dtpclip.encoders.output import EncoderOutput
from dtpclip.encoders.attention import hook_attention
from dtpclip.encoders.varlen import VarlenBatch
from dtpclip.encoders.vit import TOKEN_FEATURE_CFG, PlainViT, register_vit_family

# Named compression variants: suffix -> prior (fraction of patches that close a segment).
COMPRESSIONS = {"2x": 0.5, "4x": 0.25, "10x": 0.1}


class BoundaryPredictor(nn.Module):
    """p = sigmoid(MLP(x)) per patch; hard boundaries by a Gumbel-sigmoid with straight-through.

    Training: soft ~ RelaxedBernoulli(temperature, p), hard = soft > threshold, and the returned
    boundaries are hard in value with the gradient of soft. Sampling and the returned boundaries are
    fp32 whatever the predictor's dtype: bf16 noise shifts the rate (0.0973 sampled for p = 0.1).
    Eval (`eval_boundaries`):
      'expected'  each image keeps its round(sum p) most probable boundaries (the default);
      'threshold' hard = p > threshold (DTP's rule for a converged predictor);
      'sample'    the training-time sampling.
    'expected' is the default because it pools at the training rate even while p is unsure (README,
    Design decisions). The output bias starts at logit(prior), so an untrained model already pools
    at the target rate.
    Annealed rate (`set_strength`, driven by TrainConfig.reduction_anneal): every logit is shifted by
    logit(rate) - logit(prior) and the loss holds `rate`, so the schedule sets how many boundaries there
    are while the predictor learns where they go; at strength 1 (the end of any schedule) rate = prior.
    """

    MAX_RATE = 0.999  # the anneal's start: almost every patch closes its segment, with a finite logit

    EVAL_RULES = ("expected", "threshold", "sample")

    def __init__(self, dim: int, hidden_dim: int, prior: float, temperature: float = 0.5,
                 threshold: float = 0.5, eval_boundaries: str = "expected"):
        super().__init__()
        if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not 0.0 < prior < 1.0:
            raise ValueError(f"compression (boundary prior) must be a number in (0, 1), got {prior!r}")
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))
        nn.init.constant_(self.mlp[-1].bias, math.log(prior / (1.0 - prior)))
        if eval_boundaries not in self.EVAL_RULES:
            raise ValueError(f"eval_boundaries must be one of {self.EVAL_RULES}, got {eval_boundaries!r}")
        self.prior, self.temperature, self.threshold = prior, temperature, threshold
        self.eval_boundaries = eval_boundaries
        self.rate, self.logit_offset = float(prior), 0.0  # floats: dynamo does not specialise on them

    def set_strength(self, strength: float) -> None:
        """Boundary rate prior + (1 - strength) (MAX_RATE - prior): strength 0 pools almost nothing, 1 at the prior."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"reduction strength must be in [0, 1], got {strength!r}")
        rate = self.prior + (1.0 - strength) * (self.MAX_RATE - self.prior)
        self.rate = rate
        self.logit_offset = math.log(rate / (1.0 - rate)) - math.log(self.prior / (1.0 - self.prior))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, D] -> boundaries [B, L] in {0, 1}."""
        return self.decide(self.logits(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, D] -> boundary logits [B, L] (fp32)."""
        return self.mlp(x).squeeze(-1).float() + self.logit_offset

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        """Boundary logits -> boundaries by the training / eval rule above."""
        if self.training or self.eval_boundaries == "sample":
            soft = RelaxedBernoulli(torch.tensor(self.temperature, device=logits.device), logits=logits).rsample()
            hard = (soft > self.threshold).to(soft.dtype)
            return hard - soft.detach() + soft
        probs = torch.sigmoid(logits)
        if self.eval_boundaries == "threshold":
            return (probs > self.threshold).to(logits.dtype)
        keep = probs.sum(-1, keepdim=True).round()  # [B, 1]
        rank = probs.argsort(-1, descending=True).argsort(-1)  # 0 = most probable
        return (rank < keep).to(logits.dtype)

    def loss(self, boundaries: torch.Tensor) -> torch.Tensor:
        """-log Binomial(L, rate)(number of boundaries) / L, averaged over images (rate = prior unless annealed)."""
        length = boundaries.shape[-1]
        rate = torch.tensor(self.rate, device=boundaries.device, dtype=torch.float32)
        binomial = Binomial(total_count=length, probs=rate, validate_args=False)
        return -binomial.log_prob(boundaries.float().sum(-1)).mean() / length


def entropy_spikes(entropy: torch.Tensor, spikes_left: int = 2) -> torch.Tensor:
    """The reference's `get_spikes` along dim 1 ([B, L]): position t is a spike when its entropy exceeds the
    entropy at each of the `spikes_left` positions before it (the first positions, with fewer before them,
    compared with those they have; so position 0 always is)."""
    spikes = torch.ones_like(entropy, dtype=torch.bool)
    for lag in range(1, spikes_left + 1):
        spikes[:, lag:] &= entropy[:, lag:] > entropy[:, :-lag]
    return spikes


class NextPatchEntropy(nn.Module):
    """The reference's entropy-spike targets, adapted to patches.

    In the reference the entropy is that of the language model's next-token distribution, which in a
    causal model at position t has seen tokens <= t only. A ViT has no such model, so this adds one, as
    small and as causal as it gets: from the embedding of patch t alone (patch projection + position,
    before any block mixes patches; detached, so it observes the encoder without training it) a head
    predicts the next patch in raster order as one of levels^3 codes, its mean colour per channel in
    `levels` fixed bins of the normalised image (edges evenly in [-2, 2]). Its cross-entropy on the true
    next codes trains it (part of `aux_loss`); the entropy of its prediction at t is how unpredictable the
    next patch is, and its spikes (`entropy_spikes`, spikes_left 2 as the reference's configs) are the
    targets: a boundary closes the segment at t when what follows is a surprise. The boundary MLP itself
    reads the tokens after the pre-layers, which have seen the whole image: an encoder decides with all of
    its input, only the targets must not see the patch they predict.
    """

    def __init__(self, dim: int, hidden_dim: int, patch_size, levels: int = 4, spikes_left: int = 2):
        super().__init__()
        if levels < 2 or spikes_left < 1:
            raise ValueError(f"entropy boundaries need levels >= 2 and spikes_left >= 1, got {levels}, {spikes_left}")
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(),
                                  nn.Linear(hidden_dim, levels ** 3))
        self.patch_size, self.levels, self.spikes_left = tuple(patch_size), levels, spikes_left
        self.register_buffer("edges", torch.linspace(-2.0, 2.0, levels + 1)[1:-1], persistent=False)

    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> each patch's colour code [B, L] in raster order."""
        colour = F.avg_pool2d(images.float(), self.patch_size).flatten(2).transpose(1, 2)  # [B, L, 3]
        bins = torch.bucketize(colour.contiguous(), self.edges)
        return (bins * bins.new_tensor([self.levels ** 2, self.levels, 1])).sum(-1)

    def next_code_log_probs(self, embedded: torch.Tensor) -> torch.Tensor:
        """Patch embeddings [B, L, D] -> log-probabilities of the next patch's code [B, L, levels^3]."""
        return self.head(embedded.detach()).float().log_softmax(-1)

    def forward(self, embedded: torch.Tensor, images: torch.Tensor):
        """Patch embeddings [B, L, D] and images -> (spike targets [B, L] bool, the head's loss)."""
        log_probs = self.next_code_log_probs(embedded)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        head_loss = F.nll_loss(log_probs[:, :-1].flatten(0, 1), self.codes(images)[:, 1:].flatten())
        return entropy_spikes(entropy.detach(), self.spikes_left), head_loss


class Pooled(NamedTuple):
    tokens: torch.Tensor  # [B, N, D], padding zeroed
    token_mask: torch.Tensor  # [B, N]
    boundaries: torch.Tensor  # [B, L]
    logits: torch.Tensor  # [B, L] the boundary predictor's
    embedded: torch.Tensor  # [B, prefix + L, D] the tokens before the first block


def segment_ids(boundaries: torch.Tensor) -> torch.Tensor:
    """boundaries [B, L] in {0, 1} -> segment id of each patch [B, L]: the exclusive cumsum (a boundary closes
    its segment)."""
    return boundaries.cumsum(-1) - boundaries


def count_segments(boundaries: torch.Tensor) -> torch.Tensor:
    """boundaries [B, L] -> segments per image [B] (long): one per boundary, plus the trailing open one."""
    hard = boundaries.detach().round().long()
    return hard.sum(-1) + 1 - hard[:, -1]


def segment_pool(tokens: torch.Tensor, boundaries: torch.Tensor, num_slots: int = None):
    """Mean of each segment; a boundary closes its segment, the trailing open segment is kept.

    tokens [B, L, D], boundaries [B, L] -> segments [B, S, D], segment_mask [B, S] (S = `num_slots`,
    by default the most segments in the batch, read with a host sync). Segment ids are the exclusive
    cumsum of the boundaries; the pooling weight of token l in slot s is 1 - (s - id_l) where they
    match, so the straight-through gradient of the boundaries reaches the predictor, as in the DTP
    reference. Ids, slots and weights are fp32 (exact to 2^24 patches; bf16 only to 256).
    """
    ids = segment_ids(boundaries.float())  # [B, L]
    num_segments = count_segments(boundaries)  # [B]
    num_slots = int(num_segments.max()) if num_slots is None else num_slots
    slots = torch.arange(num_slots, device=tokens.device, dtype=ids.dtype)
    offset = slots.view(1, 1, -1) - ids.unsqueeze(-1)  # [B, L, S], 0 where l is in s
    weights = torch.where(offset == 0, 1.0 - offset, torch.zeros_like(offset))
    counts = weights.sum(1, keepdim=True)
    weights = weights / (counts + (counts == 0).to(counts.dtype))
    segments = torch.bmm(weights.transpose(1, 2).to(tokens.dtype), tokens)
    return segments, slots.unsqueeze(0) < num_segments.unsqueeze(1)


class DTPViT(PlainViT):
    """ViT with dynamic token pooling; `encode` returns padded segment tokens and their mask.

    compression: the boundary prior (0.5, 0.25, 0.1 for 2x, 4x, 10x), the target fraction of
    patches that close a segment. The blocks are the plain ViT's, so plain ViT and CLIP weights
    load unchanged; only the boundary predictor is new.
    token_layout: 'varlen' runs the shortened layers on the real tokens only, each image attending to
    itself (see varlen.py), so wall-clock and memory follow the pooled token count; 'padded' pads
    every image to the longest and masks the padded keys (the reference path, kept to check against).
    boundary_predictor: 'gumbel' or 'entropy' (module docstring); entropy_levels, spikes_left: the
    entropy targets' colour bins per channel and spike width (`NextPatchEntropy`). Entropy boundaries
    fall where the spikes do (about a third of the patches with spikes_left 2), not at `compression`.
    """

    BOUNDARY_PREDICTORS = ("gumbel", "entropy")
    fresh_parameter_prefixes = ("boundary_predictor.", "entropy_predictor.")
    has_aux_loss = True  # the boundary loss
    mergeable = False  # it pools its own tokens into variable-length segments
    TOKEN_LAYOUTS = ("varlen", "padded")

    def __init__(self, compression: float = 0.25, pre_layers: int = 2, temperature: float = 0.5,
                 threshold: float = 0.5, eval_boundaries: str = "expected", predictor_hidden_dim=None,
                 token_layout: str = "varlen", boundary_predictor: str = "gumbel", entropy_levels: int = 4,
                 spikes_left: int = 2, global_pool: str = "avg", **kwargs):
        super().__init__(global_pool=global_pool, **kwargs)
        if not 0 < pre_layers < len(self.blocks):
            raise ValueError(f"pre_layers must be in [1, depth - 1] = [1, {len(self.blocks) - 1}], got {pre_layers}")
        self.pre_layers = pre_layers
        if token_layout not in self.TOKEN_LAYOUTS:
            raise ValueError(f"token_layout must be one of {self.TOKEN_LAYOUTS}, got {token_layout!r}")
        self.token_layout = token_layout
        for block in self.blocks[pre_layers:]:  # the shortened blocks read a VarlenBatch as their mask
            hook_attention(block.attn)
        hidden = predictor_hidden_dim or self.blocks[0].mlp.fc1.out_features
        if boundary_predictor not in self.BOUNDARY_PREDICTORS:
            raise ValueError(f"boundary_predictor must be one of {self.BOUNDARY_PREDICTORS}, "
                             f"got {boundary_predictor!r}")
        self.boundary_kind = boundary_predictor
        self.boundary_predictor = BoundaryPredictor(
            self.embed_dim, hidden, compression, temperature, threshold,
            "threshold" if boundary_predictor == "entropy" else eval_boundaries)
        if boundary_predictor == "entropy":
            self.entropy_predictor = NextPatchEntropy(self.embed_dim, hidden, self.patch_embed.patch_size,
                                                      entropy_levels, spikes_left)

    @property
    def shortened_layers(self) -> int:
        return len(self.blocks) - self.pre_layers

    def group_matcher(self, coarse: bool = False):
        """The predictor is grouped with the last pre-layer, so layer-wise locking covers it."""
        matcher = super().group_matcher(coarse)
        matcher["blocks"] = [(r"^blocks\.(\d+)", None),
                             (r"^boundary_predictor", (self.pre_layers - 1,)),
                             (r"^norm", (99999,))]
        return matcher

    def _run_block(self, block, x, attn_mask=None):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, attn_mask=attn_mask, use_reentrant=False)
        return block(x, attn_mask=attn_mask)

    @property
    def grid_layers(self) -> int:
        return self.pre_layers

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] == 0:
            raise ValueError("DTP-ViT got an empty batch (0 images): expected at least one image")
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(images))))

    def _pool_segments(self, x: torch.Tensor):
        """Tokens after the pre-layers -> (prefix + segment tokens, their token_mask [B, N], boundaries [B, L],
        tokens per image as a list). Reading the segment counts is the forward's one host sync."""
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        logits = self.boundary_predictor.logits(patches)
        if self.boundary_kind == "entropy":  # the reference's rule: p > threshold, no gradient through pooling
            boundaries = (torch.sigmoid(logits) > self.boundary_predictor.threshold).float()
        else:
            boundaries = self.boundary_predictor.decide(logits)
        host_counts = count_segments(boundaries).tolist()
        segments, segment_mask = segment_pool(patches, boundaries, max(host_counts))
        token_mask = torch.cat([segment_mask.new_ones(prefix.shape[:2]), segment_mask], dim=1)
        host_lengths = [count + self.num_prefix_tokens for count in host_counts]
        return torch.cat([prefix, segments], dim=1), token_mask, boundaries, host_lengths, logits

    def forward_pooled(self, images: torch.Tensor) -> Pooled:
        embedded = x = self._embed(images)
        for block in self.blocks[: self.pre_layers]:
            x = self._run_block(block, x)
        x, token_mask, boundaries, host_lengths, logits = self._pool_segments(x)
        return Pooled(self._forward_shortened(x, token_mask, host_lengths)[0], token_mask, boundaries, logits, embedded)

    def _forward_shortened(self, x: torch.Tensor, token_mask: torch.Tensor, host_lengths: list, taps=(),
                           norm_taps: bool = False, stop: int = None):
        """The blocks after pooling (up to `stop`) + final norm: (tokens [B, N, D] with padding zeroed,
        {block index in `taps`: its tokens, likewise}).

        'varlen' runs them on the real tokens as one flat run (varlen.py); 'padded' on the padded batch with
        padded keys masked (padded queries stay finite and are zeroed on the way out).
        """
        batch, seq_len = token_mask.shape
        if self.token_layout == "varlen":
            layout = VarlenBatch.plan(token_mask.sum(1), host_lengths, seq_len)
            state, attn_mask = layout.pack(x), layout

            def padded(rows):
                return layout.unpack(rows, batch, seq_len)
        else:
            state, attn_mask = x, token_mask[:, None, None, :]

            def padded(tokens):
                return tokens * token_mask.unsqueeze(-1).to(tokens.dtype)
        taken = {}
        stop = len(self.blocks) if stop is None else stop
        for index in range(self.pre_layers, stop):
            state = self._run_block(self.blocks[index], state, attn_mask)
            if index in taps:
                taken[index] = padded(self.norm(state) if norm_taps else state)
        return padded(self.norm(state)), taken

    def forward_intermediates(self, x: torch.Tensor, indices=None, return_prefix_tokens: bool = False,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, output_dict: bool = False):
        """timm's per-block features, true to the pooling (timm's signature and outputs).

        Blocks before the pooling give the patch grid (NCHW or NLC); blocks after it give the segment tokens,
        padded with zeros to the image with the most (NLC only: no grid). With `output_dict=True`,
        'image_intermediates_mask' holds each one's [B, N] mask (True = a real token). The final features
        equal `encode().tokens`, so `forward_head` of them equals `encode().pooled` (open_clip's
        `CLIP.forward_intermediates` image features equal `encode_image`).
        """
        take = self.check_feature_format(indices, output_fmt)
        stop = max(take) + 1 if stop_early else len(self.blocks)
        taken, masks = {}, {}
        tokens = self._embed(x)
        for index in range(min(stop, self.pre_layers)):
            tokens = self._run_block(self.blocks[index], tokens)
            if index in take:
                taken[index] = self.norm(tokens) if norm else tokens
        if stop > self.pre_layers:
            tokens, token_mask, _, host_lengths, _ = self._pool_segments(tokens)
            tokens, shortened = self._forward_shortened(tokens, token_mask, host_lengths, take, norm, stop)
            taken.update(shortened)
            masks.update(dict.fromkeys(shortened, token_mask))
        else:
            tokens = self.norm(tokens)
        return self.assemble_intermediates(x, take, taken, masks, tokens, return_prefix_tokens, output_fmt,
                                           intermediates_only, output_dict)

    def forward_features(self, images: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("DTP-ViT masks attention itself (per image, after pooling): attn_mask / is_causal "
                             "cannot be given")
        return self.forward_pooled(images)[0]

    def pool(self, x: torch.Tensor, pool_type=None, token_mask=None) -> torch.Tensor:
        """timm's pooling, with 'avg' over the real tokens only. Without a mask (timm's and open_clip's
        `forward_head(forward_features(x))`) it is read off the tokens: padding holds exact zeros, a real
        token after the final norm never does."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type in ("token", ""):
            return super().pool(x, pool_type)
        if token_mask is None:
            token_mask = x.ne(0).any(-1)
        if pool_type != "avg":
            raise ValueError(f"DTP-ViT pools with 'avg' or 'token' over variable-length tokens, got {pool_type!r}")
        mask = token_mask[:, self.num_prefix_tokens:, None].to(x.dtype)
        return (x[:, self.num_prefix_tokens:] * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, token_mask=None) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x, token_mask=token_mask)))
        return x if pre_logits else self.head(x)

    def boundary_loss(self, out: Pooled, images: torch.Tensor):
        """(aux loss, extra stats): the binomial prior loss (gumbel), or BCE to the entropy spikes plus the
        entropy head's own loss (entropy; the reference's BCEWithLogitsLoss, here on the logits, where the
        reference hands it probabilities)."""
        if self.boundary_kind == "gumbel":
            return self.boundary_predictor.loss(out.boundaries), {}
        spikes, head_loss = self.entropy_predictor(out.embedded[:, self.num_prefix_tokens:], images)
        bce = F.binary_cross_entropy_with_logits(out.logits, spikes.float())
        return bce + head_loss, {"spike_ratio": spikes.float().mean(),
                                 "spike_accuracy": (out.boundaries.bool() == spikes).float().mean()}

    def encode(self, images: torch.Tensor) -> EncoderOutput:
        out = self.forward_pooled(images)
        hard = out.boundaries.detach()
        aux_loss, extra = self.boundary_loss(out, images)
        stats = {
            "boundary_ratio": hard.mean(),
            "boundaries_per_image": hard.sum(-1).mean(),
            "tokens_per_image": out.token_mask.sum(-1).to(hard.dtype).mean(),
            **extra,
        }
        pooled = self.forward_head(out.tokens, pre_logits=True, token_mask=out.token_mask)
        return EncoderOutput(out.tokens, out.token_mask, pooled, aux_loss, stats)

    @torch.no_grad()
    def token_groups(self, images: torch.Tensor):
        """(segment of each patch [B, H, W], boundaries [B, H, W]): a boundary closes its segment."""
        boundaries = self.forward_pooled(images)[2].long()
        grid = tuple(self.patch_embed.grid_size)
        return segment_ids(boundaries).view(-1, *grid), boundaries.view(-1, *grid)

    def set_reduction_strength(self, strength: float) -> None:
        """How much of its pooling the encoder does, 0 (none) to 1 (at its prior): a training schedule's knob
        (TrainConfig.reduction_anneal). Gumbel boundaries only: entropy boundaries fall at the spikes."""
        if self.boundary_kind != "gumbel":
            raise ValueError(f"DTP with {self.boundary_kind} boundaries has no boundary rate to anneal "
                             "(boundaries fall at the entropy spikes); anneal needs boundary_predictor='gumbel'")
        self.boundary_predictor.set_strength(strength)

    def settings(self) -> dict:
        if self.boundary_kind == "entropy":
            return {"boundary_predictor": "entropy", "pre_layers": self.pre_layers}
        return {"compression": self.boundary_predictor.prior, "pre_layers": self.pre_layers}


register_vit_family("dtp", DTPViT, "dtp_vit_{size}", "DTP-ViT-{tag}", feature_cfg=TOKEN_FEATURE_CFG,
                    variants={"": {}, **{k: {"compression": v} for k, v in COMPRESSIONS.items()},
                              "entropy": {"boundary_predictor": "entropy"}})
