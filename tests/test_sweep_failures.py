"""A sweep's failures are data: a run that diverges, stops or fails on its config is recorded (status.json, the
summary's status column) and the multirun goes on to its next run, then exits non-zero saying how many failed; a
single run raises as before; a second Ctrl-C or a SLURM requeue ends the job as it is."""

import hashlib
import re
import shutil
import subprocess
from contextlib import nullcontext
from pathlib import Path

import matplotlib.image
import pytest
from conftest import TINY_RUN, TOKENS_PER_RUN, InjectGradient, read_summary, train_script
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from gpt2lab import sweep
from gpt2lab.errors import ConfigError, RunRequeued, RunStopped, RunTerminated
from gpt2lab.sweep import read_events, run_dirs, scalar_series


class DivergeAtLr(InjectGradient):
    """A fault for the sweep tests: the run whose optim.lr (`run_lr`) is `lr` diverges, a NaN in one gradient at
    optimizer step 2."""

    def __init__(self, lr: float, run_lr: float):
        super().__init__(at_step=2 if run_lr == lr else 0)


@pytest.fixture(scope="module")
def diverging_sweep(tmp_path_factory, data_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """Three runs over optim.lr; the middle one diverges at step 2 (a NaN gradient, injected)."""
    sweep_dir = tmp_path_factory.mktemp("diverging")
    fault = "+callbacks.fault={_target_:test_sweep_failures.DivergeAtLr,lr:6e-4,run_lr:${optim.lr}}"
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
    assert [(r["status"], r["detail"]) for r in rows[::2]] == [("completed", ""), ("completed", "")]
    assert rows[1]["status"] == "stopped"
    assert re.fullmatch(r"at step 2: non-finite gradient norm \(loss [\d.]+, grad norm nan, lr [\d.e-]+\)",
                        rows[1]["detail"])  # fmt: skip
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
    statuses = {(r["status"], r["detail"]) for r in read_summary(again)}
    assert statuses == {("failed", "config error: trainer.max_steps=0: must be >= 1 optimizer steps")}


def file_digests(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.mark.slow
def test_a_second_sweep_into_the_same_dir_that_differs_only_in_a_shared_override_leaves_the_first_sweeps_runs_alone(
    diverging_sweep, tmp_path, data_dir
):
    """Both sweeps vary optim.lr only, so their runs of optim.lr=0.001 have one name; the second's shares seed=7."""
    sweep_dir = shutil.copytree(diverging_sweep[0], tmp_path / "sweep")
    first = {run.name: file_digests(run) for run in run_dirs(sweep_dir)}
    second = ("-m", "optim.lr=1e-3,2e-3", "seed=7", *TINY_RUN, f"hydra.sweep.dir={sweep_dir}")
    done = train_script(*second, data_dir=data_dir, returncode=1)  # the summary is the dir's: the first's stopped run
    assert done.stderr.splitlines()[-1] == f"1 of 5 runs failed: {sweep_dir / 'summary.md'}"
    assert f"{sweep_dir / 'optim.lr=0.001'} holds a run of other overrides" in done.stdout + done.stderr
    # again: each run finds its own dir, the one with ~2 too
    done = train_script(*second, data_dir=data_dir, returncode=1)
    assert "holds a run of other overrides" not in done.stdout + done.stderr
    # resumed one step further: each continues its own run, the one whose overrides are closest (not the first's)
    train_script(*second, "ckpt_path=last", "trainer.max_steps=3", data_dir=data_dir, returncode=1)
    runs = {run.name: run for run in run_dirs(sweep_dir)}
    assert sorted(runs) == [*sorted(first), "optim.lr=0.001~2", "optim.lr=0.002"]
    assert {name: file_digests(runs[name]) for name in first} == first  # not a byte of the first sweep changed
    for name in ("optim.lr=0.001~2", "optim.lr=0.002"):
        assert "seed=7" in (runs[name] / ".hydra" / "overrides.yaml").read_text()
        assert OmegaConf.load(runs[name] / "resolved_config.yaml").seed == 7
        steps = [s for s, _, _ in scalar_series(read_events(runs[name]), "val/loss")]
        assert steps == [1, 2, 1, 2, 3]  # ran twice, then resumed from its step 2
    assert [r["run"] for r in read_summary(sweep_dir)] == list(runs)  # the summary holds both sweeps' runs


@pytest.mark.parametrize(
    ("error", "status", "goes_on"),
    [(RunStopped("at step 3: non-finite loss (loss nan)", "stopped at step 3: …; advice.\nResume with: …"),
      "stopped: at step 3: non-finite loss (loss nan)", True),
     (ConfigError("optim.lr=-1: must be positive"), "failed: config error: optim.lr=-1: must be positive", True),
     (ValueError("a bug\nits details"), "failed: ValueError: a bug", True),
     (KeyboardInterrupt(), "stopped: interrupted", False),  # a second Ctrl-C ends the whole sweep
     # a SLURM requeue: the job goes on (submitit must not get a result, or it would take the run as final)
     (RunRequeued("interrupted by SIGUSR1 after step 4", "interrupted by SIGUSR1 after step 4.\nResume with: …"),
      "stopped: interrupted by SIGUSR1 after step 4", False),
     # SIGTERM asks the process to end (a cluster pre-empting it): the sweep too, not only the run under way
     (RunTerminated("interrupted by SIGTERM after step 3", "interrupted by SIGTERM after step 3.\nResume with: …"),
      "stopped: interrupted by SIGTERM after step 3", False),
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
    assert str(sweep.read_run_status(tmp_path)) == status
