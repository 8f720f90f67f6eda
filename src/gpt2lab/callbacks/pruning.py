"""Optuna pruning: a search's run reports its val/loss to its trial as it trains and stops when the pruner says."""

import logging

import lightning as L
import optuna
from lightning.pytorch.callbacks import Callback
from optuna.trial import TrialState

from gpt2lab.errors import ConfigError
from gpt2lab.metrics import VAL_LOSS
from gpt2lab.sweep import write_run_status

log = logging.getLogger(__name__)


class OptunaPruning(Callback):
    """Reports each val/loss to trial `trial_number` of the study `study_name` in `storage` and, when the study's
    `pruner` says so, stops the run at that step. The run then ends as any run does (last.ckpt, final metrics and
    HParams, train() returns its last val/loss), but status.json says "pruned" and the trial is told PRUNED: Optuna's
    TrialPruned exception would instead cross Lightning, Hydra's job and the launcher as a failure.

    The trial is found again in the storage by its number, so the run may live in another process or on another
    machine than the sweeper that asked for it (hydra_plugins/gpt2lab_optuna). The pruner must be the study's:
    Optuna keeps no pruner in a storage, only the values it decides on.

    Validation is not Lightning's loop (GPTModule.training_step validates when it is due), so the check runs in
    on_train_batch_end, at the steps whose report carries a val/loss."""

    def __init__(
        self,
        storage: str,
        study_name: str,
        trial_number: int,
        pruner: optuna.pruners.BasePruner,
    ):
        if trial_number is None:
            raise ConfigError(
                "callbacks.optuna_pruning: this run is no trial of a search (search.trial=null); run the search as "
                "the multirun its config starts, e.g. `python scripts/train.py hparams_search=lr_optuna`"
            )
        self.storage, self.study_name, self.trial_number = storage, study_name, trial_number
        self.pruner = pruner
        self.trial: optuna.Trial | None = None  # rank 0's, from setup on
        self.reason: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self.trial is None:  # one rank reports: the values are the same on all
            storage = optuna.storages.RDBStorage(self.storage)
            study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=self.pruner)
            study_id = storage.get_study_id_from_name(self.study_name)
            self.trial = optuna.Trial(
                study, storage.get_trial_id_from_study_id_trial_number(study_id, self.trial_number)
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step, val_loss = outputs["report"].step, outputs["report"].val_loss  # the same on every rank
        if val_loss is None:
            return  # no validation at this step
        prune = False
        if trainer.is_global_zero:
            self.trial.report(val_loss, step)
            # at the last step the run is done anyway: its value goes to the study as the trial's result
            prune = step < trainer.max_steps and self.trial.should_prune()
        if not trainer.strategy.broadcast(prune, src=0):
            return
        trainer.should_stop = True  # stop after this step, as SafeStop does: its scalars logged, last.ckpt saved
        pruner = type(self.pruner).__name__
        self.reason = f"at step {step} of {trainer.max_steps} by {pruner} ({VAL_LOSS} {val_loss:.4f})"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.reason is None or not trainer.is_global_zero:
            return
        log.info("trial %d pruned %s", self.trial_number, self.reason)
        write_run_status(trainer.default_root_dir, "pruned", self.reason)  # stands: the run's end writes no other
        self.trial.study.tell(self.trial, state=TrialState.PRUNED)  # its value: the last one reported
