"""The encoder contract's return type: the one seam between encoders and pipelines."""
from dataclasses import dataclass, field
from typing import Dict

import torch


@dataclass
class EncoderOutput:
    """What `encode(images)` returns for every registry encoder.

    tokens:     [B, N, D] final-norm tokens; prefix (CLS) tokens first, padded where N varies per image.
    token_mask: [B, N] bool, True = a real token; padded positions hold zeros.
    pooled:     [B, D] the trunk's pooled features (timm's pre-logits).
    aux_loss:   scalar the method adds to the training loss (boundary loss, ...); 0 when none.
    stats:      detached 0-dim tensors to log (boundary ratio, tokens kept, ...). Tensors, not floats,
                so the train step never syncs with the host; loggers call .item() when they write.
    """

    tokens: torch.Tensor
    token_mask: torch.Tensor
    pooled: torch.Tensor
    aux_loss: torch.Tensor
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def dense(cls, tokens: torch.Tensor, pooled: torch.Tensor) -> "EncoderOutput":
        """Output of an encoder whose every image keeps all its tokens."""
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return cls(tokens, mask, pooled, tokens.new_zeros(()), {})
