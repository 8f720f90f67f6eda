"""Batches of shifted token windows from memory-mapped shards, and the resumable loader that serves them.

A window is T+1 consecutive tokens of one shard: x is its first T, y its last T (each label is the
token to the right). Windows step by T and never cross a shard boundary: a window that straddles two
shards would join the end of one document stream to the start of another written at a different time,
and keeping each batch inside one shard keeps a batch one contiguous slice `buf` of B·T+1 tokens, exactly
the seed loader's `buf[:-1].view(B, T)`, `buf[1:].view(B, T)`.

With W ranks, global batch g holds B·W windows and rank r takes its r-th run of B (the split of a
position-strided DDP loader). A shard yields floor((N-1) / (B·T·W)) global batches; the tail that does
not fill one is skipped, and after the last shard a new pass (epoch) starts over.

Shuffled (`shuffle_seed` set), each pass visits the shards in a permuted order and, inside a shard,
the windows in a permuted order, both drawn from (seed, epoch): the same on every rank, different every
pass, and memory bounded by one shard's window count, not the corpus.
"""

import bisect
import hashlib
import itertools
import logging
import mmap
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gpt2lab.errors import DataError

log = logging.getLogger(__name__)


class TokenWindows(Dataset):
    """Global batch g (of epoch e, when shuffled) → this rank's (x, y), each (B, T) int64."""

    def __init__(
        self,
        shards: list[np.ndarray],
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_seed: int | None = None,
    ):
        self.shards, self.B, self.T = shards, batch_size, seq_len
        self.rank, self.world_size, self.shuffle_seed = rank, world_size, shuffle_seed
        self.windows_per_global_batch = batch_size * world_size
        self.batches_per_shard = [(len(s) - 1) // (self.windows_per_global_batch * seq_len) for s in shards]
        self.first_batch_of_shard = np.cumsum([0] + self.batches_per_shard).tolist()
        self._current_shard: int | None = None
        if len(self) == 0:
            raise DataError(
                f"{sum(len(s) for s in shards)} tokens in {len(shards)} shard(s) do not fill one batch of "
                f"B={batch_size} × T={seq_len} × {world_size} rank(s) + 1 tokens: "
                "lower data.batch_size or data.seq_len, or use more data"
            )

    def __len__(self) -> int:
        return self.first_batch_of_shard[-1]

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`index` is g, or (epoch, g) to pick the epoch's shuffled order."""
        epoch, g = index if isinstance(index, tuple) else (0, index)
        if not 0 <= g < len(self):
            raise IndexError(f"batch {g} out of range [0, {len(self)})")
        if self.shuffle_seed is None:
            return self._contiguous_batch(g)
        return self._shuffled_batch(epoch, g)

    def _enter(self, shard: int) -> None:
        """Release the pages of the shard read before this one from this process's memory map: they
        would otherwise count in its RSS until the end of the pass, which then grows with the corpus.
        (They stay in the page cache, so reading the shard again is no slower.)"""
        if shard != self._current_shard:
            previous, self._current_shard = self._current_shard, shard
            mapping = getattr(self.shards[previous], "_mmap", None) if previous is not None else None
            if mapping is not None:
                mapping.madvise(mmap.MADV_DONTNEED)

    def _contiguous_batch(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard = bisect.bisect_right(self.first_batch_of_shard, g) - 1
        self._enter(shard)
        global_batch_in_shard = g - self.first_batch_of_shard[shard]
        start = (global_batch_in_shard * self.world_size + self.rank) * self.B * self.T
        buf = torch.from_numpy(self.shards[shard][start : start + self.B * self.T + 1].astype(np.int64))
        x = buf[:-1].view(self.B, self.T)  # inputs
        y = buf[1:].view(self.B, self.T)  # targets: the next token of each input
        return x, y

    def _shuffled_batch(self, epoch: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        order = self._shard_order(epoch)
        first_batch = np.cumsum([0] + [self.batches_per_shard[s] for s in order]).tolist()
        i = bisect.bisect_right(first_batch, g) - 1
        shard = order[i]
        self._enter(shard)
        windows = self._window_order(epoch, shard)
        first_window = ((g - first_batch[i]) * self.world_size + self.rank) * self.B
        tokens = self.shards[shard]
        rows = [tokens[w * self.T : w * self.T + self.T + 1] for w in windows[first_window : first_window + self.B]]
        buf = np.stack(rows).astype(np.int64)  # (B, T+1)
        # copied by numpy: torch's copy of a small strided tensor can wait on its intra-op thread pool
        return torch.from_numpy(np.ascontiguousarray(buf[:, :-1])), torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))

    @lru_cache(maxsize=2)
    def _shard_order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.shuffle_seed, epoch]).permutation(len(self.shards)).tolist()

    @lru_cache(maxsize=2)
    def _window_order(self, epoch: int, shard: int) -> np.ndarray:
        # every full window of the shard, permuted; the ones past the last full global batch sit out this pass
        n_windows = (len(self.shards[shard]) - 1) // self.T
        return np.random.default_rng([self.shuffle_seed, epoch, shard]).permutation(n_windows)


class StepBatches(Dataset):
    """Optimizer step s (of epoch e) → its A micro-batches, global batches s·A .. s·A + A - 1, stacked: x and y
    each (A, B, T). A pass holds whole steps: the global batches past the last full step sit it out."""

    def __init__(self, windows: TokenWindows, micro_batches: int):
        self.windows, self.micro_batches = windows, micro_batches

    def __len__(self) -> int:
        return len(self.windows) // self.micro_batches

    def __getitem__(self, index: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, s = index
        xs, ys = zip(*(self.windows[epoch, s * self.micro_batches + i] for i in range(self.micro_batches)))
        return torch.stack(xs), torch.stack(ys)


class WindowLoader:
    """Iterates the batches of `windows`, pass after pass: with `micro_batches` A, one item per optimizer step
    (x, y each (A, B, T)); without, one global batch per item (x, y each (B, T)).

    With `resume` (the train loader), each `iter()` continues where the last stopped, and its state is that
    position (epoch, items served): Lightning stores the `state_dict()` of a train loader in every checkpoint
    and restores it on resume, so a resumed run is served exactly the steps the interrupted one would have
    seen next. Without (validation), every `iter()` starts at the first batch: each validation sees the same
    batches, however the last one ended.

    Not a DataLoader subclass on purpose: Lightning would replace its sampler with a DistributedSampler,
    but TokenWindows already gives each rank its own slice. It has a length (one pass), so Lightning does
    not prefetch a batch ahead of the training step, and the position counts exactly the steps trained on.
    """

    def __init__(
        self,
        windows: TokenWindows,
        num_workers: int = 0,
        pin_memory: bool = False,
        max_batches: int | None = None,
        micro_batches: int | None = None,
        resume: bool = True,
        debug: bool = False,
    ):
        self.windows, self.num_workers, self.pin_memory, self.debug = windows, num_workers, pin_memory, debug
        self.micro_batches, self.resume = micro_batches, resume
        self.items = windows if micro_batches is None else StepBatches(windows, micro_batches)
        self.length = len(self.items) if max_batches is None else min(max_batches, len(self.items))
        if self.length == 0:
            raise DataError(
                f"{len(windows)} batches a pass over the data do not fill one optimizer step of {micro_batches} "
                "micro-batches: lower train.total_batch_size, data.batch_size or data.seq_len, or use more data"
            )
        self.epoch, self.served = 0, 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        if not self.resume:
            self.epoch, self.served = 0, 0
        elif self.served >= len(self):  # a pass that ended exactly at a checkpoint
            self.epoch, self.served = self.epoch + 1, 0
        epoch, start = self.epoch, self.served
        order = zip(itertools.repeat(epoch), range(start, len(self)))  # lazy: a pass may be 10^6 batches
        loader = DataLoader(
            self.items, batch_size=None, sampler=order, num_workers=self.num_workers, pin_memory=self.pin_memory
        )
        for i, batch in enumerate(loader, start):
            self.served = i + 1  # counted before the step, as Lightning saves the state after it
            if self.debug:
                self._log_windows(batch, epoch, i)
            yield batch
        self.epoch, self.served = epoch + 1, 0

    def _log_windows(self, batch: tuple[torch.Tensor, torch.Tensor], epoch: int, i: int) -> None:
        if self.micro_batches is None:
            log.info("rank %d batch %s", self.windows.rank, describe_batch(batch, epoch, i))
            return
        for m, (x, y) in enumerate(zip(*batch)):  # one line per micro-batch: global batch i·A + m
            log.info("rank %d batch %s", self.windows.rank, describe_batch((x, y), epoch, i * self.micro_batches + m))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "served": self.served, "batches_per_epoch": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["batches_per_epoch"] != len(self):
            raise DataError(
                f"the checkpoint's train loader had {state['batches_per_epoch']} batches per pass, this run has "
                f"{len(self)}: the data, data.batch_size, data.seq_len, train.total_batch_size or the number of "
                "devices changed since; resume with the settings the checkpoint was trained with"
            )
        self.epoch, self.served = state["epoch"], state["served"]


def describe_batch(batch: tuple[torch.Tensor, torch.Tensor], epoch: int, g: int) -> str:
    """`epoch=E index=G windows=h1,h2,...`, a short hash of each window's inputs: enough to tell which
    windows two runs (or two ranks) saw."""
    x, _ = batch
    hashes = [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:10] for row in x]
    return f"epoch={epoch} index={g} windows={','.join(hashes)}"
