"""The train loader serves one optimizer step per batch (its micro-batches stacked), the val loader the same
first batches at every validation, and shards are found under their llm.c names too."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from gpt2lab.data import GPTDataModule, TokenWindows, WindowLoader, open_shard, write_shard
from gpt2lab.data.shards import ShardError


@pytest.fixture
def windows(tmp_path) -> TokenWindows:
    """One shard of 10 batches of B=2 × T=8 (+1 token)."""
    write_shard(
        tmp_path / "train_000000.bin", np.random.default_rng(3).integers(0, 50257, 10 * 16 + 1, dtype=np.uint16)
    )
    return TokenWindows([open_shard(tmp_path / "train_000000.bin")], batch_size=2, seq_len=8, shuffle_seed=5)


def test_a_train_batch_is_the_micro_batches_of_one_step_and_its_state_counts_steps(windows):
    loader = WindowLoader(windows, micro_batches=3)
    assert len(loader) == 3  # 10 micro-batches a pass hold 3 whole steps
    it = iter(loader)
    for step in range(2):
        xs, ys = next(it)
        assert xs.shape == ys.shape == (3, 2, 8)
        for m in range(3):  # global batches 3·step .. 3·step + 2, in order
            x, y = windows[0, 3 * step + m]
            assert torch.equal(xs[m], x) and torch.equal(ys[m], y)
    assert loader.state_dict() == {"epoch": 0, "served": 2, "batches_per_epoch": 3}
    resumed = WindowLoader(windows, micro_batches=3)
    resumed.load_state_dict(loader.state_dict())
    assert torch.equal(next(iter(resumed))[0][0], windows[0, 6][0])  # step 3's first micro-batch
    assert torch.equal(next(iter(resumed))[0][0], windows[1, 0][0])  # then the next pass


def test_validation_sees_the_same_first_batches_however_the_last_one_ended(windows):
    val = WindowLoader(windows, max_batches=4, resume=False)
    first = [x for x, _ in val]
    for x, _ in val:  # a validation cut short
        break
    assert all(torch.equal(a, b) for a, b in zip([x for x, _ in val], first, strict=True))
    assert torch.equal(first[0], windows[0, 0][0])


def test_llm_c_tiny_shakespeare_files_load_as_they_are(tmp_path):
    # llm.c's dev/data/tinyshakespeare.py writes these two names, in the same shard format
    rng = np.random.default_rng(4)
    for split in ("train", "val"):
        write_shard(tmp_path / f"tiny_shakespeare_{split}.bin", rng.integers(0, 50257, 4 * 32 + 1, dtype=np.uint16))
    data = GPTDataModule(None, str(tmp_path), batch_size=2, seq_len=16, total_batch_size=64, shuffle=False, seed=0,
                         val_batches=2, num_workers=0, debug_batches=False, prepare={})  # fmt: skip
    data.setup("fit")
    assert data.micro_batches == 2 and len(data.train_dataloader()) == 2 and len(data.val_loader()) == 2
    (tmp_path / "tiny_shakespeare_val.bin").unlink()
    with pytest.raises(
        ShardError, match=rf"data dir {tmp_path} holds no val shards \(looked for \*val_\*.bin and \*_val.bin\)"
    ):
        data.setup("fit")


def test_a_data_error_is_one_line_from_the_training_script(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts/train.py"), "model=tiny", "accelerator=cpu", "data=shards", f"paths.data_dir={tmp_path}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"error: data dir {tmp_path}/shards does not exist: prepare it with" in done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
