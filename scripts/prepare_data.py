"""Tokenize a data set into token shards: `python scripts/prepare_data.py data=fineweb_edu_10b`
(any data config; the same settings as training, so training finds the shards ready)."""

import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from gpt2lab.config import register_resolvers
from gpt2lab.errors import exit_on_user_error

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
    log.info("shards ready in %s", datamodule.data_dir)


if __name__ == "__main__":
    register_resolvers()  # before Hydra composes the config
    main()
