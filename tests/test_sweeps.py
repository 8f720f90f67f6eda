"""Sweeps end to end on CPU: a real Hydra multirun of scripts/train.py, a run in it that diverges, its summary, the
real TensorBoard server reading it back, Optuna, the joblib launcher, and the SLURM launcher's job script (no cluster
needed)."""

import csv
import json
import runpy
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml
from conftest import CONF_DIR, ROOT, TINY_RUN, TOKENS_PER_RUN, read_summary, train_script
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from hydra.utils import instantiate

from gpt2lab.errors import DataError
from gpt2lab.metrics import unused_token_report
from gpt2lab.sweep import read_events, run_dirs, scalar_series, summarize


def tensorboard_runs(run_dir: Path) -> list[Path]:
    return sorted({p.parent for p in run_dir.glob("**/events.out.tfevents.*")})


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
    runs_table, groups_table = (t.splitlines() for t in (sweep_dir / "summary.md").read_text().split("\n\n"))
    # the overrides column would repeat the run's name
    assert runs_table[0].startswith("| run | status | final_val_loss |") and len(runs_table) == 2 + 4
    assert runs_table[-1].startswith("| init=unscaled,optim.lr=0.001 | completed |")
    # no seed swept: each run is a group of one, with no CI and no test, compared with the first
    assert groups_table[0].startswith("| group | completed | final val/loss (± 95% CI) | sd | Δ vs init=gpt2,optim.lr=")
    assert groups_table[-1].startswith(
        f"| init=unscaled,optim.lr=0.001 | 1 of 1 | {float(rows[-1]['final_val_loss']):.4f}"
    )
    assert len(groups_table) == 2 + 4
    assert groups_table[-1].endswith(" (no CI: n = 1) | – | – | – |")  # a Δ, but no p, Holm p or verdict
    image = matplotlib.image.imread(sweep_dir / "val_loss.png")
    assert image.shape[0] > 300 and image.shape[1] > 500


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


@pytest.mark.parametrize(
    ("experiment", "swept", "n_layer"),
    [("init_scaling_ablation", {"init": "gpt2,unscaled", "seed": "1337,1338"}, 12),
     ("scaling_sweep", {"model.n_embd": "32,48,64,96,128", "seed": "1337,1338,1339"}, 4)],
)  # fmt: skip
def test_research_experiments_are_multiruns_at_a_fixed_token_budget(experiment, swept, n_layer):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN and dict(cfg.hydra.sweeper.params) == swept
    assert cfg.model.n_layer == n_layer and cfg.model.n_head == 4
    assert cfg.trainer.max_steps * cfg.data.batch_size * cfg.data.seq_len == 102_400


def test_scaling_sweep_is_five_widths_under_mup_at_one_transferred_lr_within_one_pass_of_the_text(compose_train):
    """experiment=scaling_sweep: ≥ 5 widths, μP (so the base width's best lr is every width's), seeds, and no run
    trains on more tokens than Tiny Shakespeare's training split holds (counted in the prepared shard)."""
    cfg = compose_train("experiment=scaling_sweep", return_hydra_config=True)
    widths = [int(w) for w in cfg.hydra.sweeper.params["model.n_embd"].split(",")]
    assert len(widths) >= 5 and cfg.model.parametrization == "mup" and cfg.model.mup_base_width in widths
    assert len(cfg.hydra.sweeper.params["seed"].split(",")) >= 3
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # Tiny Shakespeare's shards, once per session
    (shard,) = Path(datamodule.data_dir).glob("train_*.bin")
    train_tokens = np.fromfile(shard, dtype=np.int32, count=3)[2]  # llm.c's header: magic, version, token count
    assert cfg.trainer.max_steps * cfg.data.batch_size * cfg.data.seq_len <= train_tokens
