"""Experiment trackers through Lightning's loggers (conf/logger: tensorboard, csv, mlflow, wandb; docs/trackers.md), and
what Lightning leaves to us: a tracker's params are the run's HParams keys; a resumed run continues the tracker runs it
started (what reopens each is kept in the run dir); how the run ended (status.json) becomes its MLflow run's status;
and a W&B run ends with its job, so that the next job of a multirun in the same process starts its own."""

import fcntl
import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

log = logging.getLogger(__name__)

RUNS_FILE = "tracker_runs.json"  # in a run dir: {logger: the arguments that reopen its tracker run}
MLFLOW_STATUS = {"completed": "FINISHED", "pruned": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
SQLITE = "sqlite:///"  # and the store's path: sqlite:////abs/mlflow.db
STATUS_TAG = "gpt2lab.status"  # how the run ended, as the sweep summary says it (`stopped: at step 4: …`)


def start_loggers(
    loggers: DictConfig, run_dir: str | Path, resuming: bool, hparams: dict, module_hparams: dict
) -> list[Logger]:
    """conf/logger's loggers, started, with their hyperparameters: a tracker's are the run's HParams keys
    (`hparams`); TensorBoard's the module's, as Lightning gives them (its hparams.yaml; the HParams tab gets `hparams`
    beside the final metrics). Lightning's own logging of them is off (trainer.enable_autolog_hparams): it would
    give every logger the module's. Resuming, each tracker reopens the run it started in run_dir."""
    reopen = read_runs(run_dir) if resuming else {}
    with creating_sqlite_stores(loggers):
        started = {key: instantiate(cfg, **reopen.get(key, {})) for key, cfg in loggers.items()}
        _log_hyperparams(started, hparams, module_hparams, reopened=reopen.keys())  # starts the tracker runs
    _keep_runs(started, run_dir)
    return list(started.values())


@contextmanager
def creating_sqlite_stores(loggers: DictConfig) -> Iterator[None]:
    """One process at a time for the MLflow SQLite stores in `loggers`: the first to open a store creates its tables,
    the first to log to an experiment creates it, and the parallel jobs of a sweep (hydra/launcher=joblib) that share
    one would otherwise create them together and fail."""
    uris = [cfg.get("tracking_uri") or "" for cfg in loggers.values()]
    with ExitStack() as locks:
        for store in sorted(uri.removeprefix(SQLITE) for uri in uris if uri.startswith(SQLITE)):
            Path(store).parent.mkdir(parents=True, exist_ok=True)
            lock = locks.enter_context(open(f"{store}.lock", "w"))
            fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
        yield


@rank_zero_only
def _log_hyperparams(loggers: dict[str, Logger], hparams: dict, module_hparams: dict, reopened) -> None:
    for key, logger in loggers.items():
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(module_hparams)
        elif isinstance(logger, MLFlowLogger) and key in reopened:
            client, run_id = logger.experiment, logger.run_id
            client.update_run(run_id, status="RUNNING")  # again: its last start's end set another
            # MLflow keeps a param's first value: a resumed run's are as it started (trainer.max_steps may be raised)
            logged = client.get_run(run_id).data.params
            changed = {k: v for k, v in hparams.items() if k in logged and logged[k] != str(v)}
            if changed:
                log.info("MLflow run %s keeps the params it started with; this start has %s", run_id, changed)
            logger.log_hyperparams({k: v for k, v in hparams.items() if k not in logged})
        else:
            logger.log_hyperparams(hparams)


def reopen_args(logger: Logger) -> dict:
    """The arguments that reopen the tracker run `logger` started; {} for a logger without one."""
    if isinstance(logger, MLFlowLogger):
        return {"tracking_uri": logger.experiment.tracking_uri, "run_id": logger.run_id}
    if isinstance(logger, WandbLogger):
        return {"id": logger.version, "resume": "allow"}
    return {}


@rank_zero_only
def _keep_runs(loggers: dict[str, Logger], run_dir: str | Path) -> None:
    runs = {key: args for key, logger in loggers.items() if (args := reopen_args(logger))}
    if runs:
        Path(run_dir, RUNS_FILE).write_text(json.dumps(runs, indent=1) + "\n")


def read_runs(run_dir: str | Path) -> dict[str, dict]:
    """{logger: its reopen_args} of the tracker runs started in run_dir; {} if none."""
    path = Path(run_dir, RUNS_FILE)
    return json.loads(path.read_text()) if path.is_file() else {}


def record_run_end(run_dir: str | Path, status: str, summary: str) -> None:
    """How the run in run_dir ended (status: one of sweep.RUN_STATUSES; summary: its status with the detail) as its
    MLflow runs' status and STATUS_TAG. Lightning's own (FINISHED, or FAILED on any exception) is set before this.
    Any rank: in DDP the one that writes status.json (the first to end) records it here too."""
    mlflow_runs = [args for args in read_runs(run_dir).values() if "run_id" in args]  # MLFlowLogger's arguments
    if not mlflow_runs:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    for args in mlflow_runs:
        try:
            client = MlflowClient(args["tracking_uri"])
            client.set_tag(args["run_id"], STATUS_TAG, summary)
            client.set_terminated(args["run_id"], MLFLOW_STATUS[status])
        except MlflowException as e:  # the run's own record (status.json) is written: the tracker's copy may fail alone
            log.warning("could not record the end of MLflow run %s in %s: %s", args["run_id"], args["tracking_uri"], e)


@contextmanager
def finishing_wandb(loggers: list[Logger]) -> Iterator[None]:
    """W&B keeps one run per process open until wandb.finish(), which Lightning never calls: finish it when the
    training ends (failed if it raised), so that a later run in this process (a multirun's next job) gets its own."""
    if not any(isinstance(logger, WandbLogger) for logger in loggers):
        yield
        return
    try:
        yield
    except BaseException:
        _finish_wandb(exit_code=1)
        raise
    _finish_wandb(exit_code=0)


@rank_zero_only
def _finish_wandb(exit_code: int) -> None:
    import wandb

    wandb.finish(exit_code=exit_code)
