import logging
from pathlib import Path

import lightning as L
import numpy as np

from gpt2lab import tokenizer
from gpt2lab.data.prepare import TRAIN_TOKEN_COUNTS, prepare
from gpt2lab.data.shards import ShardError, open_shard
from gpt2lab.data.windows import TokenWindows, WindowLoader
from gpt2lab.errors import ConfigError

log = logging.getLogger(__name__)


# the shard names of each split: ours and build-nanogpt's / modded-nanogpt's (`fineweb_train_000001.bin`), then
# llm.c's own Tiny Shakespeare and TinyStories files (`tiny_shakespeare_train.bin`)
SHARD_PATTERNS = ("*{split}_*.bin", "*_{split}.bin")


def micro_batches_per_step(total_batch_size: int | None, batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-batches per optimizer step (gradient accumulation) so that each step sees total_batch_size tokens."""
    tokens_per_micro_batch = batch_size * seq_len * world_size
    if total_batch_size is None:
        return 1
    if total_batch_size % tokens_per_micro_batch:
        raise ConfigError(
            f"train.total_batch_size={total_batch_size} is not divisible by data.batch_size × data.seq_len × "
            f"world size = {batch_size} × {seq_len} × {world_size} = {tokens_per_micro_batch}: "
            "make it a multiple, or set train.total_batch_size=null for one micro-batch per step"
        )
    return total_batch_size // tokens_per_micro_batch


class GPTDataModule(L.LightningDataModule):
    """Serves shifted token windows from the shards of one data set, preparing them first if they are
    missing: a train batch is the micro-batches of one optimizer step, x and y each (A, B, T); a val batch is
    one (B, T). The train loader's position is saved in every checkpoint."""

    def __init__(
        self,
        source,
        data_dir: str,
        batch_size: int,
        seq_len: int,
        total_batch_size: int | None,
        shuffle: bool,
        seed: int,
        val_batches: int,
        num_workers: int,
        debug_batches: bool,
        prepare: dict,
    ):
        """`source` (None: the shards are already there, e.g. made by llm.c) is tokenized into `data_dir` when
        its shards are missing, with the settings `prepare` (gpt2lab.data.prepare's keyword arguments)."""
        super().__init__()
        # one process of the whole job prepares, the others wait: nodes share the data dir (as they share the run
        # dir), and two nodes preparing it at once would delete and write each other's shards
        self.prepare_data_per_node = False
        self.source, self.data_dir, self.prepare_settings = source, Path(data_dir), dict(prepare)
        self.batch_size, self.seq_len, self.total_batch_size = batch_size, seq_len, total_batch_size
        self.micro_batches = 1  # per optimizer step: known in setup, from the world size
        self.shuffle_seed = seed if shuffle else None
        self.val_batches, self.num_workers, self.debug_batches = val_batches, num_workers, debug_batches

    def prepare_data(self) -> None:
        # Lightning calls this on global rank 0 only (the others wait), before setup on every rank
        if self.source is not None:
            prepare(self.source, self.data_dir, **self.prepare_settings)

    def train_token_counts(self) -> np.ndarray | None:
        """How often each token id occurs in the train split, as counted by prepare (None for shards made
        elsewhere)."""
        path = self.data_dir / TRAIN_TOKEN_COUNTS
        return np.load(path) if path.exists() else None

    def windows(self, split: str, shuffle_seed: int | None = None) -> TokenWindows:
        patterns = [p.format(split=split) for p in SHARD_PATTERNS]
        paths = sorted({p for pattern in patterns for p in self.data_dir.glob(pattern)})
        if not paths:
            if not self.data_dir.is_dir():
                problem = "does not exist"
            elif not any(self.data_dir.iterdir()):
                problem = "is empty"
            else:
                problem = f"holds no {split} shards (looked for {' and '.join(patterns)})"
            raise ShardError(
                f"data dir {self.data_dir} {problem}: prepare it with `python scripts/prepare_data.py "
                "data=<name>`, or point data.data_dir at a directory of token shards"
            )
        shards = [open_shard(p, tokenizer.VOCAB_SIZE) for p in paths]
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return TokenWindows(shards, self.batch_size, self.seq_len, rank, world_size, shuffle_seed)

    @property
    def tokens_per_step(self) -> int:
        world_size = self.trainer.world_size if self.trainer else 1
        return self.micro_batches * self.batch_size * self.seq_len * world_size

    def setup(self, stage: str) -> None:
        if stage == "fit":
            world_size = self.trainer.world_size if self.trainer else 1
            self.micro_batches = micro_batches_per_step(
                self.total_batch_size, self.batch_size, self.seq_len, world_size
            )
            log.info("gradient accumulation: %d micro-batches a step (world size %d)", self.micro_batches, world_size)
            train = self.windows("train", self.shuffle_seed)
            self.train_loader = self._loader(train, micro_batches=self.micro_batches, debug=self.debug_batches)
        # the same first batches at every validation (the loader restarts each pass), so val/loss is
        # comparable across steps and runs
        self._val_loader = self._loader(self.windows("val"), max_batches=self.val_batches, resume=False)

    def _loader(self, windows: TokenWindows, **kwargs) -> WindowLoader:
        pin = self.trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
        return WindowLoader(windows, self.num_workers, pin_memory=pin, **kwargs)

    def train_dataloader(self) -> WindowLoader:
        return self.train_loader

    def val_loader(self) -> WindowLoader:
        """Not Lightning's val_dataloader: GPTModule validates within its optimizer step, when it is due."""
        return self._val_loader
