"""Sample text: `python scripts/sample.py ckpt=outputs/runs/<run> prompt="ROMEO:"` (see conf/sample.yaml)."""

import hydra
from omegaconf import DictConfig

import gpt2lab.config  # noqa: F401  (registers ${gpt2lab.device:})
from gpt2lab.sample import sample_from_config


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    for i, text in enumerate(sample_from_config(cfg)):
        print(f"--- sample {i}\n{text}")


if __name__ == "__main__":
    main()
