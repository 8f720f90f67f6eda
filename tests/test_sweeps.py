"""Sweeps end to end on CPU: a real Hydra multirun of scripts/train.py, a run in it that diverges, its summary, the
real TensorBoard server reading it back, Optuna, the joblib launcher, and the SLURM launcher's job script (no cluster
needed)."""

import csv
import json
import os
import re
import runpy
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import matplotlib.image
import pytest
import submitit
import yaml
from conftest import CONF_DIR, ROOT
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from omegaconf import OmegaConf, open_dict

from gpt2lab import sweep
from gpt2lab.accelerator import resolve_accelerator
from gpt2lab.errors import ConfigError, DataError, RunRequeued, RunStopped
from gpt2lab.metrics import unused_token_report
from gpt2lab.sweep import read_events, scalar_series, summarize

# every run: model=tiny, 2 optimizer steps of 4 × 32 tokens, validation (one batch) after each, no text samples
TINY_RUN = ["model=tiny", "accelerator=cpu", "trainer.max_steps=2", "data.seq_len=32", "data.val_batches=1",
            "train.val_every_n_steps=1", "~callbacks.text_samples"]  # fmt: skip
TOKENS_PER_RUN = 2 * 4 * 32  # steps × data.batch_size (conf/data) × data.seq_len


class DivergeAtLr(L.Callback):
    """A fault for the sweep tests: the run whose optim.lr (`run_lr`) is `lr` diverges, a NaN in one gradient at
    optimizer step 2 (as test_reliability's InjectNaN)."""

    def __init__(self, lr: float, run_lr: float):
        self.diverges = run_lr == lr

    def on_after_backward(self, trainer, pl_module):
        if self.diverges and trainer.global_step == 1:  # the steps done before it
            pl_module.model.transformer.wte.weight.grad[0, 0] = float("nan")


def train_script(*args: str, data_dir: Path, returncode: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "scripts/train.py", *args, f"paths.data_dir={data_dir}"]
    env = os.environ | {"PYTHONPATH": str(ROOT / "tests")}  # for a fault callback defined here
    done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == returncode, done.stderr[-3000:]
    return done


def run_dirs(sweep_dir: Path) -> list[Path]:
    return sweep.run_dirs(sweep_dir)  # in job order


def tensorboard_runs(run_dir: Path) -> list[Path]:
    return sorted({p.parent for p in run_dir.glob("**/events.out.tfevents.*")})


def read_summary(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, data_dir) -> Path:
    """One multirun over a config group (init) and a value (optim.lr): 4 runs."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    train_script("-m", "init=gpt2,unscaled", "optim.lr=3e-4,1e-3", *TINY_RUN, f"hydra.sweep.dir={sweep_dir}",
                 data_dir=data_dir)  # fmt: skip
    return sweep_dir


SWEPT = ["init=gpt2,optim.lr=0.0003", "init=gpt2,optim.lr=0.001", "init=unscaled,optim.lr=0.0003",
         "init=unscaled,optim.lr=0.001"]  # fmt: skip


@pytest.mark.slow
def test_multirun_names_each_run_dir_and_tensorboard_run_by_its_swept_overrides_only(sweep_dir):
    runs = run_dirs(sweep_dir)
    # no job number, no override every run shares (model=tiny, paths, …): what differs, the same in every sweep
    assert [r.name for r in runs] == SWEPT
    for run in runs:
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        assert set(run.name.split(",")) < set(overrides) and "model=tiny" in overrides
        assert tensorboard_runs(run) == [run]  # its events in its dir: TensorBoard names the run by the dir
        events = read_events(run)
        assert [s for s, _, _ in scalar_series(events, "val/loss")] == [1, 2]
        final = scalar_series(events, "final/val_loss")
        assert [(s, v) for s, v, _ in final] == [(2, scalar_series(events, "val/loss")[-1][1])]  # at the last step
        assert "epoch" not in {tag for e in events for tag in e.Tags()["scalars"]}  # no flat epoch chart first


@pytest.mark.slow
def test_multirun_end_writes_a_summary_table_and_plot_of_every_run(sweep_dir):
    rows = read_summary(sweep_dir)
    assert [r["run"] for r in rows] == SWEPT
    # only what differs between runs: model=tiny etc. are shared by all four
    assert [r["overrides"] for r in rows] == SWEPT
    for row, run in zip(rows, run_dirs(sweep_dir)):
        val_loss = [v for _, v, _ in scalar_series(read_events(run), "val/loss")]
        assert row["status"] == "completed"
        assert float(row["final_val_loss"]) == pytest.approx(val_loss[-1])
        assert float(row["best_val_loss"]) == pytest.approx(min(val_loss))
        assert int(row["tokens_seen"]) == TOKENS_PER_RUN
        assert 0 < float(row["wall_time_s"]) < 600
    table = (sweep_dir / "summary.md").read_text().splitlines()
    # the overrides column would repeat the run's name
    assert table[0].startswith("| run | status | final_val_loss |") and len(table) == 2 + 4
    assert table[-1].startswith("| init=unscaled,optim.lr=0.001 | completed |")
    image = matplotlib.image.imread(sweep_dir / "val_loss.png")
    assert image.shape[0] > 300 and image.shape[1] > 500


@pytest.fixture(scope="module")
def diverging_sweep(tmp_path_factory, data_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """Three runs over optim.lr; the middle one diverges at step 2 (a NaN gradient, injected)."""
    sweep_dir = tmp_path_factory.mktemp("diverging")
    fault = "+callbacks.fault={_target_:test_sweeps.DivergeAtLr,lr:6e-4,run_lr:${optim.lr}}"
    done = train_script("-m", "optim.lr=3e-4,6e-4,1e-3", fault, *TINY_RUN, f"hydra.sweep.dir={sweep_dir}",
                        data_dir=data_dir, returncode=1)  # fmt: skip
    return sweep_dir, done


@pytest.mark.slow
def test_a_run_that_diverges_is_recorded_and_the_sweep_goes_on(diverging_sweep):
    sweep_dir, done = diverging_sweep
    assert done.stderr.splitlines()[-1] == f"1 of 3 runs failed: {sweep_dir / 'summary.md'}"
    runs = run_dirs(sweep_dir)
    assert [r.name for r in runs] == ["optim.lr=0.0003", "optim.lr=0.0006", "optim.lr=0.001"]
    rows = read_summary(sweep_dir)
    assert [r["run"] for r in rows] == [r.name for r in runs]
    assert [r["status"] for r in rows[::2]] == ["completed", "completed"]
    assert re.fullmatch(r"stopped: at step 2: non-finite gradient norm \(loss [\d.]+, grad norm nan, lr [\d.e-]+\)",
                        rows[1]["status"])  # fmt: skip
    for row, run in zip(rows, runs):
        val_loss = scalar_series(read_events(run), "val/loss")
        assert float(row["final_val_loss"]) == pytest.approx(val_loss[-1][1])  # the stopped run's last one too
    assert [r["tokens_seen"] for r in rows] == [str(TOKENS_PER_RUN), "", str(TOKENS_PER_RUN)]
    assert "| optim.lr=0.0006 | stopped: at step 2: non-finite gradient norm" in (sweep_dir / "summary.md").read_text()
    assert matplotlib.image.imread(sweep_dir / "val_loss.png").shape[0] > 300
    # the stopped run says how to resume it, in its log
    stopped = runs[1]
    assert (
        f"Resume with: python scripts/train.py <the same overrides> ckpt_path=last hydra.run.dir={stopped}"
        in (stopped / "train.log").read_text()
    )
    assert (stopped / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_run_names_stay_the_same_when_the_sweep_runs_again_and_a_config_error_is_recorded(diverging_sweep, tmp_path,
                                                                                            data_dir):  # fmt: skip
    first, _ = diverging_sweep
    # the same sweep in another order, with a value no run can take: each job fails at once, and the sweep goes on
    again = tmp_path / "again"
    done = train_script("-m", "optim.lr=1e-3,6e-4,3e-4", *TINY_RUN, "trainer.max_steps=0", f"hydra.sweep.dir={again}",
                        data_dir=data_dir, returncode=1)  # fmt: skip
    assert done.stderr.splitlines()[-1] == f"3 of 3 runs failed: {again / 'summary.md'}"
    assert [r.name for r in run_dirs(again)] == [r.name for r in run_dirs(first)][::-1]
    statuses = {r["status"] for r in read_summary(again)}
    assert statuses == {"failed: config error: trainer.max_steps=0: must be >= 1 optimizer steps"}


@pytest.mark.parametrize(
    ("error", "status", "goes_on"),
    [(RunStopped("stopped at step 3: non-finite loss (loss nan); advice.\nResume with: …"),
      "stopped: at step 3: non-finite loss (loss nan)", True),
     (ConfigError("optim.lr=-1: must be positive"), "failed: config error: optim.lr=-1: must be positive", True),
     (ValueError("a bug\nits details"), "failed: ValueError: a bug", True),
     (KeyboardInterrupt(), "stopped: interrupted", False),  # a second Ctrl-C ends the whole sweep
     # a SLURM requeue: the job goes on (submitit must not get a result, or it would take the run as final)
     (RunRequeued("stopped at step 4: interrupted by SIGUSR1.\nResume with: …"),
      "stopped: at step 4: interrupted by SIGUSR1", False),
     (SystemExit(1), "stopped: interrupted", False)],  # what Lightning makes of a KeyboardInterrupt in fit
)  # fmt: skip
@pytest.mark.parametrize("mode", [RunMode.MULTIRUN, RunMode.RUN])
def test_a_job_records_how_it_ended_and_only_a_multirun_goes_on(error, status, goes_on, mode, compose_train,
                                                                 hydra_runtime, tmp_path):  # fmt: skip
    cfg = compose_train(return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode, cfg.hydra.runtime.output_dir = mode, str(tmp_path)
    hydra_runtime.set_config(cfg)
    (tmp_path / "status.json").write_text('{"status": "completed"}')  # of an earlier try in this dir: history
    goes_on = goes_on and mode == RunMode.MULTIRUN
    with nullcontext() if goes_on else pytest.raises(type(error)) as raised, sweep.recording_run_end():
        raise error
    assert goes_on or raised.value is error
    assert sweep.read_run_status(tmp_path) == status


@pytest.mark.slow
def test_summarize_script_rewrites_the_summary_and_names_a_dir_without_runs(sweep_dir, tmp_path, monkeypatch, capsys):
    before = (sweep_dir / "summary.csv").read_text()
    (sweep_dir / "summary.csv").unlink()
    monkeypatch.setattr(sys, "argv", ["summarize.py", str(sweep_dir)])
    runpy.run_path(str(ROOT / "scripts" / "summarize.py"), run_name="__main__")  # in this process: no re-imports
    assert (sweep_dir / "summary.csv").read_text() == before
    assert "| init=gpt2,optim.lr=0.0003 |" in capsys.readouterr().out

    with pytest.raises(DataError, match=rf"no Hydra runs \(\*/.hydra/overrides.yaml\) under {tmp_path}"):
        summarize(tmp_path)


@pytest.mark.slow
def test_unused_token_report_plots_a_run_and_states_the_share_of_the_loss_drop(sweep_dir):
    run = run_dirs(sweep_dir)[1]
    events = read_events(run)
    tags = ("val/loss", "val/loss_seen_vocab", "val/unseen_mass_nll", "val/loss_unseen_targets",
            "val/unseen_target_share")  # fmt: skip
    loss, seen_vocab, mass_nll, unseen_targets, share = ([v for _, v, _ in scalar_series(events, t)] for t in tags)
    parts = {
        "learning the seen vocabulary": [(1 - p) * v for p, v in zip(share, seen_vocab)],
        "the never-seen mass term": [(1 - p) * v for p, v in zip(share, mass_nll)],
        "the unseen-target positions": [p * v for p, v in zip(share, unseen_targets)],
    }
    # the logged parts add up to the logged val/loss at every validation of a real run
    assert loss == pytest.approx([sum(p[i] for p in parts.values()) for i in range(len(loss))], rel=1e-5)
    finding = unused_token_report(run)
    assert finding.startswith(f"from optimizer step 1 to 2, val/loss fell {loss[0]:.2f} → {loss[-1]:.2f}")
    for name, p in parts.items():
        drop = p[0] - p[-1]
        assert f"{name} {p[0]:.2f} → {p[-1]:.2f}: {drop:.2f} nats = {drop / (loss[0] - loss[-1]):.0%}" in finding
    assert matplotlib.image.imread(run / "unused_tokens.png").shape[0] > 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_serves_every_runs_val_loss_and_hparams(sweep_dir):
    """The real `tensorboard --logdir <sweep dir>`, read through its HTTP data API."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/data"
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep_dir), "--host", "127.0.0.1",
           "--port", str(port), "--load_fast", "false", "--reload_interval", "1"]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        expected = {str(tb.relative_to(sweep_dir)): run for run in run_dirs(sweep_dir) for tb in tensorboard_runs(run)}
        assert sorted(expected) == SWEPT  # the names a user sees: the swept overrides only
        deadline, runs = time.monotonic() + 120, []
        while time.monotonic() < deadline and sorted(runs) != sorted(expected):
            assert server.poll() is None, server.stderr.read()[-2000:]
            try:
                runs = get_json(f"{url}/runs")
            except OSError:  # not listening yet
                pass
            time.sleep(1)
        assert sorted(runs) == sorted(expected)

        for name, run in expected.items():
            query = urllib.parse.urlencode({"run": name, "tag": "val/loss"})
            served = get_json(f"{url}/plugin/scalars/scalars?{query}")  # [[wall time, step, value], …]
            on_disk = scalar_series(read_events(run), "val/loss")
            assert [s for _, s, _ in served] == [s for s, _, _ in on_disk]
            assert [v for _, _, v in served] == pytest.approx([v for _, v, _ in on_disk])

        # HParams tab: each run's hyperparameters beside its final val/loss
        groups = get_json(f"{url}/plugin/hparams/session_groups", {
            "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"], "colParams": [],
            "startIndex": 0, "sliceSize": 100,
        })["sessionGroups"]  # fmt: skip
        assert sorted(g["name"] for g in groups) == sorted(expected)
        for group in groups:
            hparams = group["hparams"]
            assert f"init={hparams['init']}" in group["name"] and hparams["model"] == "tiny"
            assert f"optim.lr={hparams['optim.lr']}" in group["name"]
            metrics = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
            final = scalar_series(read_events(expected[group["name"]]), "val/loss")[-1][1]
            assert metrics["final/val_loss"] == pytest.approx(final)
            assert metrics["final/tokens_seen"] == TOKENS_PER_RUN
        # the HParams table's columns: the swept hyperparameters first, then the others by name
        columns = [
            h["name"] for h in get_json(f"{url}/plugin/hparams/experiment", {"experimentName": ""})["hparamInfos"]
        ]
        assert columns[:2] == ["init", "optim.lr"] and "accelerator" in columns[2:]
    finally:
        server.kill()
        server.wait(timeout=30)


@pytest.mark.slow
def test_optuna_searches_lr_and_warmup_for_the_lowest_val_loss(tmp_path, data_dir):
    sweep_dir = tmp_path / "optuna"
    train_script("hparams_search=lr_optuna", "hydra.sweeper.n_trials=3", *TINY_RUN, "trainer.max_steps=1",
                 f"hydra.sweep.dir={sweep_dir}", data_dir=data_dir)  # fmt: skip
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    with (sweep_dir / "summary.csv").open() as f:
        trials = list(csv.DictReader(f))
    assert len(trials) == 3 == len(run_dirs(sweep_dir))
    assert result["best_value"] == pytest.approx(min(float(t["final_val_loss"]) for t in trials))
    assert 1e-4 <= result["best_params"]["optim.lr"] <= 3e-3
    assert result["best_params"]["scheduler.warmup_steps"] in range(0, 51, 5)
    tried = [yaml.safe_load((r / ".hydra" / "overrides.yaml").read_text()) for r in run_dirs(sweep_dir)]
    assert len({next(o for o in t if o.startswith("optim.lr=")) for t in tried}) == 3  # three different lrs


@pytest.mark.slow
def test_joblib_launcher_runs_sweep_jobs_in_parallel_processes(tmp_path, data_dir):
    sweep_dir = tmp_path / "joblib"
    train_script("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optim.lr=3e-4,1e-3", *TINY_RUN,
                 "trainer.max_steps=1", f"hydra.sweep.dir={sweep_dir}", data_dir=data_dir)  # fmt: skip
    runs = run_dirs(sweep_dir)
    assert len(runs) == 2
    # TensorBoard event file names end in <host>.<pid>.<n>: the two runs ran in two worker processes
    pids = {p.name.split(".")[-2] for run in runs for p in run.glob("**/events.out.tfevents.*")}
    assert len(pids) == 2
    assert all(scalar_series(read_events(run), "val/loss") for run in runs)


def compose_slurm(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=slurm", *overrides],
                      return_hydra_config=True)  # fmt: skip
    resolve_accelerator(cfg.accelerator)  # as train() does first
    return cfg


def test_slurm_launcher_config_yields_a_valid_sbatch_job(tmp_path, monkeypatch):
    # submitit's SLURM executor insists on finding srun; it is never run here
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\necho 'no SLURM cluster here' >&2; exit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cfg = compose_slurm("hydra.launcher.partition=gpu", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4",
                        "hydra.launcher.timeout_min=90", f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    # the executor exactly as SlurmLauncher.launch builds it (hydra_submitit_launcher 1.2): submitit checks
    # every parameter name and writes the sbatch script it would submit
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(folder=params.pop("submitit_folder"), cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))  # fmt: skip
    base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
            "stderr_to_stdout"}  # fmt: skip
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    sbatch = executor._executor._make_submission_file_text("python -m submitit.core._submit job", "uid")
    for flag in ("--partition=gpu", "--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--time=90",
                 "--cpus-per-task=8", "--signal=USR1@120", "--requeue"):  # fmt: skip
        assert f"#SBATCH {flag}\n" in sbatch, sbatch
    assert sbatch.count("--signal") == 1  # Lightning's requeue signal, not submitit's USR2 besides it
    assert "srun" in sbatch  # one task per GPU, each a Lightning process


def test_slurm_trainer_is_lightnings_multi_node_ddp_with_requeue(tmp_path, monkeypatch, hydra_runtime):
    cfg = compose_slurm("hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4", "accelerator=cpu",
                        f"paths.output_dir={tmp_path}")  # fmt: skip
    hydra_runtime.set_config(cfg)  # as Hydra does in each job
    # task 5 of 8 (node 1, GPU 1), as srun starts it: Lightning takes its rank from SLURM, trainer=slurm its layout
    for key, value in {"SLURM_NNODES": "2", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_PROCID": "5",
                       "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "train",
                       "SLURM_NODELIST": "node[1-2]"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert (trainer_cfg["num_nodes"], trainer_cfg["devices"], trainer_cfg["strategy"]) == (2, 4, "ddp")
    # Lightning records the rank in process-wide globals: put them back after, or every later run in
    # this process would think it is rank 5 and log nothing
    for rank_zero_only in (fabric_rank_zero_only, utils_rank_zero_only):
        monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False)
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (8, 5, 1, 1)


@pytest.mark.parametrize(
    ("experiment", "swept", "n_layer"),
    [("init_scaling_ablation", {"init": "gpt2,unscaled", "seed": "1337,1338"}, 12),
     ("scaling_sweep", {"model.n_embd": "64,128,256"}, 4)],
)  # fmt: skip
def test_research_experiments_are_multiruns_at_a_fixed_token_budget(experiment, swept, n_layer):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN and dict(cfg.hydra.sweeper.params) == swept
    assert cfg.model.n_layer == n_layer and cfg.model.n_head == 4
    assert cfg.trainer.max_steps * cfg.data.batch_size * cfg.data.seq_len == 102_400
