"""Check a GPU box in one command: `python scripts/gpu_check.py` (conf/gpu_check.yaml, docs/gpu_check.md) runs the
CUDA-only tests, the bench at 124M and 30 steps of the 124M recipe, and writes gpu_check.md into its output dir."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gpt2lab.config import register_resolvers
from gpt2lab.gpu_check import check

ROOT = Path(__file__).resolve().parents[1]  # the checkout: its tests/ and scripts/bench.py


@hydra.main(version_base="1.3", config_path="../conf", config_name="gpu_check")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    report, passed = check(cfg, ROOT, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    print(report.read_text(), end="")
    if not passed:
        raise SystemExit(f"gpu check: a part failed or ran out of time; the report: {report}")


if __name__ == "__main__":
    register_resolvers()  # before Hydra composes the config
    main()
