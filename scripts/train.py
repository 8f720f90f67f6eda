"""Train a GPT: `python scripts/train.py model=small trainer.max_steps=50` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from gpt2lab.config import ConfigError
from gpt2lab.train import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None  # one message, no traceback


if __name__ == "__main__":
    main()
