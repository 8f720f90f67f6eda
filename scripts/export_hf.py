"""Export a checkpoint to Hugging Face: `python scripts/export_hf.py ckpt=outputs/runs/<run> out=gpt2-mine`
(see conf/export_hf.yaml); then `transformers.GPT2LMHeadModel.from_pretrained("gpt2-mine")`. A design-switch variant
that GPT2LMHeadModel cannot hold (any but model.tie_embeddings=false) is refused, naming the switch."""

import logging

import hydra
from omegaconf import DictConfig

from gpt2lab.checkpoint import load_checkpoint, resolve_checkpoint
from gpt2lab.errors import exit_on_user_error
from gpt2lab.hf import export_hf

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="export_hf")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        path = resolve_checkpoint(cfg.ckpt, cfg.paths.runs_dir)
        out = export_hf(load_checkpoint(path), cfg.out)
    log.info("exported %s to %s", path, out.resolve())


if __name__ == "__main__":
    main()
