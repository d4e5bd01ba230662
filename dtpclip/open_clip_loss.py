"""An open_clip loss plus the encoders' aux losses, for training loops that call only `forward()` (open_clip_train).

The encoders hand each training forward's `encode()` output to `collecting_aux_losses` (dtpclip.encoders.vit);
`WithAuxLoss` adds their aux losses to the loss dict open_clip_train sums, backpropagates and logs.
"""
import logging
from typing import Dict, List

import torch
import torch.nn as nn

from dtpclip.encoders.output import EncoderOutput

log = logging.getLogger(__name__)


class WithAuxLoss(nn.Module):
    """`loss` (an open_clip loss called with output_dict=True) plus `weight` x the aux losses of the encoder
    outputs handed to `handed` since the last call, as "aux_loss"; their stats are averaged and logged every
    `log_every` calls when `log`."""

    def __init__(self, loss: nn.Module, handed: List[EncoderOutput], weight: float, log_every: int, log: bool):
        super().__init__()
        self.loss, self.handed, self.weight = loss, handed, weight
        self.log_every, self.log = max(1, log_every), log
        self.stat_sums: Dict[str, torch.Tensor] = {}
        self.outputs_seen = self.calls = 0

    @classmethod
    def for_run(cls, loss: nn.Module, handed: List[EncoderOutput], weight: float, args) -> "WithAuxLoss":
        """For an open_clip_train run: its logging interval (in loss calls) and only its master rank logs."""
        from open_clip_train.distributed import is_master
        return cls(loss, handed, weight, args.log_every_n_steps * args.accum_freq, is_master(args))

    def forward(self, **kwargs) -> Dict[str, torch.Tensor]:
        losses = self.loss(**kwargs)
        if not isinstance(losses, dict):
            raise TypeError("the aux loss joins open_clip's loss dict: call the loss with output_dict=True, "
                            "as open_clip_train does")
        outputs, self.handed[:] = list(self.handed), []
        if outputs:
            losses["aux_loss"] = self.weight * torch.stack([out.aux_loss for out in outputs]).sum()
            self._track(outputs)
        return losses

    def _track(self, outputs: List[EncoderOutput]) -> None:
        for out in outputs:
            for key, value in out.stats.items():
                self.stat_sums[key] = self.stat_sums.get(key, 0.0) + value.detach().float()
        self.outputs_seen += len(outputs)
        self.calls += 1
        if self.calls % self.log_every == 0:
            if self.log and self.stat_sums:
                log.info("encoder stats: " + "  ".join(f"{key}: {(total / self.outputs_seen).item():.4g}"
                                                       for key, total in self.stat_sums.items()))
            self.stat_sums, self.outputs_seen = {}, 0
