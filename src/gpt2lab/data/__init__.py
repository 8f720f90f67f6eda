from gpt2lab.data.datamodule import GPTDataModule
from gpt2lab.data.prepare import TinyShakespeare, prepare
from gpt2lab.data.shards import ShardError, open_shard, write_shard
from gpt2lab.data.windows import TokenWindows

__all__ = ["GPTDataModule", "ShardError", "TinyShakespeare", "TokenWindows", "open_shard", "prepare", "write_shard"]
