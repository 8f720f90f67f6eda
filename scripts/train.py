"""Train a GPT: `python scripts/train.py model=small trainer.max_steps=50` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from gpt2lab.config import register_resolvers
from gpt2lab.errors import exit_on_user_error
from gpt2lab.sweep import recording_run_end
from gpt2lab.train import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    # one line, no traceback, for what the user can fix (a bug keeps its traceback); how the run ended goes to its
    # status.json, and in a multirun a run that stops or fails does not end the sweep
    with exit_on_user_error(), recording_run_end():
        return train(cfg)
    return float("nan")  # a multirun's run that stopped or failed, recorded: no val/loss to report


if __name__ == "__main__":
    register_resolvers()  # before Hydra composes the config
    main()
