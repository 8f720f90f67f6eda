import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

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
