import logging
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gpt2lab.callbacks.safe_stop import SafeStop
from gpt2lab.config import ConfigError, check_config, grad_accum_steps
from gpt2lab.fastpath import tune_malloc
from gpt2lab.sweep import log_final_metrics

log = logging.getLogger(__name__)


class RunStopped(SystemExit):
    """Training ended early (a signal, a non-finite step) after saving a checkpoint: exits non-zero."""


def resume_from(ckpt_path: str | None, checkpoint_dir: str) -> str | None:
    """`ckpt_path=last` is this run dir's last.ckpt (resume a run by running again in its dir:
    `hydra.run.dir=outputs/runs/<run>`); any other value is a checkpoint file. Either must exist."""
    if ckpt_path is None:
        return None
    path = Path(checkpoint_dir) / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        how = "python scripts/train.py ckpt_path=last hydra.run.dir=outputs/runs/<the run to resume>"
        raise ConfigError(
            f"ckpt_path={ckpt_path}: no checkpoint at {path}; resume a run with `{how}`, "
            "or set ckpt_path=<a .ckpt file>"
        )
    return str(path)


def train(cfg: DictConfig) -> float:
    """Instantiate data, module, callbacks, loggers and Trainer from `cfg`, fit, and return the final
    val/loss (the metric a sweeper minimizes)."""
    check_config(cfg)
    ckpt_path = resume_from(cfg.ckpt_path, cfg.callbacks.model_checkpoint.dirpath)  # before any work
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "resolved_config.yaml", resolve=True)
    L.seed_everything(cfg.seed, workers=True)
    accelerator = cfg.accelerator
    log.info(
        "using device: %s (precision %s, attention %s)", accelerator.name, accelerator.precision, accelerator.attention
    )
    if accelerator.matmul_precision:
        torch.set_float32_matmul_precision(accelerator.matmul_precision)
    if accelerator.malloc:
        tune_malloc(**accelerator.malloc)

    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=[instantiate(c) for c in cfg.callbacks.values()],
        logger=[instantiate(lg) for lg in cfg.logger.values()],
    )
    # derived once here: both need the world size, which the Trainer knows only once built
    accum = grad_accum_steps(cfg.train.total_batch_size, cfg.data.batch_size, cfg.data.seq_len, trainer.world_size)
    log.info("gradient accumulation steps: %d (world size %d)", accum, trainer.world_size)
    trainer.accumulate_grad_batches = accum
    trainer.val_check_interval = cfg.train.val_every_n_steps * accum  # Lightning counts micro-batches

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    stop = next((c for c in trainer.callbacks if isinstance(c, SafeStop)), None)
    if stop is not None and stop.reason:
        raise RunStopped(
            f"{stop.reason}.\nCheckpoint: {stop.checkpoint}\nResume with: python scripts/train.py "
            f"<the same overrides> ckpt_path={stop.checkpoint}"
        )
    if trainer.global_step % cfg.train.val_every_n_steps:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the final val/loss is of the final weights
    val_loss = float(trainer.callback_metrics["val/loss"])
    log_final_metrics(trainer, cfg, val_loss)  # TensorBoard's HParams tab: this run beside the others
    log.info("final val/loss %.4f; run dir %s", val_loss, output_dir)
    return val_loss
