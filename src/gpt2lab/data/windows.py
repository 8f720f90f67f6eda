"""Batches of shifted token windows from memory-mapped shards.

A window is T+1 consecutive tokens of one shard: x is its first T, y its last T (each label is the
token to the right). Windows step by T and never cross a shard boundary, so B consecutive windows are
one contiguous slice `buf` of B·T+1 tokens and the batch is exactly the seed loader's
`buf[:-1].view(B, T)`, `buf[1:].view(B, T)`.

With W ranks, global batch g holds B·W consecutive windows and rank r takes its r-th run of B (the
split of a position-strided DDP loader). A shard yields floor((N-1) / (B·T·W)) global batches; the
tail that does not fill one is skipped, and after the last shard the order starts over.
"""

import bisect

import numpy as np
import torch
from torch.utils.data import Dataset


class TokenWindows(Dataset):
    def __init__(self, shards: list[np.ndarray], batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1):
        self.shards, self.B, self.T = shards, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        tokens_per_global_batch = batch_size * seq_len * world_size
        per_shard = [(len(s) - 1) // tokens_per_global_batch for s in shards]
        self.first_batch_of_shard = np.cumsum([0] + per_shard).tolist()
        if len(self) == 0:
            raise ValueError(
                f"{sum(len(s) for s in shards)} tokens in {len(shards)} shard(s) do not fill one batch of "
                f"B={batch_size} × T={seq_len} × {world_size} rank(s) + 1 tokens: "
                "lower data.batch_size or data.seq_len, or use more data"
            )

    def __len__(self) -> int:
        return self.first_batch_of_shard[-1]

    def __getitem__(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= g < len(self):
            raise IndexError(f"batch {g} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self.first_batch_of_shard, g) - 1
        global_batch_in_shard = g - self.first_batch_of_shard[shard]
        start = (global_batch_in_shard * self.world_size + self.rank) * self.B * self.T
        buf = torch.from_numpy(self.shards[shard][start : start + self.B * self.T + 1].astype(np.int64))
        x = buf[:-1].view(self.B, self.T)  # inputs
        y = buf[1:].view(self.B, self.T)  # targets: the next token of each input
        return x, y
