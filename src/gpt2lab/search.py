"""Hyperparameter search with Optuna (>= 4), as a Hydra sweeper (hydra_plugins/gpt2lab_optuna; configs:
conf/hparams_search/, conf/hydra/sweeper/): a study over any overrides, each trial a normal run of the multirun in
<sweep dir>/<trial number>, pruned on its val/loss as it trains (gpt2lab.callbacks.pruning). The study lives in a
storage URL, SQLite in the sweep dir by default: running the same command again resumes it, and several machines
given one database URL feed one study. Each trial's sampler is seeded by the search's seed and the trial's number,
so a resumed or shared study never repeats a trial and a new one with the same seed draws the same trials."""

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from gpt2lab.errors import ConfigError, RunStopped
from gpt2lab.stats import describe

log = logging.getLogger(__name__)

TRIAL_KEY = "search.trial"  # each run's trial number: its run dir's name, the pruner's way back to its trial
RESULTS_FILE = "optimization_results.yaml"  # in the sweep dir: the best trial so far
SWEEPER_ATTR, SWEEPER = "sweeper", f"{socket.gethostname()}:{os.getpid()}"  # which search asked for a trial


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of a swept override: choice(a, b) is categorical, range(start, stop, step=s) the
    steps from start below stop, interval(low, high) continuous (tag(log, interval(...)) on a log scale)."""
    sweep = override.value()
    if isinstance(sweep, ChoiceSweep):
        return CategoricalDistribution(sweep.list)
    if isinstance(sweep, RangeSweep) and sweep.step > 0 and (values := list(override.sweep_iterator())):
        kind = IntDistribution if all(isinstance(v, int) for v in values) else FloatDistribution
        return kind(values[0], values[-1], step=sweep.step)  # the stop is not one of the values
    if isinstance(sweep, IntervalSweep):
        kind = IntDistribution if all(isinstance(v, int) for v in (sweep.start, sweep.end)) else FloatDistribution
        return kind(sweep.start, sweep.end, log="log" in sweep.tags)
    raise ConfigError(
        f"{override.input_line}: not a search space; use choice(a, b, ...), "
        "range(start, stop, step=s), interval(low, high) or tag(log, interval(low, high))"
    )


def search_space(overrides: Sequence[Override]) -> tuple[list[str], dict[str, BaseDistribution]]:
    """Split the sweeper's params and the command line's overrides into those every trial gets and the space."""
    fixed, space = [], {}
    last = {override.get_key_element(): override for override in overrides}  # the command line's over params
    for key, override in last.items():
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed.append(f"{key}={override.get_value_element_as_str()}")
    return fixed, space


class TrialSeededSampler(BaseSampler):
    """A sampler built afresh for each trial by `make_sampler(seed=...)`, seeded by `seed` and the trial's number
    (None: unseeded). A seed per process would replay the same draws in every process that asks: a resumed study
    would repeat its first trials, and searches sharing a storage each other's. Trial numbers are unique in a
    storage (assigned atomically), so no two trials of a study share a seed, and a new study with the same seed
    draws the same trials again. TPE and the random sampler keep no history of their own (TPE reads the study's
    trials at each draw), so one per trial samples as one for the whole study would."""

    def __init__(self, make_sampler: Callable[..., BaseSampler], seed: int | None):
        if not isinstance(make_sampler, partial) or "seed" in make_sampler.keywords:
            raise ConfigError(
                "hydra.sweeper.sampler: must be a factory without a seed (`_partial_: true`, as "
                "conf/hydra/sweeper/sampler/tpe.yaml); the sweeper seeds each trial's from hydra.sweeper.seed"
            )
        self.make_sampler, self.seed = make_sampler, seed
        self.samplers: dict[int, BaseSampler] = {}  # by trial number, from its ask to its tell

    def trial_sampler(self, trial: FrozenTrial) -> BaseSampler:
        if trial.number not in self.samplers:
            seed = None if self.seed is None else trial_seed(self.seed, trial.number)
            self.samplers[trial.number] = self.make_sampler(seed=seed)
        return self.samplers[trial.number]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.trial_sampler(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.trial_sampler(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.trial_sampler(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, distribution: BaseDistribution
    ) -> Any:
        return self.trial_sampler(trial).sample_independent(study, trial, param_name, distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        # a trial pruned in its run is told there, so its sampler stays here: a few objects until the search ends
        self.trial_sampler(trial).after_trial(study, trial, state, values)
        del self.samplers[trial.number]


def trial_seed(seed: int, number: int) -> int:
    """Trial `number`'s sampler seed: mixed, not added (seed + number would give seed 1's study the trials of seed
    0's, shifted by one)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])  # uint32, as numpy's RandomState takes


def trial_overrides(fixed: list[str], trial: optuna.Trial) -> list[str]:
    return [*fixed, *(f"{key}={value}" for key, value in trial.params.items()), f"{TRIAL_KEY}={trial.number}"]


class OptunaSearch:
    """The sweeper's work (the plugin class Hydra finds only delegates here, so that Hydra's start-up, which
    imports every plugin, never imports Optuna). Trials run `n_jobs` at a time through Hydra's launcher, until the
    study holds `n_trials` trials (finished or running): a study stopped early goes on where it stopped."""

    def __init__(self, study_name, direction, storage, n_trials, n_jobs, seed, sampler, pruner, params):
        self.study_name, self.direction, self.storage = study_name, direction, storage
        self.n_trials, self.n_jobs, self.seed, self.sampler, self.pruner = n_trials, n_jobs, seed, sampler, pruner
        self.params = params or {}

    def setup(self, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str], validate_batch_is_legal) -> list[JobReturn]:
        if self.n_jobs < 1:
            raise ConfigError(f"hydra.sweeper.n_jobs={self.n_jobs}: must be at least 1 (trials run at once)")
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        fixed, space = search_space(parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + arguments))
        if not space:
            raise ConfigError(
                "nothing to search: set hydra.sweeper.params (conf/hparams_search/lr_optuna.yaml) or sweep a key on "
                "the command line, e.g. 'optim.lr=tag(log, interval(1e-4, 3e-3))'"
            )
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)  # before the study: its SQLite file is there by default
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study = optuna.create_study(
            study_name=self.study_name,
            storage=open_storage(self.storage),
            sampler=TrialSeededSampler(self.sampler, self.seed),
            pruner=self.pruner,
            direction=self.direction,
            load_if_exists=True,
        )
        fail_abandoned_trials(study)
        log.info("study %s in %s: %d of %d trials", self.study_name, self.storage, trials_started(study), self.n_trials)
        returns = []
        while (done := trials_started(study)) < self.n_trials:
            trials, batch = [], []
            for trial in (study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))):
                trial.set_user_attr(SWEEPER_ATTR, SWEEPER)
                try:  # composes as the launcher will: a value that cannot (a missing config) fails its trial only
                    validate_batch_is_legal([overrides := trial_overrides(fixed, trial)])
                except HydraException as error:
                    tell(study, trial, error)
                    continue
                trials.append(trial)
                batch.append(overrides)
            try:
                results = self.launcher.launch(batch, initial_job_idx=trials[0].number) if batch else []
            except RunStopped as stop:  # a SystemExit, which Hydra's run_job lets through: the batch's runs end
                results = [stop] * len(trials)
            except BaseException:  # the user's Ctrl-C, a launcher's error: no trial is left RUNNING
                for trial in trials:
                    study.tell(trial, state=TrialState.FAIL)
                raise
            for trial, result in zip(trials, results):
                tell(study, trial, result)
            returns += [r for r in results if isinstance(r, JobReturn)]
        write_results(study, sweep_dir / RESULTS_FILE)
        return returns


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The storage at `url`, its tables created if the database is new. Searches started at once on a new database
    race to create them ("table studies already exists", optuna#4621); the losers find them made when they retry."""
    for wait in (0.1, 0.3, 1, 3, None):
        try:
            return optuna.storages.RDBStorage(url)
        except sqlalchemy.exc.DBAPIError:
            if wait is None:
                raise
            time.sleep(wait)


def fail_abandoned_trials(study: optuna.Study) -> None:
    """Mark failed the trials a search on this machine left RUNNING when it was killed (its process is gone), so
    that they count as done; those of searches still running, here or on other machines, are theirs."""
    for trial in study.get_trials(deepcopy=False, states=[TrialState.RUNNING]):
        host, _, pid = trial.user_attrs.get(SWEEPER_ATTR, "").rpartition(":")
        if host == socket.gethostname() and not process_alive(int(pid)):
            study.tell(trial.number, state=TrialState.FAIL)
            log.warning("trial %d failed: its search (process %s) was killed while it ran", trial.number, pid)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only whether it exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def trials_started(study: optuna.Study) -> int:
    """Trials that ran or run (on any machine); enqueued ones are still to run."""
    return len([t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING])


def trial_state(study: optuna.Study, number: int) -> TrialState:
    """As the storage has it now: a run that was pruned has told its trial so (gpt2lab.callbacks.pruning)."""
    return next(t.state for t in study.get_trials(deepcopy=False) if t.number == number)


def run_status(result: JobReturn) -> str:
    """How the run ended, as its status.json says: `stopped: <reason>`, ..."""
    from gpt2lab.sweep import read_run_status  # it imports Lightning, which a search of a task without it need not

    return str(read_run_status(Path(result.hydra_cfg.hydra.runtime.output_dir)))


def run_value(result: JobReturn | BaseException) -> float:
    """The run's val/loss, or what ended it raised again."""
    if isinstance(result, BaseException):
        raise result
    if result.status is JobStatus.FAILED:  # (its .return_value would print "Error executing job" first)
        raise result._return_value
    value = float(result.return_value)
    if not math.isfinite(value):  # a run of a multirun that stopped or failed returns nan (recording_run_end)
        raise ValueError(run_status(result))
    return value


def tell(study: optuna.Study, trial: optuna.Trial, result: JobReturn | BaseException) -> None:
    """Record how the trial's run ended: its value, or failed (an error, a stop, no finite val/loss), unless it was
    pruned. The study goes on either way."""
    try:
        value = run_value(result)
    except (Exception, RunStopped) as error:  # noqa: BLE001  (any end of a run is the trial's, not the study's)
        study.tell(trial, state=TrialState.FAIL)
        ended = "failed: " + (next(iter(str(error).splitlines()), "") or type(error).__name__)
    else:
        if trial_state(study, trial.number) == TrialState.PRUNED:
            ended = run_status(result)
        else:
            study.tell(trial, value)
            ended = f"val/loss {value:.4f}"
    params = ", ".join(f"{k}={v}" for k, v in trial.params.items())
    log.info("trial %d (%s): %s", trial.number, params, ended)


def write_results(study: optuna.Study, path: Path) -> None:
    """The best trial so far (as hydra-optuna-sweeper wrote it), how many trials ended in each state, and the
    completed trials grouped by their params without the seed (a search may sample seeds too: its trials of one
    config are then one sample), best mean first: n, mean, sd and the 95% CI of each (none for n = 1)."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    results = {"name": "optuna", "study_name": study.study_name, "trials": {s: states.count(s) for s in set(states)}}
    if any(s == TrialState.COMPLETE.name for s in states):
        best = study.best_trial
        results |= {"best_trial": best.number, "best_params": best.params, "best_value": best.value}
        log.info("best: trial %d (%s), val/loss %.4f", best.number, best.params, best.value)
        results["groups"] = trial_groups([t for t in trials if t.state == TrialState.COMPLETE])
    else:
        log.warning("study %s has no completed trial", study.study_name)
    path.write_text(yaml.safe_dump(results, sort_keys=False))


def trial_groups(trials: list[optuna.trial.FrozenTrial]) -> list[dict]:
    from gpt2lab.sweep import REPLICATE_KEYS  # lazily, as run_status

    values: dict[tuple, list[float]] = {}
    for trial in trials:
        params = tuple((k, v) for k, v in trial.params.items() if k not in REPLICATE_KEYS)
        values.setdefault(params, []).append(trial.value)
    samples = sorted(((dict(params), describe(v)) for params, v in values.items()), key=lambda g: g[1].mean)
    return [{"params": params, "n": s.n, "mean": s.mean, "sd": s.sd, "ci95": s.ci} for params, s in samples]
