"""Sample text: `python scripts/sample.py ckpt=outputs/runs/<run> prompt="ROMEO:"` (see conf/sample.yaml)."""

import logging

import hydra
from omegaconf import DictConfig

from gpt2lab.accelerator import AUTO, detect_device
from gpt2lab.checkpoint import load_model
from gpt2lab.errors import exit_on_user_error
from gpt2lab.sample import sample

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        device = detect_device() if cfg.device == AUTO else cfg.device
        model = load_model(cfg.ckpt, cfg.hf, cfg.paths.runs_dir).to(device).eval()
        log.info("%s parameters on %s", f"{model.num_params():,}", device)
        texts = sample(
            model, cfg.prompt, num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed, stop_at_eot=cfg.stop_at_eot,
            kv_cache=cfg.kv_cache,
        )  # fmt: skip
    for i, text in enumerate(texts):
        print(f"--- sample {i}\n{text}")


if __name__ == "__main__":
    main()
