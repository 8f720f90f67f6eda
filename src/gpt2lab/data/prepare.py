"""Sources → token shards: tokenize documents with GPT-2's BPE, each prefixed by <|endoftext|>, in a
pool of processes, cut the token stream into fixed-size shards, split off validation, count which
token ids the training split uses, and record it all in a manifest so that preparing twice does nothing.

Memory stays at about one shard whatever the corpus size: documents stream through the pool and
shards are written as they fill.
"""

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2lab import tokenizer
from gpt2lab.data.shards import open_shard, write_shard
from gpt2lab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

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
            try:
                if self.local_copy:
                    log.info("copying Tiny Shakespeare from %s", self.local_copy)
                    shutil.copyfile(self.local_copy, tmp)
                else:
                    log.info("downloading Tiny Shakespeare from %s", self.url)
                    urllib.request.urlretrieve(self.url, tmp)
            except (OSError, ValueError) as e:  # URLError is an OSError; a malformed url a ValueError
                tmp.unlink(missing_ok=True)
                raise DataError(
                    f"could not {'copy' if self.local_copy else 'download'} {self.local_copy or self.url} ({e}): "
                    f"on an offline machine put a copy at {path} or set GPT2LAB_TINYSHAKESPEARE=/path/to/input.txt"
                ) from e
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
            if digest != self.sha256:
                tmp.unlink()
                raise DataError(
                    f"Tiny Shakespeare from {self.local_copy or self.url} has sha256 {digest}, expected "
                    f"{self.sha256}: not the right file"
                )
            os.replace(tmp, path)
        yield path.read_text(encoding="utf-8")  # one document


def plain(value):
    """value with every Mapping made a dict and every Sequence but a string a list: a config's containers
    (OmegaConf's ListConfig and DictConfig are such) become JSON-serializable data for the manifest."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return value


class TextFiles:
    """Local text: `path` is a .txt file, a directory (its .txt files, recursively, in sorted order) or a
    list of them; each file is one document."""

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike] | None):
        fix = "set data.source.path=<a .txt file or a directory of them>"
        if not path:
            raise DataError(f"data.source.path is not set: {fix}")
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        self.files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                self.files += sorted(p.rglob("*.txt"))
            elif p.is_file():
                self.files.append(p)
            else:
                raise DataError(f"data.source.path: {p} does not exist; {fix}")
        if not self.files:
            raise DataError(f"data.source.path={paths} holds no .txt files; {fix}")

    def describe(self) -> dict:
        # names, sizes and modification times: an edited file makes the shards out of date
        stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in self.files]
        fingerprint = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
        return {"name": "text", "files": len(stats), "bytes": sum(s[1] for s in stats), "fingerprint": fingerprint}

    def documents(self, data_dir: Path) -> Iterator[str]:
        for f in self.files:
            try:
                yield f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{f} is not UTF-8 text (byte {e.start}: {e.object[e.start : e.start + 4]!r}): convert it, "
                    "e.g. `iconv -f latin1 -t utf-8`, or leave it out of data.source.path"
                ) from e


class HFDataset:
    """A Hugging Face `datasets` text data set, streamed (nothing but the shards lands on disk), e.g.
    FineWeb-Edu. `path="json"` / `"parquet"` with `data_files` reads local files through the same code."""

    def __init__(
        self, path: str, name: str | None = None, split: str = "train", text_field: str = "text", data_files=None
    ):
        self.path, self.name, self.split, self.text_field = path, name, split, text_field
        self.data_files = plain(data_files)  # a list or dict from the command line arrives as a config container

    def describe(self) -> dict:
        return {
            "name": "hf",
            "path": self.path,
            "config": self.name,
            "split": self.split,
            "data_files": self.data_files,
        }

    def documents(self, data_dir: Path) -> Iterator[str]:
        try:
            import datasets
        except ImportError as e:
            raise DataError(
                f'data set {self.path} is read with Hugging Face `datasets`: pip install -e ".[data]"'
            ) from e
        try:
            stream = datasets.load_dataset(
                self.path, name=self.name, split=self.split, data_files=self.data_files, streaming=True
            )
        except ConnectionError as e:
            raise DataError(
                f"could not reach {self.path} on the Hugging Face Hub ({e}): prepare the shards on a machine "
                f"with network access (python scripts/prepare_data.py) and copy the data dir {data_dir} here"
            ) from e
        except FileNotFoundError as e:  # also `datasets`' DatasetNotFoundError
            raise DataError(
                f"data set {self.path} (data_files={self.data_files}): {e}; check data.source.path and "
                "data.source.data_files"
            ) from e
        for row in stream:
            if self.text_field not in row:
                raise DataError(
                    f"{self.path} rows have no field {self.text_field!r} (they have {sorted(row)}): "
                    "set data.source.text_field"
                )
            yield row[self.text_field]


def encode_document(text: str) -> np.ndarray:
    """<|endoftext|> (the document delimiter), then the document's GPT-2 BPE ids, as uint16."""
    ids = tokenizer.encoding().encode_ordinary(text)  # cached by tiktoken: loaded once per process
    tokens = np.empty(len(ids) + 1, dtype=np.uint16)
    tokens[0] = tokenizer.EOT_ID
    tokens[1:] = ids
    return tokens


def encode_documents(documents: Iterable[str], num_proc: int) -> Iterator[np.ndarray]:
    """Each document's tokens, in document order, encoded by `num_proc` processes."""
    if num_proc == 1:
        yield from map(encode_document, documents)
        return
    tokenizer.encoding()  # loaded before the fork, so the workers inherit it instead of each loading it
    with multiprocessing.Pool(num_proc) as pool:
        # chunks of documents amortize the inter-process traffic; imap keeps the order and streams
        yield from pool.imap(encode_document, documents, chunksize=16)


class ShardWriter:
    """Cuts a token stream into shards of `shard_size` tokens, the first `val_shards` named val_NNNNNN.bin,
    the rest train_NNNNNN.bin, and counts the token ids of the train shards as they are written."""

    def __init__(self, data_dir: Path, shard_size: int, val_shards: int, n_vocab: int):
        self.data_dir, self.shard_size, self.val_shards, self.n_vocab = data_dir, shard_size, val_shards, n_vocab
        self.buffer = np.empty(shard_size, dtype=np.uint16)
        self.filled = 0
        self.written: dict[str, list[Path]] = {"val": [], "train": []}
        self.tokens = {"train": 0, "val": 0}
        self.train_token_counts = np.zeros(n_vocab, dtype=np.int64)

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            n = min(len(tokens), self.shard_size - self.filled)
            self.buffer[self.filled : self.filled + n] = tokens[:n]
            self.filled, tokens = self.filled + n, tokens[n:]
            if self.filled == self.shard_size:
                self.flush()

    def flush(self) -> None:
        if not self.filled:
            return
        split = "val" if len(self.written["val"]) < self.val_shards else "train"
        path = self.data_dir / f"{split}_{len(self.written[split]):06d}.bin"
        tokens = self.buffer[: self.filled]
        write_shard(path, tokens)
        if split == "train":
            self.train_token_counts += np.bincount(tokens, minlength=self.n_vocab)
        self.written[split].append(path)
        self.tokens[split] += self.filled
        self.filled = 0

    def move_tail_to_val(self, n_val: int) -> None:
        """Make the last `n_val` tokens of the train shards the val split, one shard in memory at a time."""
        train_paths, self.written["train"] = self.written["train"], []
        cut, start = self.tokens["train"] - n_val, 0
        self.val_shards = sys.maxsize  # every shard written from here is val
        for path in train_paths:
            n = len(open_shard(path))
            if start + n > cut:
                tokens = np.array(open_shard(path))  # a copy: the file is rewritten below
                keep = max(cut - start, 0)
                self.train_token_counts -= np.bincount(tokens[keep:], minlength=self.n_vocab)
                self.add(tokens[keep:])
                if keep:
                    write_shard(path, tokens[:keep])
                else:
                    path.unlink()
            if start < cut:
                self.written["train"].append(path)
            start += n
        self.flush()
        self.tokens = {"train": cut, "val": n_val}


def remove_shards(data_dir: Path) -> None:
    """Delete what prepare writes (never the source text cached beside it)."""
    for pattern in ("train_*.bin", "val_*.bin", "*.tmp", MANIFEST, TRAIN_TOKEN_COUNTS):
        for path in data_dir.glob(pattern):
            path.unlink()


def prepare(
    source,
    data_dir: str | os.PathLike,
    val_fraction: float | None,
    val_shards: int | None,
    shard_size: int,
    num_proc: int | None = None,
    rebuild: bool = False,
) -> Path:
    """Tokenize `source` into shards in `data_dir`, unless its manifest says that is done with these settings.

    Val is either the last `val_fraction` of the token stream (the convention for Tiny Shakespeare) or
    its first `val_shards` shards (FineWeb-Edu's recipe: a stream of unknown length).
    """
    if (val_fraction is None) == (val_shards is None):
        raise ConfigError(
            f"data.prepare.val_fraction={val_fraction} and data.prepare.val_shards={val_shards}: set exactly one of them "
            "(e.g. data.prepare.val_fraction=0.1, or data.prepare.val_shards=1 for a streamed source)"
        )
    data_dir = Path(data_dir)
    settings = {"source": source.describe(), "tokenizer": tokenizer.NAME, "val_fraction": val_fraction}
    if val_shards is not None:  # only when set, so manifests written before it existed stay valid
        settings["val_shards"] = val_shards
    settings["shard_size"] = shard_size
    manifest_path = data_dir / MANIFEST
    if manifest_path.exists() and not rebuild:
        done = json.loads(manifest_path.read_text())
        if done["settings"] == settings:
            return data_dir
        changed = {k: (done["settings"].get(k), v) for k, v in settings.items() if done["settings"].get(k) != v}
        raise DataError(
            f"{data_dir} was prepared with other settings ({', '.join(f'{k}: {a} → now {b}' for k, (a, b) in changed.items())}): "
            "add data.prepare.rebuild=true to delete its shards and prepare them again, or point data.data_dir elsewhere"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    remove_shards(data_dir)  # leftovers of an interrupted prepare, or the shards being rebuilt
    if not num_proc:  # the CPUs this process may use (taskset, a container's cpuset); macOS has no affinity call
        num_proc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    writer = ShardWriter(data_dir, shard_size, val_shards or 0, tokenizer.VOCAB_SIZE)
    name = settings["source"]["name"]
    with tqdm(desc=f"tokenizing {name} ({num_proc} processes)", unit="tok", unit_scale=True) as progress:
        for tokens in encode_documents(source.documents(data_dir), num_proc):
            writer.add(tokens)
            progress.update(len(tokens))
    writer.flush()
    if val_fraction is not None:
        writer.move_tail_to_val(int(writer.tokens["train"] * val_fraction))
    if not writer.written["train"]:
        raise DataError(
            f"{source.describe()} gave {writer.tokens['val']} tokens, all of them val: lower data.prepare.shard_size "
            f"({shard_size}) or data.prepare.val_shards ({val_shards}), or use data.prepare.val_fraction"
        )
    np.save(data_dir / TRAIN_TOKEN_COUNTS, writer.train_token_counts)
    # the manifest is written last: its presence means every shard is complete
    manifest = {"settings": settings, "tokens": writer.tokens, "shards": {k: len(v) for k, v in writer.written.items()}}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("prepared %s: %s", data_dir, manifest["tokens"])
    return data_dir
