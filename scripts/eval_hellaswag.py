"""HellaSwag accuracy of a checkpoint: `python scripts/eval_hellaswag.py ckpt=outputs/runs/<run>` (see
conf/eval_hellaswag.yaml)."""

import hydra
from omegaconf import DictConfig

import gpt2lab.config  # noqa: F401  (registers ${gpt2lab.device:})
from gpt2lab.hellaswag import evaluate_from_config


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval_hellaswag")
def main(cfg: DictConfig) -> None:
    scores = evaluate_from_config(cfg)
    print(f"HellaSwag: acc_norm {scores['acc_norm']:.4f}, acc {scores['acc']:.4f} ({scores['examples']} examples)")


if __name__ == "__main__":
    main()
