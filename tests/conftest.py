"""What several test files share: composing the real config, the data dir, reading a run's TensorBoard scalars, the
tiny runs' overrides, the scripts run as processes, and callbacks that inject faults and signals into a real run."""

import csv
import os
import re
import signal
import subprocess
import sys
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


def train_script(*args: str, data_dir: Path, returncode: int = 0) -> subprocess.CompletedProcess:
    """`python scripts/train.py <args>` in a process of its own; it must exit with `returncode`."""
    cmd = [sys.executable, "scripts/train.py", *args, f"paths.data_dir={data_dir}"]
    env = os.environ | {"PYTHONPATH": str(ROOT / "tests")}  # for the fault callbacks defined here
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
