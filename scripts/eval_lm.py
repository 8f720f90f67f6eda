"""lm-evaluation-harness on a checkpoint, in process: `python scripts/eval_lm.py ckpt=outputs/runs/<run>
tasks=[hellaswag_local]` (see conf/eval_lm.yaml and docs/lm_eval.md; needs pip install -e ".[eval]")."""

import hydra
from omegaconf import DictConfig

from gpt2lab.config import register_resolvers
from gpt2lab.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval_lm")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        from gpt2lab.harness import evaluate  # says how to install lm-eval where it is missing

        evaluate(cfg)


if __name__ == "__main__":
    register_resolvers()  # before Hydra composes the config (conf/logger)
    main()
