import logging
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gpt2lab import checkpoint
from gpt2lab.accelerator import resolve_accelerator, set_up_process
from gpt2lab.config import check_config, register_resolvers, slurm_job_id
from gpt2lab.errors import ConfigError, RunStopped
from gpt2lab.metrics import VAL_LOSS
from gpt2lab.sweep import log_final_metrics, run_hparams
from gpt2lab.trackers import finishing_wandb, start_loggers

log = logging.getLogger(__name__)

__all__ = ["RunStopped", "resume_from", "train"]


def resume_from(ckpt_path: str | None, checkpoint_dir: str | os.PathLike) -> str | None:
    """`ckpt_path=last` is this run dir's last.ckpt (resume a run by running again in its dir:
    `hydra.run.dir=outputs/runs/<run>`); any other value is a checkpoint file. Either must exist. Unset, a
    SLURM job resumes from its run dir's last.ckpt when there is one: it was requeued (SafeStop)."""
    last = Path(checkpoint_dir) / "last.ckpt"
    if ckpt_path is None:
        if slurm_job_id() and last.is_file():
            log.info("SLURM job %s was requeued: resuming from %s", slurm_job_id(), last)
            return str(last)
        return None
    path = last if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        how = "python scripts/train.py ckpt_path=last hydra.run.dir=outputs/runs/<the run to resume>"
        raise ConfigError(
            f"ckpt_path={ckpt_path}: no checkpoint at {path}; resume a run with `{how}`, "
            "or set ckpt_path=<a .ckpt file>"
        )
    return str(path)


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> float:
    """Instantiate data, module, callbacks, loggers and Trainer from `cfg`, fit, and return the final
    val/loss (the metric a sweeper minimizes). `callbacks` join cfg.callbacks: objects a config cannot
    describe (a search's pruner, which holds its trial). A run stopped early (a signal, a non-finite step) raises
    RunStopped once its checkpoint is written."""
    register_resolvers()  # for a job process that did not compose its config (a submitit or SLURM launcher's)
    resolve_accelerator(cfg.accelerator)  # each `auto` setting: the device's default
    check_config(cfg)
    ckpt_path = resume_from(cfg.ckpt_path, cfg.callbacks.model_checkpoint.dirpath)  # before any work
    if ckpt_path is not None and cfg.ckpt_path is None:  # a requeued SLURM job resuming by itself (resume_from)
        step, val_loss = checkpoint.progress(ckpt_path)
        if step >= cfg.trainer.max_steps:  # requeued after its last step: nothing is left to do
            log.info("%s is at step %d of trainer.max_steps=%d: the run is complete", ckpt_path, step,
                     cfg.trainer.max_steps)  # fmt: skip
            return float("nan") if val_loss is None else val_loss
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "resolved_config.yaml", resolve=True)
    L.seed_everything(cfg.seed, workers=True)
    accelerator = cfg.accelerator
    log.info(
        "using device: %s (precision %s, attention %s)", accelerator.name, accelerator.precision, accelerator.attention
    )
    set_up_process(accelerator.matmul_precision, accelerator.malloc)

    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module)
    loggers = start_loggers(
        cfg.logger, output_dir, resuming=ckpt_path is not None, hparams=run_hparams(cfg),
        module_hparams=module.hparams_initial,
    )  # fmt: skip
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=[*(instantiate(c) for c in cfg.callbacks.values()), *callbacks], logger=loggers
    )
    with finishing_wandb(loggers):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if VAL_LOSS not in trainer.callback_metrics:  # no step ran: the checkpoint was already at max_steps
            raise ConfigError(
                f"nothing to train: {ckpt_path} is at step {trainer.global_step}, "
                f"trainer.max_steps={cfg.trainer.max_steps}; "
                "raise trainer.max_steps to extend the run"
            )
        val_loss = float(trainer.callback_metrics[VAL_LOSS])  # validated at the last step
        log_final_metrics(trainer, cfg, val_loss, trainer.global_step * datamodule.tokens_per_step)
    log.info("final val/loss %.4f; run dir %s", val_loss, output_dir)
    return val_loss
