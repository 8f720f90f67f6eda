"""Exact resume: a run stopped after step k and resumed in a new process trains on the same windows and
logs the same losses, bit for bit on CPU, as a run that never stopped; no step is repeated or skipped.

Every run is a real `scripts/train.py` process on a small local text corpus (data=text) cut into several
shards, shuffled, so the runs cross shard boundaries and an epoch boundary. `data.debug_batches=true`
makes the loader log a hash of every window it serves; TensorBoard holds the per-step losses.
"""

from pathlib import Path

import pytest
import torch
from conftest import B, T, batches_seen, scalars, train_run

N, K = 12, 5  # optimizer steps: the whole run, and where the interrupted run stops


@pytest.fixture(scope="session")
def text_data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("text_data")


ACCUM = 2  # micro-batches per optimizer step (the 2-rank resume in test_ddp takes 1)


def train_accumulating(run_dir: Path, corpus: Path, data_dir: Path, *overrides: str) -> None:
    train_run(run_dir, corpus, data_dir, f"train.total_batch_size={ACCUM * B * T}", *overrides)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus, text_data_dir) -> tuple[Path, list[str], list]:
    """Straight to N, leaving a periodic checkpoint at K as a crash-safe run would."""
    run_dir = tmp_path_factory.mktemp("straight")
    every_k = f"callbacks.model_checkpoint.every_n_train_steps={K}"
    train_accumulating(run_dir, corpus, text_data_dir, f"trainer.max_steps={N}", every_k)
    windows, losses = batches_seen(run_dir), scalars(run_dir)["train/loss"]
    assert [s for s, _ in losses] == list(range(1, N + 1)) and len(windows) == N * ACCUM
    assert len({w.split()[0] for w in windows}) >= 2, "the run should cross an epoch boundary"
    return run_dir, windows, losses


@pytest.mark.slow
def test_run_stopped_and_resumed_with_ckpt_path_last_sees_what_an_uninterrupted_run_sees(
    tmp_path, corpus, text_data_dir, straight
):
    _, windows, losses = straight
    # stopped after K steps, then continued to N by `ckpt_path=last` in its run dir, in a new process
    stopped = tmp_path / "stopped"
    train_accumulating(stopped, corpus, text_data_dir, f"trainer.max_steps={K}")
    train_accumulating(stopped, corpus, text_data_dir, f"trainer.max_steps={N}", "ckpt_path=last")
    assert batches_seen(stopped) == windows  # the same windows, none repeated or skipped
    # the same steps, and bitwise the same values (TensorBoard keeps the float32 values)
    assert scalars(stopped)["train/loss"] == losses
    assert scalars(stopped)["val/loss"] == scalars(straight[0])["val/loss"]
    assert torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == N


@pytest.mark.slow
def test_run_resumed_from_a_periodic_checkpoint_continues_exactly(tmp_path, corpus, text_data_dir, straight):
    straight_dir, windows, losses = straight
    # as after a crash: a new process, a new run dir, the checkpoint the killed run left at step K
    ckpt = straight_dir / "checkpoints" / f"step{K:06d}.ckpt"
    train_accumulating(tmp_path / "resumed", corpus, text_data_dir, f"trainer.max_steps={N}", f"ckpt_path={ckpt}")
    assert batches_seen(tmp_path / "resumed") == windows[K * ACCUM :]
    assert scalars(tmp_path / "resumed")["train/loss"] == losses[K:]  # the steps too


def test_ckpt_path_last_without_a_checkpoint_says_how_to_resume(tmp_path):
    from gpt2lab.config import ConfigError
    from gpt2lab.train import resume_from

    with pytest.raises(ConfigError, match=r"no checkpoint at .*last.ckpt; resume a run with `python scripts/"):
        resume_from("last", str(tmp_path / "checkpoints"))
    with pytest.raises(ConfigError, match="ckpt_path=missing.ckpt: no checkpoint at missing.ckpt"):
        resume_from("missing.ckpt", str(tmp_path / "checkpoints"))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resume_from("last", str(tmp_path / "checkpoints")) == str(tmp_path / "checkpoints" / "last.ckpt")
    assert resume_from(None, str(tmp_path / "checkpoints")) is None
