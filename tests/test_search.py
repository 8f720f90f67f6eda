"""Optuna search end to end on CPU: the real sweeper (hydra_plugins/gpt2lab_optuna) driving scripts/train.py, a
pruner stopping a hopeless trial from its val/loss, a diverging trial failing without ending the study, and the
study resumed from its SQLite file after a search was killed."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import ROOT, inject_gradient
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from gpt2lab.errors import ConfigError
from gpt2lab.search import search_space
from gpt2lab.sweep import read_events, run_hparams, scalar_series

# model=tiny, 3 optimizer steps of 2 × 32 tokens, validation (one batch) after each; the median pruner active once
# two trials have completed
SEARCH = ["hparams_search=lr_optuna", "model=tiny", "accelerator=cpu", "trainer.max_steps=3", "data.batch_size=2",
          "data.seq_len=32",
          "data.val_batches=1", "train.val_every_n_steps=1", "~callbacks.text_samples",
          "hydra.sweeper.pruner.n_startup_trials=2",
          # a fault as a parameter, so that one trial diverges: a non-finite gradient at step `at_step` (99: none)
          inject_gradient(99, "inf"),  # an inf gradient at a chosen step: a run that diverges
          "callbacks.inject.at_step=choice(2, 99)"]  # fmt: skip
GOOD = {"optim.lr": 3e-3, "scheduler.warmup_steps": 0, "callbacks.inject.at_step": 99}
DIVERGES = GOOD | {"callbacks.inject.at_step": 2}
HOPELESS = {"optim.lr": 1e-4, "scheduler.warmup_steps": 45, "callbacks.inject.at_step": 99}  # lr ≈ 2e-6 at step 1


def search(sweep_dir: Path, data_dir: Path, n_trials: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "scripts/train.py", *SEARCH, f"hydra.sweeper.n_trials={n_trials}",
           f"hydra.sweep.dir={sweep_dir}", f"paths.data_dir={data_dir}"]  # fmt: skip
    python_path = [str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]  # keep a worktree's src/
    env = os.environ | {"PYTHONPATH": os.pathsep.join(python_path)}  # tests/: InjectGradient, for the runs' Hydra
    # not check=True: the exit status counts failed runs (the diverging trial)
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def val_steps(run_dir: Path) -> list[int]:
    return [step for step, _, _ in scalar_series(read_events(run_dir), "val/loss")]


@pytest.mark.slow
def test_search_prunes_a_hopeless_trial_fails_a_diverging_one_and_resumes_from_its_sqlite_file(tmp_path, data_dir):
    sweep_dir = tmp_path / "search"
    sweep_dir.mkdir()
    storage = f"sqlite:///{sweep_dir}/optuna.db"  # the default: sqlite:///${hydra.sweep.dir}/optuna.db
    # the study the search will find and go on with: its first four trials fixed, in this order
    study = optuna.create_study(study_name="lr_warmup", storage=storage)
    for params in (GOOD, GOOD, DIVERGES, HOPELESS):
        study.enqueue_trial(params)

    done = search(sweep_dir, data_dir, n_trials=4)
    trials = optuna.load_study(study_name="lr_warmup", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL, TrialState.PRUNED], done.stderr
    assert val_steps(sweep_dir / "0") == val_steps(sweep_dir / "1") == [1, 2, 3]
    assert val_steps(sweep_dir / "2") == [1, 2]  # stopped at step 2 (validated, but not applied)
    # pruned at its first validation: worse than the median of the two completed trials at step 1
    assert val_steps(sweep_dir / "3") == [1] and trials[3].intermediate_values.keys() == {1}
    assert trials[3].intermediate_values[1] > trials[0].intermediate_values[1]
    status = json.loads((sweep_dir / "3" / "status.json").read_text())
    assert status == {"status": "pruned", "detail": f"at step 1 of 3 by MedianPruner (val/loss {trials[3].value:.4f})"}
    # it ended as a run does, not as a failure: its final val/loss (that of step 1) beside its HParams
    assert [v for _, v, _ in scalar_series(read_events(sweep_dir / "3"), "final/val_loss")] == [trials[3].value]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["trials"] == {"COMPLETE": 2, "FAIL": 1, "PRUNED": 1}
    assert results["best_value"] == pytest.approx(trials[0].value) and results["best_params"] == GOOD

    # a trial left RUNNING by a search that was killed (its process is gone): it fails when the search resumes
    gone = subprocess.Popen(["true"])
    gone.wait()
    study.ask().set_user_attr("sweeper", f"{socket.gethostname()}:{gone.pid}")

    # the same command with a larger study: trial 5 runs; 0-3 are neither run again nor changed
    events = {p: p.stat().st_size for p in sweep_dir.glob("[0-3]/**/events.out.tfevents.*")}
    done = search(sweep_dir, data_dir, n_trials=6)
    resumed = optuna.load_study(study_name="lr_warmup", storage=storage).get_trials()
    assert [t.number for t in resumed] == list(range(6)), done.stderr
    assert [(t.params, t.state) for t in resumed[:4]] == [(t.params, t.state) for t in trials]
    assert {p: p.stat().st_size for p in sweep_dir.glob("[0-3]/**/events.out.tfevents.*")} == events
    assert resumed[4].state == TrialState.FAIL and not (sweep_dir / "4").exists()
    assert resumed[5].state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    assert 1e-4 <= resumed[5].params["optim.lr"] <= 3e-3  # sampled by TPE from lr_optuna's space
    overrides = yaml.safe_load((sweep_dir / "5" / ".hydra" / "overrides.yaml").read_text())
    assert "search.trial=5" in overrides and f"optim.lr={resumed[5].params['optim.lr']}" in overrides


def test_search_space_is_hydras_sweep_syntax_and_the_command_line_overrides_params():
    overrides = OverridesParser.create().parse_overrides(
        ["optim.lr=tag(log, interval(1e-4, 3e-3))", "scheduler.warmup_steps=range(0, 50, step=5)", "init=gpt2,unscaled",
         "model.n_embd=choice(64, 128)", "model=tiny", "optim.lr=1e-3"]  # the last: a fixed lr, over the params'
    )  # fmt: skip
    fixed, space = search_space(overrides)
    assert fixed == ["optim.lr=0.001", "model=tiny"]
    assert space == {
        "scheduler.warmup_steps": IntDistribution(0, 45, step=5),  # range's stop is excluded
        "init": CategoricalDistribution(["gpt2", "unscaled"]),
        "model.n_embd": CategoricalDistribution([64, 128]),
    }
    assert search_space(overrides[:1])[1] == {"optim.lr": FloatDistribution(1e-4, 3e-3, log=True)}
    with pytest.raises(ConfigError, match=r"optim.lr=glob\(\*\): not a search space; use choice"):
        search_space(OverridesParser.create().parse_overrides(["optim.lr=glob(*)"]))


@pytest.mark.parametrize("pruner", ["median", "hyperband", "none"])
def test_each_run_of_a_search_builds_the_studys_pruner_from_the_sweepers_config(compose_train, hydra_runtime, pruner):
    cfg = compose_train("hparams_search=lr_optuna", f"hydra/sweeper/pruner={pruner}", "search.trial=7",
                        "hydra.sweep.dir=/sweeps/lr", return_hydra_config=True)  # fmt: skip
    hydra_runtime.set_config(cfg)  # as Hydra's run_job does: the run's config resolves ${hydra:...} through it
    assert cfg.hydra.sweep.subdir == "7"  # the trial's run dir: <sweep dir>/<trial number>
    callback = instantiate(cfg.callbacks.optuna_pruning)
    assert (callback.storage, callback.study_name, callback.trial_number) == (
        "sqlite:////sweeps/lr/optuna.db",
        "lr_warmup",
        7,
    )
    kind = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner}
    assert type(callback.pruner) is kind.get(pruner, optuna.pruners.NopPruner)
    assert isinstance(instantiate(cfg.hydra.sweeper.sampler), optuna.samplers.TPESampler)
    assert next(iter(run_hparams(cfg).items())) == ("search.trial", 7)  # first in the HParams tab
