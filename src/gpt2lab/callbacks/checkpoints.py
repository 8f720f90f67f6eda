"""Checkpoints at optimizer-step boundaries: periodic ones, and last.ckpt at the step a run ends."""

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint


class Checkpoints(Checkpoint):
    """Writes `step<N>.ckpt` every `every_n_train_steps` optimizer steps (all kept), and `last.ckpt` beside each
    and at the step the run ends: max_steps reached, or a stop another callback asked for with
    `trainer.should_stop` (a signal, a non-finite step). Lightning runs Checkpoint callbacks after the others, so
    a stop asked at a step is saved at that step.

    A checkpoint holds the state after a whole optimizer step (its validation included): the weights, the
    optimizer and LR schedule, the step count and the train loader's position. (Lightning's ModelCheckpoint
    writes last.ckpt at the end only if nothing was saved before, so a 7-step run with checkpoints every 5
    would end with last.ckpt at step 5.)"""

    def __init__(self, dirpath: str, every_n_train_steps: int | None):
        super().__init__()
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(
                f"callbacks.model_checkpoint.every_n_train_steps={every_n_train_steps}: must be >= 1 or null"
            )
        self.dirpath, self.every_n_train_steps = Path(dirpath), every_n_train_steps

    @property
    def last(self) -> Path:
        return self.dirpath / "last.ckpt"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        report = outputs["report"]  # one batch is one optimizer step
        if not (report.due(self.every_n_train_steps) or trainer.should_stop):
            return
        if self.every_n_train_steps and report.step % self.every_n_train_steps == 0:  # the periodic ones are kept
            trainer.save_checkpoint(self.dirpath / f"step{report.step:06d}.ckpt")
        trainer.save_checkpoint(self.last)
