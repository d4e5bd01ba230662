"""DynamicViT: a ViT that prunes its patch tokens in stages with learned keep decisions.

Rao et al. 2021, "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification"
(github.com/raoyongming/DynamicViT, `vit.py` and `losses.py`), as its reference does it:

- A prediction module (`PredictorLG`) before each pruning block (default 1/4, 1/2, 3/4 of the depth:
  blocks 3, 6, 9 of 12): LayerNorm, Linear, GELU; the first half of the channels stays per token, the
  second half is averaged over the tokens still kept; then an MLP (D -> D/2 -> D/4 -> 2) and a
  log-softmax over (keep, drop).
- Training: hard keep decisions by Gumbel-softmax (straight-through), multiplied into the previous
  ones; every later block's attention gives dropped keys weight 0 (except each token's own key, so
  no row is empty) through the reference's explicit policy softmax, so the task loss's gradient
  reaches the decisions. The tokens stay in place; their count is fixed in training.
- Inference: each stage keeps the int(N * rho^s) highest-scoring patches (s = 1, 2, 3) by top-k and
  gathers them, so every image of a batch keeps the same count and later blocks cost what the kept
  tokens cost.
- `aux_loss` is the ratio loss, ratio_weight * sum_s mean_b (kept fraction_b,s - rho^s)^2 / stages
  (ratio_weight 2, as the reference).
- Distillation, where a pipeline is given a teacher: the teacher-logit term is the pipeline's own (CLIP's
  similarity KD, classify's KD / DKD); `token_distill_loss` is the reference's token term for its DeiT
  models (`mse_token=True`): the mean squared error between the student's and the teacher's final-norm patch
  tokens at the patches kept to the end, weighted by token_distill_weight (0.5, its distill_weight). The
  rows are selected by the detached decision, as the reference's; the decisions learn from it through
  attention only.

The blocks are the plain ViT's, so plain ViT and CLIP weights load unchanged; only the predictors are
new. With rho = 1 every token is kept and the outputs equal the plain ViT's.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dtpclip.encoders.attention import hook_attention
from dtpclip.encoders.output import EncoderOutput
from dtpclip.encoders.vit import TOKEN_FEATURE_CFG, PlainViT, register_vit_family

KEEP_RATES = {"rho05": 0.5, "rho07": 0.7, "rho09": 0.9}


class PredictorLG(nn.Module):
    """Keep / drop log-probabilities [B, N, 2] of tokens [B, N, D] given the previous decisions [B, N, 1]."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor, decision: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        local, shared = x.chunk(2, dim=-1)
        # clamped: an image whose every patch was dropped gets 0, not the reference's 0 / 0 = NaN
        shared = (shared * decision).sum(1, keepdim=True) / decision.sum(1, keepdim=True).clamp_min(1.0)
        return self.out_conv(torch.cat([local, shared.expand_as(local)], dim=-1))


@dataclass
class KeepPolicy:
    """Training-time attention mask object (see attention.py): keys whose policy is 0 get weight 0, as the
    reference's `softmax_with_policy` (fp32, eps 1e-6), with the policy's gradient. `dense` (a quantized or
    explicit attention) goes unused: DynamicViT is not quantizable."""

    policy: torch.Tensor  # [B, N] keep decisions, prefix tokens 1

    def attention(self, q, k, v, dropout_p: float = 0.0, dense=None, eps: float = 1e-6):
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        n = scores.shape[-1]
        keys = self.policy[:, None, None, :].float()
        keys = keys + (1.0 - keys) * torch.eye(n, device=q.device)  # a token always sees itself
        weights = (scores - scores.amax(-1, keepdim=True)).float().exp() * keys
        weights = ((weights + eps / n) / (weights.sum(-1, keepdim=True) + eps)).to(q.dtype)
        return F.dropout(weights, dropout_p) @ v


class DynamicViT(PlainViT):
    """keep_rate: rho, the fraction kept at each stage (rho, rho^2, rho^3 of the patches); pruning_loc: the
    blocks each stage's predictor runs before (None: 1/4, 1/2, 3/4 of the depth); ratio_weight: the ratio
    loss's weight inside `aux_loss`; token_distill_weight: the weight of `token_distill_loss`."""

    fresh_parameter_prefixes = ("score_predictor.",)
    has_aux_loss = True  # the ratio loss
    mergeable = False  # it prunes its own tokens
    quantizable = False  # training attention is the policy softmax, which the attention quantizers do not see

    def __init__(self, keep_rate: float = 0.7, pruning_loc=None, ratio_weight: float = 2.0,
                 token_distill_weight: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        depth = len(self.blocks)
        if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be a number in (0, 1], got {keep_rate!r}")
        self.pruning_loc = tuple(pruning_loc) if pruning_loc is not None else (depth // 4, depth // 2, 3 * depth // 4)
        if list(self.pruning_loc) != sorted(set(self.pruning_loc)) or not 0 < self.pruning_loc[0] <= depth - 1 \
                or self.pruning_loc[-1] > depth - 1:
            raise ValueError(f"pruning_loc must be increasing block indices in [1, {depth - 1}], got {pruning_loc}")
        self.keep_rate, self.ratio_weight = float(keep_rate), ratio_weight
        self.token_distill_weight = token_distill_weight
        self.keep_ratios = [self.keep_rate ** (stage + 1) for stage in range(len(self.pruning_loc))]
        self.score_predictor = nn.ModuleList(PredictorLG(self.embed_dim) for _ in self.pruning_loc)
        for block in self.blocks[self.pruning_loc[0]:]:  # they read a KeepPolicy as their mask in training
            hook_attention(block.attn)

    @property
    def grid_layers(self) -> int:
        return self.pruning_loc[0]

    def _forward_pruned(self, images: torch.Tensor):
        """(final-norm tokens [B, N, D], token mask [B, N], keep decisions per stage [B, L] (training), patch
        index of each remaining patch token [B, N - prefix])."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(images))))
        prefix, patches = self.num_prefix_tokens, self.patch_embed.num_patches
        decision = x.new_ones(x.shape[0], patches, 1)
        alive = torch.arange(patches, device=x.device).expand(x.shape[0], -1)
        policy, decisions, stage = None, [], 0
        for index, block in enumerate(self.blocks):
            if stage < len(self.pruning_loc) and index == self.pruning_loc[stage]:
                scores = self.score_predictor[stage](x[:, prefix:], decision).float()
                if self.training:
                    decision = F.gumbel_softmax(scores, hard=True)[..., :1].to(x.dtype) * decision
                    decisions.append(decision[..., 0])
                    policy = KeepPolicy(torch.cat([decision.new_ones(x.shape[0], prefix), decision[..., 0]], 1))
                elif int(patches * self.keep_ratios[stage]) < alive.shape[1]:
                    keep = torch.topk(scores[..., 0], max(1, int(patches * self.keep_ratios[stage])), dim=1).indices
                    kept = x[:, prefix:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
                    x = torch.cat([x[:, :prefix], kept], 1)
                    decision, alive = decision.gather(1, keep[..., None]), alive.gather(1, keep)
                stage += 1
            x = block(x, attn_mask=policy) if policy is not None else block(x)
        tokens = self.norm(x)
        if policy is None:
            return tokens, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), decisions, alive
        kept = policy.policy.detach() > 0.5  # the decisions learn through attention only, as the reference's
        return tokens * kept[..., None].to(tokens.dtype), kept, decisions, alive  # dropped: the contract's zeros

    def forward_features(self, images: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("DynamicViT masks attention itself: attn_mask / is_causal cannot be given")
        return self._forward_pruned(images)[0]

    def pool(self, x: torch.Tensor, pool_type=None, token_mask=None) -> torch.Tensor:
        """timm's pooling, with 'avg' over the kept tokens only (read off the zeros of dropped ones)."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type in ("token", ""):
            return super().pool(x, pool_type)
        if pool_type != "avg":
            raise ValueError(f"DynamicViT pools with 'avg' or 'token', got {pool_type!r}")
        kept = (x[:, self.num_prefix_tokens:].ne(0).any(-1, keepdim=True) if token_mask is None
                else token_mask[:, self.num_prefix_tokens:, None]).to(x.dtype)
        return (x[:, self.num_prefix_tokens:] * kept).sum(1) / kept.sum(1).clamp_min(1.0)

    def ratio_loss(self, decisions) -> torch.Tensor:
        """The reference's: ratio_weight * sum over stages of mean_b (kept fraction - target)^2 / stages."""
        loss = sum(((d.float().mean(1) - ratio) ** 2).mean() for d, ratio in zip(decisions, self.keep_ratios))
        return self.ratio_weight * loss / len(self.pruning_loc)

    def encode(self, images: torch.Tensor) -> EncoderOutput:
        tokens, mask, decisions, _ = self._forward_pruned(images)
        pooled = self.forward_head(tokens, pre_logits=True)
        aux = self.ratio_loss(decisions) if decisions else tokens.new_zeros(())
        kept = mask.float().sum(-1).mean()
        return EncoderOutput(tokens, mask, pooled, aux, {
            "keep_ratio": ((kept - self.num_prefix_tokens) / self.patch_embed.num_patches).detach(),
            "tokens_per_image": kept.detach()})

    def token_distill_loss(self, out: EncoderOutput, teacher_tokens: torch.Tensor) -> torch.Tensor:
        """The reference's token distillation (DeiT: MSE) of this training forward's `out` against a teacher's
        final-norm tokens [B, N, D] of the same images, over the patches kept to the end, times
        token_distill_weight; 0 when none is kept."""
        if teacher_tokens.shape != out.tokens.shape:
            raise ValueError(f"token distillation needs the teacher's tokens in the student's slots: expected "
                             f"{tuple(out.tokens.shape)} (a plain ViT teacher of the same patch grid and width, "
                             f"the student in training), got {tuple(teacher_tokens.shape)}")
        prefix = self.num_prefix_tokens
        kept = out.token_mask[:, prefix:].float()  # a masked mean, not boolean indexing: no host sync a step
        squared = (out.tokens[:, prefix:].float() - teacher_tokens[:, prefix:].float()).square().sum(-1)
        count = kept.sum() * out.tokens.shape[-1]
        return self.token_distill_weight * (squared * kept).sum() / count.clamp_min(1.0)

    @torch.no_grad()
    def token_groups(self, images: torch.Tensor):
        """(each patch kept to the end its own group, the pruned ones one group together [B, H, W], None), as
        inference prunes."""
        training = self.training
        self.eval()
        try:
            alive = self._forward_pruned(images)[3]
        finally:
            self.train(training)
        pruned = self.patch_embed.num_patches
        groups = torch.full((len(images), pruned), pruned, device=alive.device).scatter(1, alive, alive)
        return groups.view(-1, *self.patch_embed.grid_size), None

    def settings(self) -> dict:
        return {"keep_rate": self.keep_rate, "pruning_loc": list(self.pruning_loc)}


register_vit_family("dynamicvit", DynamicViT, "dynamicvit_{size}", "DynamicViT-{tag}", feature_cfg=TOKEN_FEATURE_CFG,
                    variants={"": {}, **{k: {"keep_rate": v} for k, v in KEEP_RATES.items()}})
