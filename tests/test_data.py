import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF_DIR, TINYSHAKESPEARE_SHA256
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from gpt2lab.data import GPTDataModule, ShardError, TinyShakespeare, TokenWindows, WindowLoader, prepare
from gpt2lab.data.shards import HEADER_BYTES, MAGIC, open_shard, write_shard
from gpt2lab.errors import DataError


def datamodule(data_dir, **overrides) -> GPTDataModule:
    """The DataModule of the real `data=shards` config (shards already in `data_dir`), B=4, T=32."""
    settings = {"data_dir": data_dir, "batch_size": 4, "seq_len": 32, **overrides}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["data=shards", "paths.output_dir=unused", *(f"data.{k}={v}" for k, v in settings.items())],
        )
    return instantiate(cfg.data)


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


@pytest.fixture(scope="session")
def tinyshakespeare(data_dir) -> Path:
    """Tiny Shakespeare prepared by the DataModule of the real config."""
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
    assert train[0] == 50256 and list(train[1:9]) == [
        5962,
        22307,
        25,
        198,
        8421,
        356,
        5120,
        597,
    ]  # "First Citizen:\nBefore we proceed any"
    counts = np.load(tinyshakespeare / "train_token_counts.npy")
    assert counts.sum() == len(train) and (counts > 0).sum() == 11_265 + 1  # + <|endoftext|>


def test_preparing_again_does_nothing_and_other_settings_refuse(tinyshakespeare):
    shard = tinyshakespeare / "train_000000.bin"
    before = shard.stat().st_mtime_ns
    source = TinyShakespeare(url="unused", sha256=TINYSHAKESPEARE_SHA256)
    prepare(source, tinyshakespeare, val_fraction=0.1, val_shards=None, shard_size=100_000_000)
    assert shard.stat().st_mtime_ns == before
    with pytest.raises(DataError, match=r"val_fraction: 0.1 → now 0.2\): add data.prepare.rebuild=true"):
        prepare(source, tinyshakespeare, val_fraction=0.2, val_shards=None, shard_size=100_000_000)
    assert shard.stat().st_mtime_ns == before


def test_datamodule_serves_shifted_batches_and_a_fixed_val_set(tinyshakespeare):
    dm = datamodule(tinyshakespeare, val_batches=3)
    dm.setup("fit")
    xs, ys = next(iter(dm.train_dataloader()))
    assert xs.shape == ys.shape == (1, 4, 32)  # one optimizer step of one micro-batch
    assert torch.equal(xs[0, 0, 1:], ys[0, 0, :-1])
    val = [b[0] for b in dm.val_loader()]
    assert len(val) == 3 and torch.equal(torch.stack(val), torch.stack([b[0] for b in dm.val_loader()]))


@pytest.mark.parametrize(
    "contents, problem",
    [
        (None, "does not exist"),
        ([], "is empty"),
        (["notes.txt"], "holds no train shards \\(looked for \\*train_\\*.bin and \\*_train.bin\\)"),
    ],
)
def test_missing_or_empty_data_dir_is_a_clear_error(tmp_path, contents, problem):
    data_dir = tmp_path / "shards"
    if contents is not None:
        data_dir.mkdir()
        for name in contents:
            (data_dir / name).write_text("x")
    with pytest.raises(
        ShardError, match=f"data dir {data_dir} {problem}: prepare it with `python scripts/prepare_data"
    ):
        datamodule(data_dir).setup("fit")


def test_shards_named_as_llm_c_writes_them_are_read_without_a_source(tmp_path):
    rng = np.random.default_rng(1)
    write_shard(tmp_path / "fineweb_val_000000.bin", rng.integers(0, 50257, size=300, dtype=np.uint16))
    for i in (1, 2):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", rng.integers(0, 50257, size=400, dtype=np.uint16))
    dm = datamodule(tmp_path)
    dm.prepare_data()  # data=shards has no source: nothing to prepare
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 2 * (399 // 128) and len(dm.val_loader()) == 2


# --- windows over many shards, shuffling, the resumable loader ---------------------------------------


@pytest.fixture
def even_shards(tmp_path) -> list[np.ndarray]:
    """Three shards of whole global batches (B=2, T=8, 2 ranks: 32 tokens) + 1: every window is used."""
    rng = np.random.default_rng(2)
    for i, n in enumerate([3, 5, 2]):
        write_shard(tmp_path / f"train_{i:06d}.bin", rng.integers(0, 50257, size=n * 32 + 1, dtype=np.uint16))
    return [open_shard(tmp_path / f"train_{i:06d}.bin") for i in range(3)]


def window_rows(windows: TokenWindows, epoch: int) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for g in range(len(windows)) for row in windows[epoch, g][0]]


def test_shuffle_visits_every_window_once_a_pass_in_a_new_order_each_pass(even_shards):
    plain, shuffled = TokenWindows(even_shards, 4, 8), TokenWindows(even_shards, 4, 8, shuffle_seed=7)
    rows = [window_rows(shuffled, epoch) for epoch in range(3)]
    assert all(sorted(r) == sorted(window_rows(plain, 0)) for r in rows)  # a permutation of the same windows
    assert rows[0] != rows[1] != rows[2] != window_rows(plain, 0)
    assert rows[0] == window_rows(TokenWindows(even_shards, 4, 8, shuffle_seed=7), 0)  # seeded: reproducible
    x, y = shuffled[1, 5]
    assert torch.equal(x[:, 1:], y[:, :-1])  # still shifted windows, T+1 consecutive tokens each


def test_shuffled_ranks_split_the_same_global_batches(even_shards):
    single = TokenWindows(even_shards, 4, 8, shuffle_seed=7)
    ranks = [TokenWindows(even_shards, 2, 8, rank=r, world_size=2, shuffle_seed=7) for r in (0, 1)]
    for g in range(len(single)):
        assert torch.equal(torch.cat([ranks[0][3, g][0], ranks[1][3, g][0]]), single[3, g][0])


def test_loader_resumes_where_its_saved_state_says_across_passes(even_shards):
    windows = TokenWindows(even_shards, 4, 8, shuffle_seed=7)
    straight = WindowLoader(windows)
    reference = [x for _ in range(3) for x, _ in straight]  # three passes
    for stop in (4, len(windows), len(windows) + 3):  # mid-pass, at the end of a pass, in the second pass
        first = WindowLoader(windows)
        seen = []
        while len(seen) < stop:  # Lightning calls iter() again at every epoch
            for x, _ in first:
                seen.append(x)
                if len(seen) == stop:
                    break
        resumed = WindowLoader(windows)
        resumed.load_state_dict(first.state_dict())
        while len(seen) < len(reference):
            seen += [x for x, _ in resumed]
        assert all(torch.equal(a, b) for a, b in zip(seen, reference, strict=True)), stop


def test_a_pass_holds_whole_optimizer_steps_and_a_changed_setup_refuses_the_state(even_shards):
    windows = TokenWindows(even_shards, 4, 8)  # 10 batches a pass
    assert len(WindowLoader(windows, micro_batches=4)) == 2  # steps
    with pytest.raises(DataError, match="do not fill one optimizer step of 16 micro-batches"):
        WindowLoader(windows, micro_batches=16)
    state = WindowLoader(windows, micro_batches=1).state_dict()
    with pytest.raises(DataError, match="had 10 batches per pass, this run has 2"):
        WindowLoader(windows, micro_batches=4).load_state_dict(state)


def test_loader_state_counts_batches_trained_on_not_those_workers_prefetched(even_shards):
    windows = TokenWindows(even_shards, 4, 8)
    loader = WindowLoader(windows, num_workers=2)  # workers load batches ahead of the consumer
    for i, _ in enumerate(loader):
        if i == 4:
            break
    assert loader.state_dict() == {"epoch": 0, "served": 5, "batches_per_epoch": 10}
    resumed = WindowLoader(windows)
    resumed.load_state_dict(loader.state_dict())
    assert torch.equal(next(iter(resumed))[0], windows[5][0])
