"""SLURM rehearsed on this machine, with no cluster: one job of 2 tasks started the way `srun` starts it (each task
the same `scripts/train.py trainer=slurm` command with the SLURM variables srun gives it), pre-empted by SIGUSR1,
requeued and resumed; and a sweep through hydra-submitit-launcher's local executor (the SLURM launcher's
pickled jobs, job folders and collected results, without sbatch). What only a real cluster shows is in the
README's Sweeps section."""

import csv
import os
import subprocess
import sys

import lightning as L
import pytest
import submitit
import torch
from conftest import CONF_DIR, ROOT, compose_train_in, requeued_job, scalars
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from omegaconf import OmegaConf

from gpt2lab.accelerator import resolve_accelerator
from gpt2lab.sweep import read_events, run_dirs, scalar_series
from gpt2lab.train import train

TASKS, B, T = 2, 2, 32  # a job of 2 tasks on 1 node, each with a micro-batch of B windows of T tokens
N, K = 4, 2  # optimizer steps: the whole run, and the step during which SIGUSR1 arrives
# fp32 on every CPU: the comparison with one process is of float32 sums in two orders (as in test_ddp)
RUN = ["model=tiny", "accelerator=cpu", "accelerator.precision=32-true", f"data.seq_len={T}", "data.val_batches=1",
       f"trainer.max_steps={N}", "train.val_every_n_steps=2", "~callbacks.text_samples"]  # fmt: skip


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    """The run of one process with twice the batch (it also prepares the data)."""
    run_dir = tmp_path_factory.mktemp("single")
    train(compose_train_in(run_dir, data_dir, *RUN, f"data.batch_size={TASKS * B}"))
    return run_dir


@pytest.fixture(scope="module")
def job(tmp_path_factory, data_dir, single):
    """One node, 2 tasks; SIGUSR1 to rank 1 during step K."""
    command = [*RUN, f"data.batch_size={B}", f"paths.data_dir={data_dir}"]
    return requeued_job(tmp_path_factory.mktemp("slurm"), 1, TASKS, 1, K, *command)


@pytest.mark.slow
def test_lightning_takes_its_ranks_from_slurm_and_starts_no_process_of_its_own(job):
    for launch in (job.first, job.requeued):
        for rank, (_, output) in enumerate(launch):
            # Lightning's own lines: one process group member per task (a process Lightning started itself
            # would write to its parent's output), ranked by SLURM_PROCID, and its SLURM environment
            joined = [line for line in output.splitlines() if line.startswith("Initializing distributed")]
            assert joined == [f"Initializing distributed: GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/{TASKS}"], output
            assert "SLURM auto-requeueing enabled" in output
    # every task of both launches ran in the job's dir: Hydra made no other
    assert [p.name for p in job.runs_dir.iterdir()] == [job.run_dir.name]


@pytest.mark.slow
def test_sigusr1_on_one_task_stops_every_task_after_the_same_step_and_requeues_the_job_once(job):
    for rank, (status, output) in enumerate(job.first):
        assert status == 1, output
        assert f"after step {K}." in output and "Resume with:" in output
    assert job.steps_first == list(range(1, K + 1))  # the step under way finished; no later one started
    assert job.scontrol_calls == [f"requeue {job.id}"]  # by rank 0, which did not receive the signal itself


@pytest.mark.slow
def test_the_requeued_job_resumes_by_itself_and_trains_like_one_process_with_twice_the_batch(job, single):
    for status, output in job.requeued:
        assert status == 0, output
        assert f"SLURM job {job.id} was requeued: resuming from {job.run_dir}/checkpoints/last.ckpt" in output
    assert torch.load(job.run_dir / "checkpoints/last.ckpt", weights_only=False)["global_step"] == N
    # both launches' steps, each once: 1..K before the signal, K+1..N after the requeue, with the optimizer's
    # state carried over (resumed with a fresh AdamW, the loss of step K+2 is ~2e-2 off)
    for tag in ("train/loss", "val/loss"):
        job_curve, single_curve = scalars(job.run_dir)[tag], scalars(single)[tag]
        assert [s for s, _ in job_curve] == [s for s, _ in single_curve] and job_curve[-1][0] == N
        # the same updates in exact arithmetic: DDP averages the two ranks' mean gradients; float32 sums in
        # another order differ by ~1e-7 relative (see test_ddp for the tolerance)
        assert [v for _, v in job_curve] == pytest.approx([v for _, v in single_curve], abs=1e-4), tag


@pytest.mark.slow
def test_a_sweep_through_submitit_runs_each_run_as_a_job_and_summarizes_them(tmp_path, data_dir):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "scripts/train.py", "-m", "hydra/launcher=local", "hydra.launcher.timeout_min=5",
           f"hydra.sweep.dir={sweep_dir}", f"paths.data_dir={data_dir}", *RUN, f"data.batch_size={B}",
           "trainer.max_steps=2", "optim.lr=1e-3,2e-3"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # the two jobs run at once, on this machine's 2 cores
    done = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # submitit ran each run as a job of its own: its folder, with the pickled result it sent back
    jobs = [d for d in (sweep_dir / ".submitit").iterdir() if d.name.isdigit()]
    assert len(jobs) == 2 and all(len(list(d.glob("*_result.pkl"))) == 1 for d in jobs)
    runs = run_dirs(sweep_dir)
    assert len(runs) == 2
    final_val_loss = {}
    for run in runs:
        assert (run / "checkpoints/last.ckpt").is_file()
        val_loss = scalar_series(read_events(run), "val/loss")  # from the run's TensorBoard events
        assert [step for step, _, _ in val_loss] == [2]
        final_val_loss[str(run.relative_to(sweep_dir))] = val_loss[-1][1]
    with (sweep_dir / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["run"]: float(r["final_val_loss"]) for r in rows} == pytest.approx(final_val_loss)
    assert sorted(r["overrides"] for r in rows) == ["optim.lr=0.001", "optim.lr=0.002"]


def compose_slurm(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=slurm", *overrides],
                      return_hydra_config=True)  # fmt: skip
    resolve_accelerator(cfg.accelerator)  # as train() does first
    return cfg


def test_slurm_launcher_config_yields_a_valid_sbatch_job(tmp_path, monkeypatch):
    # submitit's SLURM executor insists on finding srun; it is never run here
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\necho 'no SLURM cluster here' >&2; exit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cfg = compose_slurm("hydra.launcher.partition=gpu", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4",
                        "hydra.launcher.timeout_min=90", f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    # the executor exactly as SlurmLauncher.launch builds it (hydra_submitit_launcher 1.2): submitit checks
    # every parameter name and writes the sbatch script it would submit
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(folder=params.pop("submitit_folder"), cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))  # fmt: skip
    base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
            "stderr_to_stdout"}  # fmt: skip
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    sbatch = executor._executor._make_submission_file_text("python -m submitit.core._submit job", "uid")
    for flag in ("--partition=gpu", "--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--time=90",
                 "--cpus-per-task=8", "--signal=USR1@120", "--requeue"):  # fmt: skip
        assert f"#SBATCH {flag}\n" in sbatch, sbatch
    assert sbatch.count("--signal") == 1  # Lightning's requeue signal, not submitit's USR2 besides it
    assert "srun" in sbatch  # one task per GPU, each a Lightning process


def test_slurm_trainer_is_lightnings_multi_node_ddp_with_requeue(tmp_path, monkeypatch, hydra_runtime):
    cfg = compose_slurm("hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4", "accelerator=cpu",
                        f"paths.output_dir={tmp_path}")  # fmt: skip
    hydra_runtime.set_config(cfg)  # as Hydra does in each job
    # task 5 of 8 (node 1, GPU 1), as srun starts it: Lightning takes its rank from SLURM, trainer=slurm its layout
    for key, value in {"SLURM_NNODES": "2", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_PROCID": "5",
                       "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "train",
                       "SLURM_NODELIST": "node[1-2]"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert (trainer_cfg["num_nodes"], trainer_cfg["devices"], trainer_cfg["strategy"]) == (2, 4, "ddp")
    # Lightning records the rank in process-wide globals: put them back after, or every later run in
    # this process would think it is rank 5 and log nothing
    for rank_zero_only in (fabric_rank_zero_only, utils_rank_zero_only):
        monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False)
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (8, 5, 1, 1)
