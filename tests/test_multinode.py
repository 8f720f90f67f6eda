"""Multi-node rehearsed on this machine, with no cluster: 2 nodes × 1 process on localhost, started as SLURM starts
a job of `sbatch --nodes=2 --ntasks-per-node=1` (srun's environment on each node; SIGUSR1 to the second node only,
requeue, resume) and as `torchrun --nnodes 2 --nproc-per-node 1` starts them (one agent per node, a static
rendezvous). Both nodes run in one run dir and one data dir, as on a shared filesystem, and the job trains like one
process with twice the batch. The cluster commands, and what only a cluster shows, are in docs/multinode.md."""

import shutil
import sys

import lightning as L
import pytest
import torch
from conftest import (
    compose_train_in,
    free_port,
    launcher_free_env,
    requeued_job,
    run_together,
    scalars,
)
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from lightning.pytorch.plugins.environments import TorchElasticEnvironment
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from omegaconf import OmegaConf

from gpt2lab.config import new_run_name
from gpt2lab.errors import ConfigError
from gpt2lab.train import train

NODES, B, T = 2, 2, 32  # one process per node, each with a micro-batch of B windows of T tokens
N, K = 4, 2  # optimizer steps: the whole run, and the step during which SIGUSR1 reaches node 1
# fp32 on every CPU: the comparison with one process is of float32 sums in two orders (as in test_ddp)
RUN = ["model=tiny", "accelerator=cpu", "accelerator.precision=32-true", f"data.seq_len={T}", "data.val_batches=1",
       f"trainer.max_steps={N}", "train.val_every_n_steps=2", "~callbacks.text_samples"]  # fmt: skip


class ReportLaunch(L.Callback):
    """Prints how Lightning set this process up: its cluster environment, how many processes its launcher
    started (none where the cluster environment starts them), its layout and ranks."""

    def setup(self, trainer, pl_module, stage):
        strategy = trainer.strategy
        print(
            f"launch: {type(strategy.cluster_environment).__name__} started={len(strategy.launcher.procs)} "
            f"nodes={trainer.num_nodes} devices={trainer.num_devices} global_rank={trainer.global_rank} "
            f"node_rank={trainer.node_rank} local_rank={trainer.local_rank}",
            flush=True,
        )


REPORT_LAUNCH = "+callbacks.report_launch={_target_:test_multinode.ReportLaunch}"


def launch_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("launch: ")]


def one_process_on_node(node: int) -> str:
    """How ReportLaunch describes the one process of `node`: its global rank is its node's."""
    return f"nodes={NODES} devices=1 global_rank={node} node_rank={node} local_rank=0"


def assert_trains_like_one_process_with_twice_the_batch(run_dir, single) -> None:
    for tag in ("train/loss", "val/loss"):
        curve, single_curve = scalars(run_dir)[tag], scalars(single)[tag]
        assert [s for s, _ in curve] == [s for s, _ in single_curve] and curve[-1][0] == N, tag
        # the same updates in exact arithmetic: DDP averages the two nodes' mean gradients; float32 sums in
        # another order differ by ~1e-7 relative (see test_ddp for the tolerance)
        assert [v for _, v in curve] == pytest.approx([v for _, v in single_curve], abs=1e-4), tag


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    """The run of one process with twice the batch (it also prepares the data)."""
    run_dir = tmp_path_factory.mktemp("single")
    train(compose_train_in(run_dir, data_dir, *RUN, f"data.batch_size={NODES * B}"))
    return run_dir


@pytest.fixture(scope="module")
def slurm_job(tmp_path_factory, data_dir, single):
    """2 nodes × 1 task; SIGUSR1 reaches the task on node 1 during step K (rank 0 has to requeue the job)."""
    command = [*RUN, f"data.batch_size={B}", f"paths.data_dir={data_dir}", REPORT_LAUNCH]
    return requeued_job(tmp_path_factory.mktemp("slurm_2_nodes"), NODES, 1, 1, K, *command)


@pytest.mark.slow
def test_each_slurm_node_runs_one_task_that_lightning_ranks_by_node_and_starts_no_process_for(slurm_job):
    for launch in (slurm_job.first, slurm_job.requeued):
        for node, (_, output) in enumerate(launch):
            assert launch_lines(output) == [f"launch: SLURMEnvironment started=0 {one_process_on_node(node)}"], output
    # both nodes of both launches ran in the job's dir (slurm_<id>): Hydra made no other
    assert [p.name for p in slurm_job.runs_dir.iterdir()] == [slurm_job.run_dir.name]


@pytest.mark.slow
def test_sigusr1_on_the_second_node_stops_both_nodes_after_the_same_step_and_requeues_the_job_once(slurm_job):
    for status, output in slurm_job.first:
        assert status == 1, output
        assert f"after step {K}." in output and "Resume with:" in output
    assert slurm_job.steps_first == list(range(1, K + 1))  # the step under way finished; no later one started
    assert slurm_job.scontrol_calls == [f"requeue {slurm_job.id}"]  # by node 0, which did not get SIGUSR1 itself


@pytest.mark.slow
def test_the_requeued_two_node_job_resumes_and_trains_like_one_process_with_twice_the_batch(slurm_job, single):
    for status, output in slurm_job.requeued:
        assert status == 0, output
        assert f"resuming from {slurm_job.run_dir}/checkpoints/last.ckpt" in output  # on both nodes
    assert torch.load(slurm_job.run_dir / "checkpoints/last.ckpt", weights_only=False)["global_step"] == N
    # steps 1..K before the signal, K+1..N after the requeue, each once
    assert_trains_like_one_process_with_twice_the_batch(slurm_job.run_dir, single)


@pytest.fixture(scope="module")
def torchrun_job(tmp_path_factory, data_dir, single):
    """`torchrun --nnodes 2 --nproc-per-node 1 --node-rank <n>` on each "node", into a data dir holding only the
    source text (the job tokenizes it, no download) and a runs dir with no run dir given."""
    root = tmp_path_factory.mktemp("torchrun")
    (root / "data/tinyshakespeare").mkdir(parents=True)
    shutil.copy(data_dir / "tinyshakespeare/input.txt", root / "data/tinyshakespeare")
    rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--rdzv-id", "job7"]
    command = ["scripts/train.py", "trainer=torchrun", *RUN, f"data.batch_size={B}", f"paths.data_dir={root / 'data'}",
               f"paths.runs_dir={root / 'runs'}", REPORT_LAUNCH]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc-per-node", "1"]
    nodes = [
        ([*torchrun, "--node-rank", str(node), *rendezvous, *command], launcher_free_env()) for node in range(NODES)
    ]
    return root, run_together(nodes, root / "nodes")


@pytest.mark.slow
def test_each_torchrun_node_runs_one_worker_that_lightning_ranks_by_node_and_starts_no_process_for(torchrun_job):
    root, nodes = torchrun_job
    for node, (status, output) in enumerate(nodes):
        assert status == 0, output
        assert launch_lines(output) == [f"launch: TorchElasticEnvironment started=0 {one_process_on_node(node)}"], (
            output
        )
    # both nodes ran in the run dir named after the rendezvous id they share
    assert [p.name for p in (root / "runs").iterdir()] == ["torchrun_job7"]
    # and one process of the job tokenized the data for both: two would delete and write each other's shards
    prepared = [
        line for _, output in nodes for line in output.splitlines() if "[gpt2lab.data.prepare][INFO] - prepared" in line
    ]
    assert len(prepared) == 1, prepared


@pytest.mark.slow
def test_two_torchrun_nodes_train_like_one_process_with_twice_the_batch(torchrun_job, single):
    root, _ = torchrun_job
    assert_trains_like_one_process_with_twice_the_batch(root / "runs/torchrun_job7", single)


def test_torchrun_trainer_takes_its_layout_and_ranks_from_torchrun(compose_train, monkeypatch):
    # worker 5 of `torchrun --nnodes 2 --nproc-per-node 4` (node 1, GPU 1), as torchrun starts it
    for key, value in {"WORLD_SIZE": "8", "GROUP_WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "4", "RANK": "5",
                       "GROUP_RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "29500",
                       "TORCHELASTIC_RUN_ID": "job7"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    cfg = compose_train("trainer=torchrun", "accelerator=cpu")
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert (trainer_cfg["num_nodes"], trainer_cfg["devices"], trainer_cfg["strategy"]) == (2, 4, "ddp")
    # Lightning records the rank in process-wide globals: put them back after, or every later run in
    # this process would think it is rank 5 and log nothing
    for rank_zero_only in (fabric_rank_zero_only, utils_rank_zero_only):
        monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy.cluster_environment, TorchElasticEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (8, 5, 1, 1)


def test_a_torchrun_run_dir_is_named_after_the_rendezvous_id_every_node_shares(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")  # torchrun --rdzv-id job7
    assert new_run_name() == "torchrun_job7"
    # torchrun's default id with a static rendezvous (--master-addr, no --rdzv-id): each rank would name its own
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(ConfigError, match=r"pass --rdzv-id=.*or hydra.run.dir="):
        new_run_name()
