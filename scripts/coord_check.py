"""μP's coordinate check: `python scripts/coord_check.py` (conf/coord_check.yaml, docs/mup.md) trains model=tiny's
shape at widths 64..1024 under sp and mup for a few AdamW steps, records each layer's output RMS after every step, and
writes coord_check.csv and coord_check.png into its output dir; it prints each coordinate's log-log slope."""

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from gpt2lab.accelerator import resolve_accelerator
from gpt2lab.config import check_config, register_resolvers
from gpt2lab.coord_check import coord_check, plot, slope_table, write_csv
from gpt2lab.errors import exit_on_user_error

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="coord_check")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        resolve_accelerator(cfg.accelerator)
        check_config(cfg)
        steps = cfg.coord_check.steps
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        train_batches = iter(datamodule.train_dataloader())
        batches = [tuple(t[0] for t in next(train_batches)) for _ in range(steps)]  # each step's first micro-batch
        probe = next(iter(datamodule.val_loader()))[0]  # the fixed batch the coordinates are measured on
        rows = coord_check(
            instantiate(cfg.model), cfg.coord_check.widths, cfg.coord_check.parametrizations, cfg.coord_check.seeds,
            batches, probe, instantiate(cfg.init), instantiate(cfg.optim),
            attention=cfg.accelerator.attention,
        )  # fmt: skip
    out = Path(HydraConfig.get().runtime.output_dir)
    write_csv(rows, out / "coord_check.csv")
    plot(rows, out / "coord_check.png")
    print("log-log slope of each coordinate's RMS against width (0: width-independent; 0.5: ∝ √width)")
    print(slope_table(rows))
    log.info("wrote %s and %s", out / "coord_check.csv", out / "coord_check.png")


if __name__ == "__main__":
    register_resolvers()  # before Hydra composes the config
    main()
