"""A run interrupted mid-step (in the middle of gradient accumulation) finishes that step, writes last.ckpt, and
resumes from it to exactly the run that was never interrupted: SIGTERM and SIGINT by `ckpt_path=last`, SLURM's
SIGUSR1 by requeueing its job, whose next start resumes by itself. A second Ctrl-C stops at once.

The signals are real, sent to this process from inside the forward pass of a chosen micro-batch; the runs are
real train() calls, read back from their TensorBoard files and checkpoints."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import compose_train_in, scalars, signal_at, stand_in_scontrol, train_script

from gpt2lab.errors import RunRequeued, RunTerminated
from gpt2lab.train import RunStopped, train

N = 6  # optimizer steps
# 2 micro-batches of 4 × 32 tokens a step; validation every 2 steps
RUN = ["model=tiny", "accelerator=cpu", "data.seq_len=32", "data.val_batches=1", "train.total_batch_size=256",
       "train.val_every_n_steps=2", f"trainer.max_steps={N}", "~callbacks.text_samples"]  # fmt: skip
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "localhost"}  # fmt: skip


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    train(compose_train_in(run_dir, data_dir, *RUN))
    return run_dir


def assert_same_run(run_dir: Path, straight: Path) -> None:
    for tag in ("train/loss", "train/grad_norm", "lr", "val/loss"):
        assert scalars(run_dir)[tag] == scalars(straight)[tag], tag  # steps and values, bitwise (float32)
    resumed = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)
    reference = torch.load(straight / "checkpoints/last.ckpt", weights_only=False)
    assert resumed["global_step"] == N
    for name, weight in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], weight), name


@pytest.fixture
def restore_signal_handlers():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_mid_accumulation_finishes_the_step_and_resumes_to_the_straight_run(
    tmp_path, data_dir, straight, sig, restore_signal_handlers
):
    run_dir = tmp_path / "run"
    with pytest.raises(
        RunStopped, match=rf"(?s)interrupted by {sig} after step 3\..*ckpt_path=last hydra.run.dir="
    ) as e:
        train(compose_train_in(run_dir, data_dir, *RUN, signal_at(3, 0, sig)))  # in step 3's first micro-batch
    assert isinstance(e.value, RunTerminated) == (sig == "SIGTERM")  # SIGTERM ends a multirun too
    assert torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 3
    assert [s for s, _ in scalars(run_dir)["train/loss"]] == [1, 2, 3]  # the step under way finished
    train(compose_train_in(run_dir, data_dir, *RUN, "ckpt_path=last"))
    assert_same_run(run_dir, straight)


@pytest.fixture
def slurm_job(tmp_path, monkeypatch) -> Path:
    """This process as SLURM job 4242's one task, with a stand-in scontrol on PATH; the file it records its calls in."""
    calls = stand_in_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    return calls


@pytest.mark.slow
def test_slurm_sigusr1_requeues_the_job_which_resumes_by_itself(
    tmp_path, data_dir, straight, slurm_job, restore_signal_handlers
):
    calls = slurm_job
    run_dir = tmp_path / "run"  # the same dir on requeue (a SLURM job's run dir is named after its id)
    with pytest.raises(RunRequeued, match=r"interrupted by SIGUSR1 after step 4"):  # not the end of the job
        train(compose_train_in(run_dir, data_dir, *RUN, signal_at(4, 1, "SIGUSR1")))  # in step 4's last micro-batch
    assert calls.read_text().split("\n")[0] == "requeue 4242"
    assert torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 4
    train(compose_train_in(run_dir, data_dir, *RUN))  # the requeued job: no ckpt_path
    assert_same_run(run_dir, straight)


@pytest.mark.slow
def test_slurm_sigusr1_in_the_last_step_completes_the_run_and_a_requeued_job_finds_it_done(
    tmp_path, data_dir, straight, slurm_job, restore_signal_handlers
):
    run_dir = tmp_path / "run"
    val_loss = train(compose_train_in(run_dir, data_dir, *RUN, signal_at(N, 1, "SIGUSR1")))  # no RunStopped
    assert not slurm_job.exists()  # no requeue: the job is done
    assert_same_run(run_dir, straight)
    assert val_loss == scalars(straight)["val/loss"][-1][1]
    # were the job requeued anyway (say, by hand), it would find its run complete: exit 0, status completed, and
    # nothing trained again
    done = train_script(*RUN, f"hydra.run.dir={run_dir}", data_dir=data_dir)
    assert "the run is complete" in done.stdout
    assert json.loads((run_dir / "status.json").read_text()) == {"status": "completed", "detail": None}
    assert scalars(run_dir)["train/loss"] == scalars(straight)["train/loss"]  # each step once


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path, data_dir, restore_signal_handlers):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train(compose_train_in(run_dir, data_dir, *RUN, signal_at(2, 0, "SIGINT", "SIGINT")))
    assert stopped.value.code == 1 and not isinstance(stopped.value, RunStopped)
    assert [s for s, _ in scalars(run_dir)["train/loss"]] == [1]  # step 2 never finished
    assert not (run_dir / "checkpoints/last.ckpt").exists()  # and nothing was saved mid-step


def test_slurm_run_dir_is_named_after_the_job(monkeypatch):
    from gpt2lab.config import new_run_name

    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert new_run_name() == "slurm_4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert new_run_name() == "slurm_77_3"
