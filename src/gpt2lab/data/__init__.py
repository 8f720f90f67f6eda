from gpt2lab.data.datamodule import GPTDataModule
from gpt2lab.data.prepare import HFDataset, TextFiles, TinyShakespeare, prepare
from gpt2lab.data.shards import ShardError, open_shard, write_shard
from gpt2lab.data.windows import TokenWindows, WindowLoader

__all__ = [
    "GPTDataModule",
    "HFDataset",
    "ShardError",
    "TextFiles",
    "TinyShakespeare",
    "TokenWindows",
    "WindowLoader",
    "open_shard",
    "prepare",
    "write_shard",
]
