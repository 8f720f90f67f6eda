"""Experiment trackers (conf/logger) on real runs, read back through each tracker's own reader: MLflow's client on the
run's SQLite store, the CSV file, W&B's offline transaction log; compared with the TensorBoard events of the same run."""

import csv
import json
import multiprocessing
import struct
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import TINY_RUN, compose_train_in, train_script
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from wandb.proto import wandb_internal_pb2

from gpt2lab.errors import RunStopped
from gpt2lab.sweep import read_events, recording_run_end, run_dirs, scalar_series
from gpt2lab.trackers import RUNS_FILE, STATUS_TAG, start_loggers
from gpt2lab.train import train

TINY = ["model=tiny", "accelerator=cpu", "accelerator.precision=32-true", "data.seq_len=32", "data.batch_size=2",
        "data.val_batches=1", "~callbacks.text_samples"]  # fmt: skip


@contextmanager
def hydra_job(run_dir: Path, data_dir: Path, *overrides: str) -> Iterator[DictConfig]:
    """The config of a run as Hydra gives it to scripts/train.py's job (its runtime config set, `hydra` left out),
    for `with recording_run_end(): train(cfg)`, the job's own body."""
    cfg = compose_train_in(run_dir, data_dir, *overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode, cfg.hydra.runtime.output_dir = RunMode.RUN, str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        yield cfg
    finally:
        HydraConfig.instance().cfg = None


def train_job(run_dir: Path, data_dir: Path, *overrides: str) -> float:
    with hydra_job(run_dir, data_dir, *overrides) as cfg, recording_run_end():
        return train(cfg)


def mlflow_runs(store: Path, experiment: str) -> list:
    """The runs of `experiment` in the SQLite store, as `mlflow ui` lists them (oldest first)."""
    client = MlflowClient(f"sqlite:///{store}")
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], order_by=["start_time ASC"])


def history(store: Path, run, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(f"sqlite:///{store}").get_metric_history(run.info.run_id, key)]


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's TensorBoard events (all its starts), (step, value) in the order they were logged."""
    events = read_events(run_dir)
    tags = {tag for e in events for tag in e.Tags()["scalars"]}
    return {tag: [(step, value) for step, value, _ in scalar_series(events, tag)] for tag in tags}


def tensorboard_hparams(run_dir: Path) -> set[str]:
    """The names of the hyperparameters in the HParams tab's session of the run."""
    (events,) = read_events(run_dir)
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return set(HParamsPluginData.FromString(content).session_start_info.hparams)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, data_dir) -> Path:
    """A run with TensorBoard, MLflow and CSV to step 2, then resumed in its dir (ckpt_path=last) to step 4."""
    run_dir = tmp_path_factory.mktemp("resumed")
    loggers = ["logger=[tensorboard,mlflow,csv]", *TINY]
    train_job(run_dir, data_dir, *loggers, "trainer.max_steps=2")
    train_job(run_dir, data_dir, *loggers, "trainer.max_steps=4", "ckpt_path=last")
    return run_dir


def test_mlflow_params_are_the_hparams_keys_tensorboard_shows(resumed_run):
    (run,) = mlflow_runs(resumed_run / "mlflow.db", "gpt2lab")
    assert run.data.params.keys() == tensorboard_hparams(resumed_run)
    assert {k: run.data.params[k] for k in ("model", "model.n_layer", "optim.lr", "data.seq_len")} == {
        "model": "tiny", "model.n_layer": "4", "optim.lr": "0.0006", "data.seq_len": "32"
    }  # fmt: skip
    assert run.data.params["trainer.max_steps"] == "2"  # MLflow keeps a param's first value


def test_mlflow_holds_every_scalar_at_tensorboards_steps_and_a_resumed_run_logs_each_step_once(resumed_run):
    store = resumed_run / "mlflow.db"
    (run,) = mlflow_runs(store, "gpt2lab")  # the resumed start continued the first start's run
    assert json.loads((resumed_run / RUNS_FILE).read_text())["mlflow"]["run_id"] == run.info.run_id
    tensorboard = tensorboard_scalars(resumed_run)
    assert run.data.metrics.keys() == tensorboard.keys()
    for tag, points in tensorboard.items():
        logged = history(store, run, tag)
        assert [step for step, _ in logged] == [step for step, _ in points], tag
        assert [value for _, value in logged] == pytest.approx([value for _, value in points], rel=1e-6), tag
    assert [step for step, _ in history(store, run, "train/loss")] == [1, 2, 3, 4]
    assert [step for step, _ in history(store, run, "val/loss")] == [2, 4]  # the last step of each start
    assert [step for step, _ in history(store, run, "final/tokens_seen")] == [2, 4]
    assert run.data.metrics["final/tokens_seen"] == 4 * 2 * 32  # steps × data.batch_size × data.seq_len
    assert run.data.metrics["final/val_loss"] == pytest.approx(tensorboard["val/loss"][-1][1], rel=1e-6)
    assert (run.info.run_name, run.info.status) == (resumed_run.name, "FINISHED")
    assert run.data.tags[STATUS_TAG] == "completed"


def test_csv_logger_writes_every_scalar_at_tensorboards_steps_a_file_per_start(resumed_run):
    rows = []
    for start in ("version_0", "version_1"):
        with (resumed_run / "csv" / start / "metrics.csv").open() as f:
            rows += list(csv.DictReader(f))
    for tag, points in tensorboard_scalars(resumed_run).items():
        logged = [(int(row["step"]), float(row[tag])) for row in rows if row.get(tag)]
        assert [step for step, _ in logged] == [step for step, _ in points], tag
        assert [value for _, value in logged] == pytest.approx([value for _, value in points], rel=1e-6), tag


def test_mlflow_alone_logs_no_tensorboard_events_and_records_a_stopped_run(tmp_path, data_dir):
    """logger=mlflow: the run's scalars and its end in MLflow; a run that stops (a non-finite step) is KILLED, and
    its tag says why, as the sweep summary would."""
    run_dir = tmp_path / "run"
    with pytest.raises(RunStopped):
        train_job(run_dir, data_dir, "logger=mlflow", *TINY, "trainer.max_steps=4", "optim.lr=1e30")
    (run,) = mlflow_runs(run_dir / "mlflow.db", "gpt2lab")
    assert not list(run_dir.glob("**/events.out.tfevents.*"))
    assert run.info.status == "KILLED"
    assert run.data.tags[STATUS_TAG].startswith("stopped: at step 2: non-finite")
    assert [step for step, _ in history(run_dir / "mlflow.db", run, "train/loss")] == [1, 2]


BLOCK = 32 * 1024  # of the LevelDB log format that W&B's transaction log (.wandb) is written in


def wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of an offline run's .wandb file (wandb 0.31 has no Python reader): a 7-byte header, then LevelDB
    log records (a 7-byte header each: checksum, length, type) that join into protobuf Records."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, chunk, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL, or the LAST part of a record
            records.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return records


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B writes some keys as their parts


def wandb_offline_run(offline_dir: Path) -> tuple[wandb_internal_pb2.RunRecord, dict, dict[str, list]]:
    """An offline run's run record, config and history ({key: [(trainer/global_step, value)]})."""
    (path,) = offline_dir.glob("run-*.wandb")
    records = wandb_records(path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item_key(i): json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update}
    steps: dict[str, list] = {}
    for r in records:
        if r.HasField("history"):
            items = {item_key(i): json.loads(i.value_json) for i in r.history.item}
            for key, value in items.items():
                if not key.startswith("_") and key != "trainer/global_step":
                    steps.setdefault(key, []).append((items["trainer/global_step"], value))
    return run, config, steps


def test_wandb_offline_run_has_the_run_name_and_a_resumed_run_keeps_its_id(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # and no network here
    run_dir = tmp_path / "run"
    train_job(run_dir, data_dir, "logger=[tensorboard,wandb]", *TINY, "trainer.max_steps=2")
    train_job(run_dir, data_dir, "logger=[tensorboard,wandb]", *TINY, "trainer.max_steps=3", "ckpt_path=last")
    run_id = json.loads((run_dir / RUNS_FILE).read_text())["wandb"]["id"]
    starts = sorted((run_dir / "wandb").glob("offline-run-*"))  # one per start, named <date>_<time>-<run id>
    assert [d.name.rsplit("-", 1)[1] for d in starts] == [run_id, run_id]
    (first, config, first_steps), (resumed, _, resumed_steps) = map(wandb_offline_run, starts)
    assert (first.display_name, first.project, first.run_group) == (run_dir.name, "gpt2lab", "")
    assert resumed.run_id == run_id and resumed.display_name == run_dir.name
    assert config["model"] == "tiny" and config["optim.lr"] == 0.0006
    tensorboard = tensorboard_scalars(run_dir)
    assert first_steps.keys() == tensorboard.keys()
    for tag, points in tensorboard.items():
        assert [step for step, _ in first_steps[tag] + resumed_steps[tag]] == [step for step, _ in points], tag
    assert [step for step, _ in resumed_steps["train/loss"]] == [3]


@pytest.mark.slow
def test_a_sweep_is_one_mlflow_experiment_and_wandb_group_named_after_its_dir(tmp_path, data_dir, monkeypatch):
    """A 2-run multirun, its jobs in one process (Hydra's basic launcher); the second diverges at step 2."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep_dir = tmp_path / "sweep"
    fault = "+callbacks.fault={_target_:test_sweep_failures.DivergeAtLr,lr:6e-4,run_lr:${optim.lr}}"
    train_script("-m", "optim.lr=3e-4,6e-4", fault, "logger=[mlflow,wandb]", *TINY_RUN, f"hydra.sweep.dir={sweep_dir}",
                 data_dir=data_dir, returncode=1)  # fmt: skip
    names = [run.name for run in run_dirs(sweep_dir)]
    assert names == ["optim.lr=0.0003", "optim.lr=0.0006"]
    completed, stopped = runs = mlflow_runs(sweep_dir / "mlflow.db", sweep_dir.name)  # the one store of the sweep
    assert [run.info.run_name for run in runs] == names
    assert [run.data.params["optim.lr"] for run in runs] == ["0.0003", "0.0006"]
    assert (completed.info.status, completed.data.tags[STATUS_TAG]) == ("FINISHED", "completed")
    assert stopped.info.status == "KILLED"
    assert stopped.data.tags[STATUS_TAG].startswith("stopped: at step 2: non-finite gradient norm")
    assert [step for step, _ in history(sweep_dir / "mlflow.db", completed, "train/loss")] == [1, 2]
    # W&B: a run of its own for each job, though both ran in one process, grouped by the sweep
    offline = [sorted((sweep_dir / name / "wandb").glob("offline-run-*")) for name in names]
    assert [len(starts) for starts in offline] == [1, 1]
    wandb_runs = [wandb_offline_run(starts[0])[0] for starts in offline]
    assert [(r.display_name, r.run_group, r.project) for r in wandb_runs] == [
        (name, sweep_dir.name, "gpt2lab") for name in names
    ]
    assert wandb_runs[0].run_id != wandb_runs[1].run_id


def start_mlflow_run(store: Path, run_dir: Path) -> str:
    loggers = OmegaConf.create({"mlflow": {"_target_": "lightning.pytorch.loggers.MLFlowLogger",
                                           "tracking_uri": f"sqlite:///{store}", "experiment_name": "sweep"}})  # fmt: skip
    run_dir.mkdir()
    (logger,) = start_loggers(loggers, run_dir, resuming=False, hparams={"optim.lr": 1e-3}, module_hparams={})
    return logger.run_id


def test_parallel_jobs_that_share_a_new_mlflow_store_both_start_their_runs(tmp_path):
    """As a sweep's jobs under hydra/launcher=joblib: two processes at once (forked: no imports to wait for), the
    store not created yet."""
    store = tmp_path / "mlflow.db"
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as jobs:
        run_ids = list(jobs.map(start_mlflow_run, [store] * 2, [tmp_path / "a", tmp_path / "b"]))
    assert sorted(run.info.run_id for run in mlflow_runs(store, "sweep")) == sorted(run_ids)
