import os
import random
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt2lab.accelerator import resolve_accelerator
from gpt2lab.config import register_resolvers

register_resolvers()  # as every entry point does before Hydra composes

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the Linux kernel reports them (independent of torch); empty elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


# what the cpu preset should pick here: bf16 autocast only where the CPU multiplies bf16 in hardware
CPU_NATIVE_BF16 = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
CPU_PRECISION = "bf16-mixed" if CPU_NATIVE_BF16 else "32-true"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data dir for the session; Tiny Shakespeare is prepared into it by the first run that needs it
    (copied from $GPT2LAB_TINYSHAKESPEARE when set, as in CI, else downloaded)."""
    return Path(os.environ.get("GPT2LAB_TEST_DATA_DIR") or tmp_path_factory.mktemp("data"))


def compose_train_in(
    run_dir: Path, data_dir: Path, *overrides: str, return_hydra_config: bool = False, resolve: bool = True
) -> DictConfig:
    """Compose conf/train.yaml as `scripts/train.py` would, for a run in `run_dir`; with `resolve`, each `auto`
    accelerator setting is then the device's default, as train() makes it first."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"paths.output_dir={run_dir}", f"paths.data_dir={data_dir}", *overrides],
            return_hydra_config=return_hydra_config,
        )
    if resolve:
        resolve_accelerator(cfg.accelerator)
    return cfg


@pytest.fixture
def compose_train(tmp_path, data_dir):
    """compose_train_in with the run dir in tmp_path."""

    def _compose(*overrides: str, return_hydra_config: bool = False, resolve: bool = True) -> DictConfig:
        return compose_train_in(
            tmp_path / "run", data_dir, *overrides, return_hydra_config=return_hydra_config, resolve=resolve
        )

    return _compose


@pytest.fixture
def hydra_runtime():
    """Hydra's runtime config for one test, as a real run has it (`hydra_runtime.set_config(cfg)`, so that
    ${hydra:...} values resolve); cleared after, so no later test believes it runs inside Hydra."""
    yield HydraConfig.instance()
    HydraConfig.instance().cfg = None


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of tag over every events file of the run dir (each process that ran in it wrote one)."""
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


class SignalMidStep(L.Callback):
    """Sends `signals` to this process from the forward pass of micro-batch `micro` of optimizer step `step`."""

    def __init__(self, signals: list[str], step: int, micro: int):
        self.signals, self.step, self.micro, self.forwards = [signal.Signals[s] for s in signals], step, micro, 0

    def on_train_start(self, trainer, pl_module):
        def send(module, inputs):
            if torch.is_grad_enabled() and trainer.global_step == self.step - 1:  # steps done before this one
                if self.forwards == self.micro:
                    for sig in self.signals:
                        os.kill(os.getpid(), sig)
                self.forwards += 1

        pl_module.model.register_forward_pre_hook(send)


class SignalOnRank(SignalMidStep):
    """SLURM's SIGUSR1 reaching one task of the job first (each node's slurmstepd signals its own tasks): sent to
    the task of global rank `rank` only, from the forward pass of optimizer step `step`."""

    def __init__(self, rank: int, step: int):
        super().__init__(["SIGUSR1"], step, micro=0)
        self.rank = rank

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == self.rank:
            super().on_train_start(trainer, pl_module)


# Processes started as a cluster's launcher starts them, each with the environment it would give them: srun
# (test_slurm, test_multinode) and torchrun (test_multinode).

# what launchers set for their processes: inherited from the test's environment, it would make Lightning pick
# another cluster environment
LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                 "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE")  # fmt: skip
LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_")


def launcher_free_env() -> dict[str, str]:
    """This process's environment without a launcher's variables, with tests/ importable (callbacks given by
    _target_) and one OpenMP thread (the processes of a job share this machine's cores)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    python_path = [str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]  # keep a worktree's src/
    return env | {"PYTHONPATH": os.pathsep.join(python_path), "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A port in 15000-24999 free on this host now (the rendezvous binds it seconds later: a race the tests accept)."""
    for _ in range(100):
        port = random.randint(15000, 24999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in 15000-24999")


def slurm_job_id_with_a_free_port() -> str:
    """A job id whose rendezvous port is free here. Under srun nobody sets MASTER_PORT: SLURMEnvironment takes
    15000 + the job id's last four digits (and MASTER_ADDR: the first host of SLURM_NODELIST)."""
    return f"7{free_port() - 15000:04d}"


def srun_env(job_id: str, rank: int, nodes: int, tasks_per_node: int, bin_dir: Path) -> dict[str, str]:
    """The environment srun gives the task of global rank `rank` of a job of `sbatch --nodes=<nodes>
    --ntasks-per-node=<tasks_per_node>`, every node being this host: node n is 127.0.0.<n+1> (a loopback
    address), the node list in SLURM's compressed form. `bin_dir` goes first on PATH (a stand-in scontrol)."""
    nodelist = f"127.0.0.[1-{nodes}]" if nodes > 1 else "127.0.0.1"
    return launcher_free_env() | {
        "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": "train",  # not "bash"/"interactive": Lightning ignores those
        "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist,
        "SLURM_NTASKS": str(nodes * tasks_per_node), "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})" if nodes > 1 else str(tasks_per_node),
        "SLURM_CPUS_PER_TASK": "1", "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank % tasks_per_node), "SLURM_NODEID": str(rank // tasks_per_node),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }  # fmt: skip


def stand_in_scontrol(bin_dir: Path) -> Path:
    """An `scontrol` in bin_dir that records the arguments of each call, a line each, in the file returned."""
    calls = bin_dir / "scontrol_calls"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    return calls


def run_together(processes: list[tuple[list[str], dict[str, str]]], out_dir: Path) -> list[tuple[int, str]]:
    """Start each (command, environment) in the repository root, all at once as a launcher starts a job's
    processes, and wait for all of them: (exit status, output) of each."""
    out_dir.mkdir(parents=True)
    outputs = [out_dir / f"process{i}.out" for i in range(len(processes))]
    started = []
    for (cmd, env), output in zip(processes, outputs):
        with output.open("w") as out:  # a file, not a pipe: a full pipe would stall the process and its peers
            # a session of its own: a launcher's workers (torchrun's) end with it
            started.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True))  # fmt: skip
    try:
        for process in started:
            process.wait(timeout=300)
    except subprocess.TimeoutExpired:  # e.g. a rendezvous never met: the tests fail on what the processes wrote
        pass
    finally:
        for process in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return [(process.returncode, output.read_text()) for process, output in zip(started, outputs)]


def srun(job_id: str, nodes: int, tasks_per_node: int, bin_dir: Path, out_dir: Path, *overrides: str):
    """Start the job's tasks as srun does (the same `scripts/train.py trainer=slurm` command, each its own
    SLURM_PROCID) and wait for all of them: (exit status, output) of each task, by rank."""
    cmd = [sys.executable, "scripts/train.py", "trainer=slurm", *overrides]
    tasks = range(nodes * tasks_per_node)
    return run_together([(cmd, srun_env(job_id, rank, nodes, tasks_per_node, bin_dir)) for rank in tasks], out_dir)


@dataclass
class RequeuedJob:
    """A SLURM job rehearsed here: its tasks started, SIGUSR1 to one of them mid-run, and started again, as after
    the `scontrol requeue` this brings."""

    id: str
    runs_dir: Path
    first: list[tuple[int, str]]  # each task's exit status and output, as SIGUSR1 stopped them
    steps_first: list[int]  # the train/loss steps logged when it stopped
    requeued: list[tuple[int, str]]  # the same job started again
    scontrol_calls: list[str]

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / f"slurm_{self.id}"


def requeued_job(root: Path, nodes: int, tasks_per_node: int, signalled_rank: int, step: int, *overrides: str):
    """Run a SLURM job of `nodes` × `tasks_per_node` tasks with `overrides` in `root`: SIGUSR1 reaches the task of
    rank `signalled_rank` during optimizer step `step`; then the same job again, as requeued."""
    calls = stand_in_scontrol(root / "bin")
    job_id, runs_dir = slurm_job_id_with_a_free_port(), root / "runs"
    sigusr1 = f"+callbacks.usr1={{_target_:conftest.SignalOnRank,rank:{signalled_rank},step:{step}}}"
    # no hydra.run.dir: each task names its run dir after the job (slurm_<id>)
    command = [*overrides, f"paths.runs_dir={runs_dir}", sigusr1]
    first = srun(job_id, nodes, tasks_per_node, root / "bin", root / "first", *command)
    steps_first = [s for s, _ in scalars(runs_dir / f"slurm_{job_id}", "train/loss")]
    requeued = srun(job_id, nodes, tasks_per_node, root / "bin", root / "requeued", *command)  # the same command
    scontrol_calls = calls.read_text().splitlines() if calls.exists() else []
    return RequeuedJob(job_id, runs_dir, first, steps_first, requeued, scontrol_calls)
