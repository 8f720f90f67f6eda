import logging
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Subset

from gpt2lab.data.prepare import gpt2_encoding, prepare
from gpt2lab.data.shards import ShardError, open_shard
from gpt2lab.data.windows import TokenWindows

log = logging.getLogger(__name__)


class GPTDataModule(L.LightningDataModule):
    """Serves (x, y) batches of shifted token windows from the shards of one data set, preparing
    them first if they are missing."""

    def __init__(
        self,
        source,
        data_dir: str,
        batch_size: int,
        seq_len: int,
        val_fraction: float,
        shard_size: int,
        val_batches: int,
        num_workers: int,
    ):
        super().__init__()
        self.source, self.data_dir = source, Path(data_dir)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.val_fraction, self.shard_size = val_fraction, shard_size
        self.val_batches, self.num_workers = val_batches, num_workers

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node, before setup on every rank
        prepare(self.source, self.data_dir, self.val_fraction, self.shard_size)

    def windows(self, split: str) -> TokenWindows:
        paths = sorted(self.data_dir.glob(f"{split}_*.bin"))
        if not paths:
            raise ShardError(
                f"no {split}_*.bin shards in {self.data_dir}: run `python scripts/prepare_data.py` "
                "or check data.data_dir"
            )
        vocab_size = gpt2_encoding().n_vocab
        shards = [open_shard(p, vocab_size) for p in paths]
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return TokenWindows(shards, self.batch_size, self.seq_len, rank, world_size)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_windows = self.windows("train")
        if stage in ("fit", "validate"):
            val = self.windows("val")
            # always the same first batches, so val/loss is comparable across steps and runs
            self.val_windows = Subset(val, range(min(self.val_batches, len(val))))

    def _loader(self, dataset) -> DataLoader:
        # batch_size=None: each item already is a whole (B, T) batch
        pin = self.trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.num_workers, pin_memory=pin)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_windows)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_windows)
