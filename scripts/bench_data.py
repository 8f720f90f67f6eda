"""Measure the data path: `python scripts/bench_data.py [--repeat 3]`.

1. tokenization throughput (MB of text a second) with 1 and 2 processes, alternating, on Tiny Shakespeare
   (×16) cut into ~4 kB documents;
2. batch assembly throughput (tokens a second) from memory-mapped shards, B=64 × T=1024 as in the GPT-2
   recipe, in order and shuffled: it must be far above the ~1M tokens/s a GPU run consumes;
3. memory while iterating over shards of 10× and 100× Tiny Shakespeare's size, each in a fresh process:
   anonymous memory (the process's own) must not grow with the corpus; file-backed pages of the memory map
   are page cache the kernel reclaims under pressure, reported apart.

Needs TIKTOKEN_CACHE_DIR / GPT2LAB_TINYSHAKESPEARE offline, as the tests do.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gpt2lab.data import TokenWindows, WindowLoader, open_shard, write_shard
from gpt2lab.data.prepare import encode_documents

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
TS_TOKENS = 338_025


def tinyshakespeare_text(data_dir: Path) -> str:
    # the source of conf/data/tinyshakespeare.yaml: its url, sha256 and $GPT2LAB_TINYSHAKESPEARE
    source = instantiate(OmegaConf.load(CONF_DIR / "data" / "tinyshakespeare.yaml").source)
    return next(source.documents(data_dir))


def bench_tokenization(text: str, repeat: int) -> None:
    # ~4 kB documents (FineWeb-Edu's are ~5 kB on average), cut at paragraph ends: 4,400 documents, 18 MB
    documents, current = [], ""
    for paragraph in text.split("\n\n") * 16:
        current += paragraph + "\n\n"
        if len(current) >= 4000:
            documents.append(current)
            current = ""
    megabytes = sum(len(d.encode()) for d in documents) / 1e6
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeat):
        for num_proc in (1, 2):  # alternating, so both see the same machine load
            start = time.perf_counter()
            n_tokens = sum(len(t) for t in encode_documents(documents, num_proc))
            times[num_proc].append(time.perf_counter() - start)
    for num_proc, t in times.items():
        best = min(t)
        print(
            f"tokenize {num_proc} process(es): {megabytes / best:6.2f} MB/s  ({n_tokens / best / 1e6:.2f} M tokens/s, best of {repeat})"
        )
    print(f"  2 processes / 1: {min(times[1]) / min(times[2]):.2f}×  (os.cpu_count()={os.cpu_count()})")


def bench_batches(tmp: Path, repeat: int) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):  # 4 shards of 5M tokens
        paths.append(tmp / f"train_{i:06d}.bin")
        write_shard(paths[-1], rng.integers(0, 50257, size=5_000_000, dtype=np.uint16))
    shards = [open_shard(p) for p in paths]
    B, T = 64, 1024
    for shuffle_seed in (None, 1337):
        windows = TokenWindows(shards, B, T, shuffle_seed=shuffle_seed)
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            n = sum(x.numel() for x, _ in WindowLoader(windows))
            best = min(best, time.perf_counter() - start)
        order = "shuffled" if shuffle_seed is not None else "in order"
        print(f"batch assembly ({order}, B={B} T={T}, {len(windows)} batches): {n / best / 1e6:7.1f} M tokens/s")


def memory_kb() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def iterate_for_rss(data_dir: str) -> None:
    """Child process: one pass over every batch of the shards in data_dir; print peak memory."""
    shards = [open_shard(p, vocab_size=50257) for p in sorted(Path(data_dir).glob("train_*.bin"))]
    windows = TokenWindows(shards, 16, 1024, shuffle_seed=1337)
    before, peak_anon = memory_kb(), 0
    for i, _ in enumerate(WindowLoader(windows)):
        if i % 50 == 0:
            peak_anon = max(peak_anon, memory_kb()["RssAnon"])
    after = memory_kb()
    peak_anon = max(peak_anon, after["RssAnon"])
    tokens = sum(len(s) for s in shards)
    print(
        f"{tokens / 1e6:5.1f} M tokens ({tokens * 2 / 1e6:3.0f} MB): anonymous RSS {before['RssAnon'] / 1024:5.1f} → "
        f"peak {peak_anon / 1024:5.1f} MB; file-backed {before['RssFile'] / 1024:5.1f} → {after['RssFile'] / 1024:5.1f} MB "
        f"(libraries + the shards' pages, reclaimable page cache); peak RSS (VmHWM) {after['VmHWM'] / 1024:5.1f} MB"
    )


def bench_rss(tmp: Path) -> None:
    rng = np.random.default_rng(0)
    for factor in (10, 100):
        data_dir = tmp / f"x{factor}"
        data_dir.mkdir()
        n_tokens, shard_size = factor * TS_TOKENS, 2_000_000  # the same shard size for both: only the count differs
        for i, start in enumerate(range(0, n_tokens, shard_size)):
            size = min(shard_size, n_tokens - start)
            write_shard(data_dir / f"train_{i:06d}.bin", rng.integers(0, 50257, size=size, dtype=np.uint16))
        print(f"{factor:3d}× Tiny Shakespeare: ", end="", flush=True)
        subprocess.run([sys.executable, __file__, "--iterate", str(data_dir)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--iterate", help=argparse.SUPPRESS)  # the child process of the memory benchmark
    args = parser.parse_args()
    if args.iterate:
        return iterate_for_rss(args.iterate)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bench_tokenization(tinyshakespeare_text(tmp), args.repeat)
        bench_batches(tmp, args.repeat)
        bench_rss(tmp)


if __name__ == "__main__":
    main()
