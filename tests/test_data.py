import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from gpt2lab.data import GPTDataModule, ShardError, TinyShakespeare, TokenWindows, open_shard, write_shard
from gpt2lab.data.shards import HEADER_BYTES, MAGIC


class SeedLoader:
    """build-nanogpt's DataLoaderLite (train_gpt2.py), one shard: the reference our batches must equal."""

    def __init__(self, tokens, B, T, process_rank=0, num_processes=1):
        self.tokens, self.B, self.T = torch.tensor(tokens.astype(np.int64)), B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.current_position = B * T * process_rank

    def next_batch(self):
        B, T = self.B, self.T
        buf = self.tokens[self.current_position : self.current_position + B * T + 1]
        x = (buf[:-1]).view(B, T)
        y = (buf[1:]).view(B, T)
        self.current_position += B * T * self.num_processes
        if self.current_position + (B * T * self.num_processes + 1) > len(self.tokens):
            self.current_position = B * T * self.process_rank
        return x, y


@pytest.fixture
def shard(tmp_path) -> np.ndarray:
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "train_000000.bin", rng.integers(0, 50257, size=1000, dtype=np.uint16))
    return open_shard(tmp_path / "train_000000.bin", vocab_size=50257)


def test_batches_equal_the_seed_loaders_across_wrap_around(shard):
    B, T = 4, 16
    windows = TokenWindows([shard], B, T)
    seed = SeedLoader(np.asarray(shard), B, T)
    assert len(windows) == (1000 - 1) // (B * T)
    for step in range(3 * len(windows) + 2):  # three passes and a bit: the wrap-around too
        x, y = windows[step % len(windows)]
        sx, sy = seed.next_batch()
        assert torch.equal(x, sx) and torch.equal(y, sy), step


def test_targets_are_the_inputs_shifted_by_one_token(shard):
    x, y = TokenWindows([shard], 2, 8)[3]
    assert x.shape == y.shape == (2, 8) and x.dtype == torch.int64
    flat = torch.tensor(np.asarray(shard[3 * 16 : 3 * 16 + 17]).astype(np.int64))
    assert torch.equal(x.flatten(), flat[:-1]) and torch.equal(y.flatten(), flat[1:])


def test_two_ranks_see_disjoint_halves_of_one_double_batch(shard):
    B, T = 3, 8
    single = TokenWindows([shard], 2 * B, T)
    ranks = [TokenWindows([shard], B, T, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for g in range(len(single)):
        x, y = single[g]
        assert torch.equal(torch.cat([ranks[0][g][0], ranks[1][g][0]]), x)
        assert torch.equal(torch.cat([ranks[0][g][1], ranks[1][g][1]]), y)


def test_batches_never_cross_a_shard_boundary(tmp_path):
    for i, n in enumerate([50, 80]):
        write_shard(tmp_path / f"s{i}.bin", np.full(n, i, dtype=np.uint16))
    shards = [open_shard(tmp_path / f"s{i}.bin") for i in range(2)]
    windows = TokenWindows(shards, 2, 10)
    assert len(windows) == 2 + 3  # floor(49/20) + floor(79/20)
    assert [int(windows[g][0][0, 0]) for g in range(len(windows))] == [0, 0, 1, 1, 1]


def test_too_little_data_for_one_batch_is_a_clear_error(shard):
    with pytest.raises(ValueError, match="do not fill one batch of B=8 × T=256"):
        TokenWindows([shard], 8, 256)


def test_shard_round_trips_and_is_memory_mapped(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16)
    write_shard(tmp_path / "a.bin", tokens)
    assert (tmp_path / "a.bin").stat().st_size == HEADER_BYTES + 2 * 5000
    assert not list(tmp_path.glob("*.tmp"))
    read = open_shard(tmp_path / "a.bin")
    assert isinstance(read, np.memmap) and np.array_equal(read, tokens)


def corrupt(path: Path, offset: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: corrupt(p, 0, 0), f"has magic 0 \\(expected {MAGIC}\\): not a token shard"),
        (lambda p: corrupt(p, 4, 7), "has version 7 \\(expected 1\\)"),
        (lambda p: p.write_bytes(p.read_bytes()[:-10]), "but its header promises 100 tokens"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "less than its 1024-byte header"),
        (lambda p: p.unlink(), "does not exist"),
    ],
)
def test_damaged_shards_are_rejected_naming_the_file_and_the_fix(tmp_path, damage, message):
    path = tmp_path / "train_000003.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    damage(path)
    with pytest.raises(ShardError, match=message) as e:
        open_shard(path)
    assert "train_000003.bin" in str(e.value) and "prepare_data.py" in str(e.value)


def test_shard_from_another_tokenizer_is_rejected(tmp_path):
    write_shard(tmp_path / "x.bin", np.array([1, 2, 60000, 3], dtype=np.uint16))
    with pytest.raises(ShardError, match="token id 60000 >= vocab size 50257"):
        open_shard(tmp_path / "x.bin", vocab_size=50257)


TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_tinyshakespeare_download_verifies_the_file(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    (tmp_path / "mirror.txt").write_text(text)
    url = (tmp_path / "mirror.txt").as_uri()  # a real urllib download, from a file:// mirror
    good = TinyShakespeare(url=url, sha256=hashlib.sha256(text.encode()).hexdigest())
    (tmp_path / "a").mkdir()
    assert list(good.documents(tmp_path / "a")) == [text]
    assert (tmp_path / "a" / "input.txt").read_text() == text

    (tmp_path / "b").mkdir()
    with pytest.raises(RuntimeError, match="not the right file"):
        list(TinyShakespeare(url=url, sha256=TINYSHAKESPEARE_SHA256).documents(tmp_path / "b"))
    assert not list((tmp_path / "b").iterdir())  # nothing half-downloaded left behind


def test_offline_download_failure_says_how_to_seed_a_copy(tmp_path):
    missing = TinyShakespeare(url=(tmp_path / "nowhere.txt").as_uri(), sha256=TINYSHAKESPEARE_SHA256)
    with pytest.raises(RuntimeError, match="GPT2LAB_TINYSHAKESPEARE"):
        list(missing.documents(tmp_path))


@pytest.fixture(scope="session")
def tinyshakespeare(data_dir) -> Path:
    """Tiny Shakespeare prepared by the DataModule of the real config."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.data_dir={data_dir}", "paths.output_dir=unused"])
    dm: GPTDataModule = instantiate(cfg.data)
    dm.prepare_data()
    return Path(cfg.data.data_dir)


def test_tinyshakespeare_is_prepared_into_train_and_val_shards(tinyshakespeare):
    manifest = json.loads((tinyshakespeare / "manifest.json").read_text())
    train, val = open_shard(tinyshakespeare / "train_000000.bin"), open_shard(tinyshakespeare / "val_000000.bin")
    assert len(train) + len(val) == 338_025 + 1  # the published token count, plus the <|endoftext|> prefix
    assert manifest["tokens"] == {"train": len(train), "val": len(val)}
    assert len(val) == int(0.1 * (len(train) + len(val)))
    assert train[0] == 50256 and list(train[1:9]) == [5962, 22307, 25, 198, 8421, 356, 5120, 597]  # "First Citizen:\nBefore we proceed any"
    counts = np.load(tinyshakespeare / "train_token_counts.npy")
    assert counts.sum() == len(train) and (counts > 0).sum() == 11_265 + 1  # + <|endoftext|>


def test_preparing_again_does_nothing_and_other_settings_refuse(tinyshakespeare):
    shard = tinyshakespeare / "train_000000.bin"
    before = shard.stat().st_mtime_ns
    source = TinyShakespeare(url="unused", sha256=TINYSHAKESPEARE_SHA256)
    from gpt2lab.data import prepare

    prepare(source, tinyshakespeare, val_fraction=0.1, shard_size=100_000_000)
    assert shard.stat().st_mtime_ns == before
    with pytest.raises(RuntimeError, match=f"delete {tinyshakespeare} to rebuild it"):
        prepare(source, tinyshakespeare, val_fraction=0.2, shard_size=100_000_000)


def test_datamodule_serves_shifted_batches_and_a_fixed_val_set(tinyshakespeare):
    dm = GPTDataModule(None, str(tinyshakespeare), 4, 32, 0.1, 100_000_000, val_batches=3, num_workers=0)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[0, 1:], y[0, :-1])
    val = [b[0] for b in dm.val_dataloader()]
    assert len(val) == 3 and torch.equal(torch.stack(val), torch.stack([b[0] for b in dm.val_dataloader()]))


def test_missing_shards_are_a_clear_error(tmp_path):
    dm = GPTDataModule(None, str(tmp_path), 4, 32, 0.1, 100_000_000, val_batches=3, num_workers=0)
    with pytest.raises(ShardError, match=f"no train_\\*.bin shards in {tmp_path}"):
        dm.setup("fit")
