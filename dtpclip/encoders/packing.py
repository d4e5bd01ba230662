"""Sequence packing: variable-length token sequences run as full rows with block-diagonal attention.

After DTP pools, each image keeps a different number of tokens. Padding every image to the
longest spends the saved FLOPs on padding; instead, whole images are placed one after another
into rows and attention is masked block-diagonally, so images never see each other (Dehghani et
al. 2023, "Patch n' Pack: NaViT"). Rows are as many as `max_row_len` tokens need; images go,
longest first, to the emptiest row (greedy balanced partition), so rows end up nearly equal and
the capacity (the fullest row) wastes few slots. One image is one row of exactly its length.
The rows are an ordinary [R, C, D] batch with a boolean attention mask, so timm's unmodified
blocks (and anything that patches them) run on them.
"""
import heapq
from dataclasses import dataclass

import torch


@dataclass
class PackedRows:
    """Where each real token of a padded batch [B, N, D] sits in packed rows [R, C, D]."""

    source: torch.Tensor  # [T] flat index into the padded batch (b * N + n) of each real token
    target: torch.Tensor  # [T] flat index into the rows (r * C + c) of the same token
    attn_mask: torch.Tensor  # [R, 1, C, C] bool: True where query and key belong to the same image
    rows: int
    capacity: int

    @classmethod
    def plan(cls, lengths: torch.Tensor, seq_len: int, max_row_len: int) -> "PackedRows":
        """lengths [B]: real tokens of each image, at the front of its padded row of `seq_len`."""
        device = lengths.device
        host_lengths = lengths.tolist()  # one host sync; the partition is a few µs of Python
        rows = max(1, -(-sum(host_lengths) // max(max_row_len, max(host_lengths))))
        fills = [(0, row) for row in range(rows)]  # heap of (tokens so far, row)
        placed = [(0, 0)] * len(host_lengths)
        for image in sorted(range(len(host_lengths)), key=lambda i: -host_lengths[i]):
            fill, row = heapq.heappop(fills)
            placed[image] = (row, fill)
            heapq.heappush(fills, (fill + host_lengths[image], row))
        capacity = max(fill for fill, _ in fills)
        starts = [row * capacity + offset for row, offset in placed]
        image_of_token = torch.repeat_interleave(torch.arange(len(host_lengths), device=device), lengths)
        first_token = torch.cumsum(lengths, 0) - lengths
        rank = torch.arange(image_of_token.numel(), device=device) - first_token[image_of_token]
        source = image_of_token * seq_len + rank
        target = torch.tensor(starts, device=device)[image_of_token] + rank
        # Empty slots get ids of their own, so each attends only to itself and stays finite.
        owner = -1 - torch.arange(rows * capacity, device=device)
        owner = owner.index_copy(0, target, image_of_token).view(rows, capacity)
        attn_mask = (owner.unsqueeze(2) == owner.unsqueeze(1)).unsqueeze(1)
        return cls(source, target, attn_mask, rows, capacity)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [R, C, D]; padding is dropped, empty slots are zeros."""
        flat = padded.reshape(-1, padded.shape[-1])
        rows = flat.new_zeros(self.rows * self.capacity, flat.shape[-1])
        return rows.index_copy(0, self.target, flat[self.source]).view(self.rows, self.capacity, -1)

    def unpack(self, rows: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
        """[R, C, D] -> [B, N, D] with zeros at padded positions."""
        flat = rows.reshape(-1, rows.shape[-1])
        padded = flat.new_zeros(batch * seq_len, flat.shape[-1])
        return padded.index_copy(0, self.source, flat[self.target]).view(batch, seq_len, -1)
