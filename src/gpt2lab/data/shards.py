"""Token shards in the llm.c / modded-nanogpt layout: a header of 256 int32 (magic 20240520,
version 1, token count, then zeros), followed by the tokens as uint16.

Shards written by those projects' FineWeb scripts load here, and ours load there.
"""

import os
from pathlib import Path

import numpy as np

from gpt2lab.errors import DataError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.uint16  # GPT-2's 50257 ids fit below 2^16


class ShardError(DataError):
    """A shard that cannot be read; the message names the file and the fix."""


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write tokens to `path` atomically: a killed write never leaves a file that looks whole."""
    path = Path(path)
    if tokens.size and int(tokens.max()) >= 2**16:
        raise ValueError(f"token id {int(tokens.max())} does not fit in uint16 for shard {path.name}")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, VERSION, tokens.size)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.memmap:
    """Memory-map a shard's tokens after checking its header, its size and (optionally) its ids."""
    path = Path(path)
    fix = "re-run `python scripts/prepare_data.py` for this data set (or delete the shard)"
    if not path.is_file():
        raise ShardError(f"shard {path} does not exist: {fix}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"shard {path} has {size} bytes, less than its {HEADER_BYTES}-byte header: truncated; {fix}")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    magic, version, n_tokens = (int(v) for v in header[:3])
    if magic != MAGIC:
        raise ShardError(f"shard {path} has magic {magic} (expected {MAGIC}): not a token shard; {fix}")
    if version != VERSION:
        raise ShardError(f"shard {path} has version {version} (expected {VERSION}): unknown format; {fix}")
    expected = HEADER_BYTES + n_tokens * np.dtype(TOKEN_DTYPE).itemsize
    if size != expected:
        raise ShardError(
            f"shard {path} has {size} bytes but its header promises {n_tokens} tokens ({expected} bytes): "
            f"truncated or corrupt; {fix}"
        )
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
    if vocab_size is not None:
        # read in chunks (not through the map, whose touched pages would stay in this process's RSS), so
        # checking a 100M-token shard never holds it in memory at once
        chunk = 1 << 22
        itemsize = np.dtype(TOKEN_DTYPE).itemsize
        for start in range(0, n_tokens, chunk):
            offset = HEADER_BYTES + start * itemsize
            part = np.fromfile(path, dtype=TOKEN_DTYPE, count=min(chunk, n_tokens - start), offset=offset)
            top = int(part.max())
            if top >= vocab_size:
                raise ShardError(
                    f"shard {path} holds token id {top} >= vocab size {vocab_size}: written by another tokenizer; {fix}"
                )
    return tokens
