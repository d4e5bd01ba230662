"""The multimodal model: a frozen registry encoder, a projector and a causal LM, after LLaVA's
`LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal` (haotian-liu/LLaVA, llava_arch.py).

Unlike LLaVA, where every image gives the same number of tokens, an encoder here may give each
image its own count (DTP-ViT pools into a variable number of segments; `token_mask` says which
are real). Each image's real tokens, and only those, are spliced at its `<image>` placeholder,
so the LM never sees a padding image token; sequences are then padded per sample: on the right for
training, on the left for generation (each prompt's last token at the end, where generation goes on).
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from llava_bridge.align_config import SELECT_FEATURES
from llava_bridge.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_bridge.projector import build_projector



class VisionTower(nn.Module):
    """Frozen registry encoder -> (features [B, N, D], mask [B, N]); always in eval mode.

    select_feature: 'patch' drops the prefix (CLS) tokens, 'cls_patch' keeps them (LLaVA's
    mm_vision_select_feature). select_layer (LLaVA's mm_vision_select_layer): -1 is the encoder
    contract's output (`encode(images).tokens`, final-normed); -k (k >= 2) is the output of the
    first depth + 1 - k blocks, before the final norm, as LLaVA reads CLIP's hidden_states[-k] (LLaVA-1.5:
    -2), for every family through timm's `forward_intermediates`: the tokens those blocks really hold
    (DTP: the pooled segments with their mask; ToMe: the merged tokens).
    """

    def __init__(self, encoder: nn.Module, select_layer: int = -1, select_feature: str = "patch"):
        super().__init__()
        if select_feature not in SELECT_FEATURES:
            raise ValueError(f"select_feature must be one of {SELECT_FEATURES}, got {select_feature!r}")
        depth = len(encoder.blocks)
        if not -depth <= select_layer <= -1:
            raise ValueError(f"select_layer must be in [-{depth}, -1] for a {depth}-block ViT, got {select_layer}")
        self.encoder, self.select_layer, self.select_feature = encoder, select_layer, select_feature
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: DTP's boundary sampling and dropout stay off

    @property
    def hidden_size(self) -> int:
        return self.encoder.embed_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.encoder.patch_embed.proj.weight.dtype)
        prefix = self.encoder.num_prefix_tokens
        if self.select_layer == -1:
            out = self.encoder.encode(images)
            tokens, mask = out.tokens, out.token_mask
        else:
            block = len(self.encoder.blocks) + self.select_layer  # the block whose output is hidden_states[-k]
            out = self.encoder.forward_intermediates(images, indices=[block], return_prefix_tokens=True,
                                                     output_fmt="NLC", intermediates_only=True, output_dict=True)
            patches, patch_mask = out["image_intermediates"][0], out["image_intermediates_mask"][0]
            prefix_tokens = out.get("image_intermediates_prefix", [patches[:, :0]])[0]
            tokens = torch.cat([prefix_tokens, patches], dim=1)
            mask = torch.cat([patch_mask.new_ones(prefix_tokens.shape[:2]), patch_mask], dim=1)
        if self.select_feature == "patch":
            tokens, mask = tokens[:, prefix:], mask[:, prefix:]
        return tokens, mask


@dataclass
class SplicedBatch:
    """What the LM receives: embeddings, attention mask and labels, padded per sample."""

    inputs_embeds: torch.Tensor  # [B, T, Dl]
    attention_mask: torch.Tensor  # [B, T] long, 1 = real
    labels: Optional[torch.Tensor]  # [B, T], IGNORE_INDEX on image, prompt and padding positions
    visual_counts: List[int]  # image tokens spliced into each sample (0 for text-only ones)


def splice_visual_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: Optional[torch.Tensor],
                         features: Optional[torch.Tensor], feature_mask: Optional[torch.Tensor],
                         embed_tokens: nn.Module, max_length: Optional[int] = None,
                         padding_side: str = "right") -> SplicedBatch:
    """Replace each sample's IMAGE_TOKEN_INDEX by its own image's real projected tokens.

    input_ids / attention_mask / labels [B, L] (text padded on either side); features [M, N, Dl] and
    feature_mask [M, N]: one entry per placeholder, in order of appearance over the batch
    (text-only samples have none). Sequences longer than `max_length` are cut, as LLaVA does; the
    result is padded on `padding_side`.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    rows, row_labels, counts, image = [], [], [], 0
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][attention_mask[b].bool()]
        lab = labels[b][attention_mask[b].bool()] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
        places = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        text = embed_tokens(ids.clamp_min(0))
        pieces, piece_labels, start, count = [], [], 0, 0
        for place in places:
            if features is None or image >= features.shape[0]:
                raise ValueError(f"sample {b} has an {IMAGE_TOKEN_INDEX} placeholder but the batch holds only "
                                 f"{0 if features is None else features.shape[0]} images")
            visual = features[image][feature_mask[image]]
            pieces += [text[start:place], visual]
            piece_labels += [lab[start:place], lab.new_full((visual.shape[0],), IGNORE_INDEX)]
            start, count, image = place + 1, count + visual.shape[0], image + 1
        pieces.append(text[start:])
        piece_labels.append(lab[start:])
        rows.append(torch.cat(pieces)[:max_length])
        row_labels.append(torch.cat(piece_labels)[:max_length])
        counts.append(count)
    if features is not None and image != features.shape[0]:
        raise ValueError(f"the batch holds {features.shape[0]} images but {image} {IMAGE_TOKEN_INDEX} placeholders")
    length = max(r.shape[0] for r in rows)
    embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=embeds.device)
    out_labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=embeds.device)
    for b, (row, lab) in enumerate(zip(rows, row_labels)):
        at = slice(length - row.shape[0], length) if padding_side == "left" else slice(0, row.shape[0])
        embeds[b, at], mask[b, at], out_labels[b, at] = row, 1, lab
    return SplicedBatch(embeds, mask, out_labels if labels is not None else None, counts)


class LlavaModel(nn.Module):
    """Vision tower -> projector -> spliced into the causal LM's input embeddings."""

    def __init__(self, vision_tower: VisionTower, lm: nn.Module, projector: str = "mlp2x_gelu",
                 max_length: Optional[int] = None):
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = build_projector(projector, vision_tower.hidden_size, lm.config.hidden_size)
        self.language_model = lm
        self.max_length = max_length

    def splice(self, input_ids, attention_mask, labels=None, images=None, padding_side: str = "right") -> SplicedBatch:
        features = mask = None
        if images is not None and images.shape[0]:
            tokens, mask = self.vision_tower(images)
            features = self.projector(tokens.to(self.projector_dtype))
        spliced = splice_visual_tokens(input_ids, attention_mask, labels, features, mask,
                                       self.language_model.get_input_embeddings(), self.max_length, padding_side)
        if features is None and self.training:  # a text-only batch: every rank's projector still gets a gradient
            dummy = self.projector(spliced.inputs_embeds.new_zeros(1, self.vision_tower.hidden_size))
            spliced.inputs_embeds = spliced.inputs_embeds + 0.0 * dummy.sum()
        return spliced

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def forward(self, input_ids, attention_mask, labels=None, images=None):
        """(logits [B, T, V], labels [B, T] aligned with them or None, visual token counts)."""
        spliced = self.splice(input_ids, attention_mask, labels, images)
        out = self.language_model(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                                  use_cache=False)
        return out.logits, spliced.labels, spliced.visual_counts

    @torch.no_grad()
    def generate(self, input_ids, images=None, attention_mask=None, max_new_tokens: int = 32,
                 **kwargs) -> torch.Tensor:
        """Continuation (new token ids only; greedy unless `kwargs` say otherwise) of prompts padded on either side
        (`attention_mask`; None: unpadded); after splicing they are left-padded, so each sample continues as it
        would alone."""
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        spliced = self.splice(input_ids, attention_mask, None, images, padding_side="left")
        return self.language_model.generate(inputs_embeds=spliced.inputs_embeds,
                                            attention_mask=spliced.attention_mask, max_new_tokens=max_new_tokens,
                                            **{"do_sample": False, **kwargs})
