"""Sources → token shards: tokenize documents with GPT-2's BPE, each prefixed by <|endoftext|>,
split off validation, write shards, count which token ids the training split uses, and record it
all in a manifest so that preparing twice does nothing."""

import hashlib
import json
import logging
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tiktoken

from gpt2lab.data.shards import write_shard

log = logging.getLogger(__name__)

TOKENIZER = "gpt2"
MANIFEST = "manifest.json"
TRAIN_TOKEN_COUNTS = "train_token_counts.npy"


class TinyShakespeare:
    """karpathy/char-rnn's 1.1 MB of Shakespeare: downloaded once into the data dir, or copied from
    `local_copy` (a pre-seeded file, e.g. for offline machines and CI)."""

    def __init__(self, url: str, sha256: str, local_copy: str | None = None):
        self.url, self.sha256, self.local_copy = url, sha256, local_copy

    def describe(self) -> dict:
        return {"name": "tinyshakespeare", "sha256": self.sha256}

    def documents(self, data_dir: Path) -> Iterator[str]:
        path = data_dir / "input.txt"
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            if self.local_copy:
                log.info("copying Tiny Shakespeare from %s", self.local_copy)
                shutil.copyfile(self.local_copy, tmp)
            else:
                log.info("downloading Tiny Shakespeare from %s", self.url)
                try:
                    urllib.request.urlretrieve(self.url, tmp)
                except OSError as e:
                    raise RuntimeError(
                        f"could not download {self.url} ({e}): on an offline machine put a copy at {path} "
                        "or set GPT2LAB_TINYSHAKESPEARE=/path/to/input.txt"
                    ) from e
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
            if digest != self.sha256:
                tmp.unlink()
                raise RuntimeError(
                    f"Tiny Shakespeare from {self.local_copy or self.url} has sha256 {digest}, expected "
                    f"{self.sha256}: not the right file"
                )
            os.replace(tmp, path)
        yield path.read_text(encoding="utf-8")  # one document


def gpt2_encoding() -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding(TOKENIZER)
    except Exception as e:  # tiktoken downloads its BPE files on first use
        raise RuntimeError(
            f"could not load the GPT-2 BPE files ({type(e).__name__}): tiktoken downloads them once; on an "
            "offline machine point TIKTOKEN_CACHE_DIR at a directory that holds them"
        ) from e


def tokenize(documents: Iterator[str]) -> np.ndarray:
    """GPT-2 BPE ids of all documents, each prefixed with <|endoftext|> (the document delimiter)."""
    enc = gpt2_encoding()
    ids: list[int] = []
    for doc in documents:
        ids.append(enc.eot_token)
        ids.extend(enc.encode_ordinary(doc))
    return np.array(ids, dtype=np.uint16)


def prepare(source, data_dir: str | os.PathLike, val_fraction: float, shard_size: int) -> Path:
    """Tokenize `source` into `data_dir`, unless the manifest says it is already done with these settings.

    The last `val_fraction` of the token stream is validation (the convention for Tiny Shakespeare).
    """
    data_dir = Path(data_dir)
    settings = {
        "source": source.describe(),
        "tokenizer": TOKENIZER,
        "val_fraction": val_fraction,
        "shard_size": shard_size,
    }
    manifest_path = data_dir / MANIFEST
    if manifest_path.exists():
        done = json.loads(manifest_path.read_text())
        if done["settings"] == settings:
            return data_dir
        raise RuntimeError(
            f"{data_dir} was prepared with other settings ({done['settings']}, now {settings}): "
            f"delete {data_dir} to rebuild it, or point data.data_dir elsewhere"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    tokens = tokenize(source.documents(data_dir))
    n_val = int(len(tokens) * val_fraction)
    splits = {"train": tokens[: len(tokens) - n_val], "val": tokens[len(tokens) - n_val :]}
    for split, split_tokens in splits.items():
        for i, start in enumerate(range(0, len(split_tokens), shard_size)):
            write_shard(data_dir / f"{split}_{i:06d}.bin", split_tokens[start : start + shard_size])
    n_vocab = gpt2_encoding().n_vocab
    np.save(data_dir / TRAIN_TOKEN_COUNTS, np.bincount(splits["train"], minlength=n_vocab))
    # the manifest is written last: its presence means every shard is complete
    manifest = {"settings": settings, "tokens": {k: int(len(v)) for k, v in splits.items()}}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("prepared %s: %s", data_dir, manifest["tokens"])
    return data_dir
