"""What several test files share: composing the real config, the data dir, reading a run's TensorBoard scalars, the
tiny runs' overrides, the scripts run as processes, and callbacks that inject faults and signals into a real run."""

import csv
import os
import random
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt2lab.accelerator import resolve_accelerator
from gpt2lab.config import register_resolvers
from gpt2lab.train import train

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
# the device accelerator=auto should pick on this machine: build-nanogpt's order, cuda > mps > cpu
HOST_DEVICE = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


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


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard itself reads back from a run's event files: every tag's (step, value), in the order written,
    over every events file in <run dir>/tb (each process that ran in the dir, a resumed run's too, wrote one)."""
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


TINYSHAKESPEARE_SHA256 = OmegaConf.load(CONF_DIR / "data" / "tinyshakespeare.yaml").source.sha256


# --- scripts/train.py as a process, and the tiny runs the sweep tests make with it

# every run: model=tiny, 2 optimizer steps of 4 × 32 tokens, validation (one batch) after each, no text samples
TINY_RUN = ["model=tiny", "accelerator=cpu", "trainer.max_steps=2", "data.seq_len=32", "data.val_batches=1",
            "train.val_every_n_steps=1", "~callbacks.text_samples"]  # fmt: skip
TOKENS_PER_RUN = 2 * 4 * 32  # steps × data.batch_size (conf/data) × data.seq_len


def with_tests_importable(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (this process's environment by default) with tests/ on PYTHONPATH, so that a child process's Hydra can
    instantiate the callbacks defined here; a PYTHONPATH already set (a worktree's src/) stays after it."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), env.get("PYTHONPATH")]))
    return env


def train_script(*args: str, data_dir: Path, returncode: int = 0) -> subprocess.CompletedProcess:
    """`python scripts/train.py <args>` in a process of its own; it must exit with `returncode`."""
    cmd = [sys.executable, "scripts/train.py", *args, f"paths.data_dir={data_dir}"]
    env = with_tests_importable()  # for the fault callbacks defined here
    done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == returncode, done.stderr[-3000:]
    return done


def read_summary(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


# a short tiny run that validates at its last step only; RESUME_N steps, a checkpoint to resume from at RESUME_K
SHORT_RUN = ["model=tiny", "accelerator=cpu", "data.seq_len=32", "data.batch_size=2", "data.val_batches=1",
             "train.val_every_n_steps=1000", "~callbacks.text_samples", "~callbacks.progress_bar"]  # fmt: skip
RESUME_N, RESUME_K = 3, 2


def assert_resumes_exactly(variant: list[str], tmp_path: Path, data_dir: Path) -> Path:
    """A straight RESUME_N-step SHORT_RUN of `variant`, and one resumed in a new run dir from its step-RESUME_K
    checkpoint: the same losses, gradient norms, learning rates and final weights, bit for bit (validation at the last
    step only: the final weights hold every state a resume restores: moments, momentum, schedule, the loader's
    position). Returns the straight run's dir."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(compose_train_in(straight, data_dir, *SHORT_RUN, *variant, f"trainer.max_steps={RESUME_N}",
                           f"callbacks.model_checkpoint.every_n_train_steps={RESUME_K}"))  # fmt: skip
    ckpt = straight / "checkpoints" / f"step{RESUME_K:06d}.ckpt"
    train(
        compose_train_in(resumed, data_dir, *SHORT_RUN, *variant, f"trainer.max_steps={RESUME_N}", f"ckpt_path={ckpt}")
    )
    for tag in ("train/loss", "train/grad_norm", "lr", "val/loss"):
        expected = [(s, v) for s, v in scalars(straight)[tag] if s > RESUME_K]
        assert scalars(resumed)[tag] == expected and expected, tag
    final = [torch.load(d / "checkpoints/last.ckpt", weights_only=False) for d in (straight, resumed)]
    assert final[1]["global_step"] == RESUME_N
    for name, weight in final[0]["state_dict"].items():
        assert torch.equal(final[1]["state_dict"][name], weight), name
    return straight


# --- runs on a small local corpus (data=text) cut into shards: exact resume and data parallel

B, T = 4, 32  # the corpus runs' batch and sequence length
BATCH_LINE = re.compile(r"rank (\d+) batch (epoch=\d+ index=\d+ windows=\S+)")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Three documents of made-up English, ~1,800 tokens: train shards of 600, 600 and ~420 tokens, and val:
    11 batches of B×T a pass."""
    root = tmp_path_factory.mktemp("corpus")
    words = "the of and to in is was that for on with as by at from his her it an be this which or".split()
    rng = np.random.default_rng(0)
    for i in range(3):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(words, size=600)) + "\n")
    return root


def train_run(run_dir: Path, corpus: Path, data_dir: Path, *overrides: str, batch_size: int = B) -> None:
    """`python scripts/train.py` on the corpus with a tiny model: a new process, as after a crash."""
    cmd = [
        sys.executable, "scripts/train.py", "model=tiny", "accelerator=cpu", "data=text",
        f"data.source.path={corpus}", f"paths.data_dir={data_dir}", "data.prepare.shard_size=600", "data.prepare.num_proc=1",
        f"data.batch_size={batch_size}", f"data.seq_len={T}", "data.shuffle=true", "data.debug_batches=true",
        "data.val_batches=2", "train.val_every_n_steps=5", "~callbacks.text_samples", f"hydra.run.dir={run_dir}",
        # a learning rate still in warmup does not depend on trainer.max_steps, so a run stopped by
        # max_steps=K follows the same schedule as one going to N
        "scheduler.warmup_steps=1000", "optim.lr=0.05",
        *overrides,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def batches_seen(run_dir: Path, rank: int = 0) -> list[str]:
    """The windows served to `rank`, in order, from the run dir's logs (all processes that ran in it)."""
    lines = []
    for log in sorted(run_dir.glob("*.log")):
        lines += [
            m.group(2) for m in map(BATCH_LINE.search, log.read_text().splitlines()) if m and int(m.group(1)) == rank
        ]
    return lines


# --- faults and signals injected into a real run (`+callbacks.x={_target_:conftest.InjectInf,...}`)


class InjectGradient(L.Callback):
    """A fault: `value` (nan; inf, as an fp16 overflow gives) in one entry of parameter `param`'s gradient at
    optimizer step `at_step` (1, 2, ...; 0: never)."""

    def __init__(self, at_step: int, value: float | str = "nan", param: str = "transformer.wte.weight"):
        self.at_step, self.value, self.param = at_step, float(value), param

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.at_step - 1:  # the steps done before it
            pl_module.model.get_parameter(self.param).grad[0, 0] = self.value


def inject_gradient(at_step: int, value: str = "nan", param: str = "transformer.wte.weight") -> str:
    """The override that adds InjectGradient to a run, as callbacks.inject."""
    return f"+callbacks.inject={{_target_:conftest.InjectGradient,at_step:{at_step},value:{value},param:{param}}}"


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


def signal_at(step: int, micro: int, *signals: str) -> str:
    """The override that adds SignalMidStep to a run."""
    return (
        f"+callbacks.signal={{_target_:conftest.SignalMidStep,signals:[{','.join(signals)}],step:{step},micro:{micro}}}"
    )


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
    return with_tests_importable(env) | {"OMP_NUM_THREADS": "1"}


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
    steps_first = [s for s, _ in scalars(runs_dir / f"slurm_{job_id}")["train/loss"]]
    requeued = srun(job_id, nodes, tasks_per_node, root / "bin", root / "requeued", *command)  # the same command
    scontrol_calls = calls.read_text().splitlines() if calls.exists() else []
    return RequeuedJob(job_id, runs_dir, first, steps_first, requeued, scontrol_calls)
