import logging
from pathlib import Path

import lightning as L
import numpy as np
from gpt2lab.data.prepare import TRAIN_TOKEN_COUNTS, gpt2_encoding, prepare
from gpt2lab.data.shards import ShardError, open_shard
from gpt2lab.data.windows import TokenWindows, WindowLoader

log = logging.getLogger(__name__)


class GPTDataModule(L.LightningDataModule):
    """Serves (x, y) batches of shifted token windows from the shards of one data set, preparing
    them first if they are missing. The train loader's position is saved in every checkpoint."""

    def __init__(
        self,
        source,
        data_dir: str,
        batch_size: int,
        seq_len: int,
        shuffle: bool,
        seed: int,
        val_batches: int,
        num_workers: int,
        debug_batches: bool,
        val_fraction: float | None,
        val_shards: int | None,
        shard_size: int,
        num_proc: int | None,
        rebuild: bool,
    ):
        super().__init__()
        self.source, self.data_dir = source, Path(data_dir)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.shuffle_seed = seed if shuffle else None
        self.val_batches, self.num_workers, self.debug_batches = val_batches, num_workers, debug_batches
        self.prepare_settings = dict(
            val_fraction=val_fraction, val_shards=val_shards, shard_size=shard_size, num_proc=num_proc, rebuild=rebuild
        )

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node, before setup on every rank
        if self.source is not None:  # None: the shards are already there (e.g. made by llm.c)
            prepare(self.source, self.data_dir, **self.prepare_settings)

    def train_token_counts(self) -> np.ndarray | None:
        """How often each token id occurs in the train split, as counted by prepare (None for shards made
        elsewhere)."""
        path = self.data_dir / TRAIN_TOKEN_COUNTS
        return np.load(path) if path.exists() else None

    def windows(self, split: str, shuffle_seed: int | None = None) -> TokenWindows:
        # `*train_*.bin` also matches llm.c's and build-nanogpt's names (fineweb_train_000001.bin)
        paths = sorted(self.data_dir.glob(f"*{split}_*.bin"))
        if not paths:
            if not self.data_dir.is_dir():
                problem = "does not exist"
            elif not any(self.data_dir.iterdir()):
                problem = "is empty"
            else:
                problem = f"holds no *{split}_*.bin shards"
            raise ShardError(
                f"data dir {self.data_dir} {problem}: prepare it with `python scripts/prepare_data.py "
                "data=<name>`, or point data.data_dir at a directory of token shards"
            )
        vocab_size = gpt2_encoding().n_vocab
        shards = [open_shard(p, vocab_size) for p in paths]
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return TokenWindows(shards, self.batch_size, self.seq_len, rank, world_size, shuffle_seed)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            accum = self.trainer.accumulate_grad_batches if self.trainer else 1
            train = self.windows("train", self.shuffle_seed)
            self.train_loader = self._loader(train, batches_per_step=accum, debug=self.debug_batches)
        if stage in ("fit", "validate"):
            # always the same first batches (every validation is one whole pass), so val/loss is
            # comparable across steps and runs
            self.val_loader = self._loader(self.windows("val"), max_batches=self.val_batches)

    def _loader(self, windows: TokenWindows, **kwargs) -> WindowLoader:
        pin = self.trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
        return WindowLoader(windows, self.num_workers, pin_memory=pin, **kwargs)

    def train_dataloader(self) -> WindowLoader:
        return self.train_loader

    def val_dataloader(self) -> WindowLoader:
        return self.val_loader
