"""DTP-ViT: a ViT that pools its patch tokens into a variable number of segments.

Dynamic token pooling after Nawrot et al. 2023, "Efficient Transformers with Dynamic Token
Pooling" (github.com/PiotrNawrot/dynamic-pooling), carried to ViTs as in the DTP-ViT / DRIP
CLIP runs: `pre_layers` full blocks, a boundary predictor on the patch tokens, segment-mean
pooling, then the remaining blocks over the shortened sequence.
"""
import math

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.distributions import Binomial, RelaxedBernoulli

from dtpclip.encoders.output import EncoderOutput
from dtpclip.encoders.packing import PackedRows
from dtpclip.encoders.vit import PlainViT, register_vit_family

# Named compression variants: suffix -> prior (fraction of patches that close a segment).
COMPRESSIONS = {"2x": 0.5, "4x": 0.25, "10x": 0.1}


class BoundaryPredictor(nn.Module):
    """p = sigmoid(MLP(x)) per patch; hard boundaries by a Gumbel-sigmoid with straight-through.

    Training: soft ~ RelaxedBernoulli(temperature, p), hard = soft > threshold, and the returned
    boundaries are hard in value with the gradient of soft. Eval (`eval_boundaries`):
      'expected'  each image keeps its round(sum p) most probable boundaries (the default);
      'threshold' hard = p > threshold (DTP's rule for a converged predictor);
      'sample'    the training-time sampling.
    'expected' is the default because it pools at the training rate even while p is unsure (README,
    Design decisions). The output bias starts at logit(prior), so an untrained model already pools
    at the target rate.
    """

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, D] -> boundaries [B, L] in {0, 1}."""
        logits = self.mlp(x).squeeze(-1)
        if self.training or self.eval_boundaries == "sample":
            soft = RelaxedBernoulli(torch.tensor(self.temperature, device=x.device), logits=logits).rsample()
            hard = (soft > self.threshold).to(soft.dtype)
            return hard - soft.detach() + soft
        probs = torch.sigmoid(logits)
        if self.eval_boundaries == "threshold":
            return (probs > self.threshold).to(logits.dtype)
        keep = probs.float().sum(-1, keepdim=True).round()  # [B, 1]
        rank = probs.argsort(-1, descending=True).argsort(-1)  # 0 = most probable
        return (rank < keep).to(logits.dtype)

    def loss(self, boundaries: torch.Tensor) -> torch.Tensor:
        """-log Binomial(L, prior)(number of boundaries) / L, averaged over images."""
        length = boundaries.shape[-1]
        prior = torch.tensor(self.prior, device=boundaries.device, dtype=torch.float32)
        binomial = Binomial(total_count=length, probs=prior, validate_args=False)
        return -binomial.log_prob(boundaries.float().sum(-1)).mean() / length


def segment_ids(boundaries: torch.Tensor) -> torch.Tensor:
    """boundaries [B, L] in {0, 1} -> segment id of each patch [B, L]: the exclusive cumsum (a boundary closes
    its segment)."""
    return boundaries.cumsum(-1) - boundaries


def segment_pool(tokens: torch.Tensor, boundaries: torch.Tensor):
    """Mean of each segment; a boundary closes its segment, the trailing open segment is kept.

    tokens [B, L, D], boundaries [B, L] -> segments [B, S, D], segment_mask [B, S] (S = most
    segments in the batch). Segment ids are the exclusive cumsum of the boundaries; the pooling
    weight of token l in slot s is 1 - (s - id_l) where they match, so the straight-through
    gradient of the boundaries reaches the predictor, as in the DTP reference.
    """
    ids = segment_ids(boundaries)  # [B, L]
    num_segments = ids[:, -1].detach() + 1  # [B]
    slots = torch.arange(int(num_segments.max()), device=tokens.device, dtype=boundaries.dtype)
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
    token_packing: run the shortened layers on packed rows of real tokens (see packing.py), so
    wall-clock and memory follow the pooled token count; False pads every image to the longest
    (the reference path, kept to check the packed one against).
    """

    fresh_parameter_prefixes = ("boundary_predictor.",)
    has_aux_loss = True  # the boundary loss
    mergeable = False  # it pools its own tokens into variable-length segments
    hidden_layers_readable = False  # the token set changes after `pre_layers`

    def __init__(self, compression: float = 0.25, pre_layers: int = 2, temperature: float = 0.5,
                 threshold: float = 0.5, eval_boundaries: str = "expected", predictor_hidden_dim=None,
                 token_packing: bool = True, global_pool: str = "avg", **kwargs):
        super().__init__(global_pool=global_pool, **kwargs)
        if not 0 < pre_layers < len(self.blocks):
            raise ValueError(f"pre_layers must be in [1, depth - 1] = [1, {len(self.blocks) - 1}], got {pre_layers}")
        self.pre_layers = pre_layers
        self.token_packing = token_packing
        hidden = predictor_hidden_dim or self.blocks[0].mlp.fc1.out_features
        self.boundary_predictor = BoundaryPredictor(
            self.embed_dim, hidden, compression, temperature, threshold, eval_boundaries)

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

    def forward_pooled(self, images: torch.Tensor):
        """images -> (tokens [B, N, D] with padding zeroed, token_mask [B, N], boundaries [B, L])."""
        if images.shape[0] == 0:
            raise ValueError("DTP-ViT got an empty batch (0 images): expected at least one image")
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(images))))
        for block in self.blocks[: self.pre_layers]:
            x = self._run_block(block, x)
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        boundaries = self.boundary_predictor(patches)
        segments, segment_mask = segment_pool(patches, boundaries)
        x = torch.cat([prefix, segments], dim=1)
        token_mask = torch.cat([segment_mask.new_ones(prefix.shape[:2]), segment_mask], dim=1)
        if self.token_packing:
            x = self._forward_packed(x, token_mask)
        else:
            attn_mask = token_mask[:, None, None, :]  # keys only: padded queries stay finite
            for block in self.blocks[self.pre_layers:]:
                x = self._run_block(block, x, attn_mask)
            x = self.norm(x) * token_mask.unsqueeze(-1).to(x.dtype)
        return x, token_mask, boundaries

    def _forward_packed(self, x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Shortened layers + final norm over packed rows about as long as the unpooled sequence."""
        batch, seq_len = token_mask.shape
        layout = PackedRows.plan(token_mask.sum(1), seq_len, self.patch_embed.num_patches + self.num_prefix_tokens)
        rows = layout.pack(x)
        for block in self.blocks[self.pre_layers:]:
            rows = self._run_block(block, rows, layout.attn_mask)
        return layout.unpack(self.norm(rows), batch, seq_len)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_pooled(images)[0]

    def pool(self, x: torch.Tensor, pool_type=None, token_mask=None) -> torch.Tensor:
        """timm's pooling, with 'avg' restricted to real tokens when a mask is given."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if token_mask is None or pool_type in ("token", ""):
            return super().pool(x, pool_type)
        if pool_type != "avg":
            raise ValueError(f"DTP-ViT pools with 'avg' or 'token' over variable-length tokens, got {pool_type!r}")
        mask = token_mask[:, self.num_prefix_tokens:, None].to(x.dtype)
        return (x[:, self.num_prefix_tokens:] * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, token_mask=None) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x, token_mask=token_mask)))
        return x if pre_logits else self.head(x)

    def encode(self, images: torch.Tensor) -> EncoderOutput:
        tokens, token_mask, boundaries = self.forward_pooled(images)
        hard = boundaries.detach()
        stats = {
            "boundary_ratio": hard.mean(),
            "boundaries_per_image": hard.sum(-1).mean(),
            "tokens_per_image": token_mask.sum(-1).to(hard.dtype).mean(),
        }
        pooled = self.forward_head(tokens, pre_logits=True, token_mask=token_mask)
        return EncoderOutput(tokens, token_mask, pooled, self.boundary_predictor.loss(boundaries), stats)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.warn_if_aux_loss_dropped()
        return self.head(self.encode(images).pooled)

    @torch.no_grad()
    def token_groups(self, images: torch.Tensor):
        """(segment of each patch [B, H, W], boundaries [B, H, W]): a boundary closes its segment."""
        boundaries = self.forward_pooled(images)[2].long()
        grid = tuple(self.patch_embed.grid_size)
        return segment_ids(boundaries).view(-1, *grid), boundaries.view(-1, *grid)

    def settings(self) -> dict:
        return {"compression": self.boundary_predictor.prior, "pre_layers": self.pre_layers}


register_vit_family("dtp", DTPViT, "dtp_vit_{size}", "DTP-ViT-{tag}",
                    variants={"": {}, **{k: {"compression": v} for k, v in COMPRESSIONS.items()}})
