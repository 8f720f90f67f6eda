"""Sweeps: how each run of a multirun is named (by what the sweep varies: its dir and TensorBoard run), how it
ends (status.json: a run that stops or fails is recorded and the sweep goes on), its HParams entry, and the summary
of a whole sweep dir, written by `scripts/summarize.py` or by the Hydra callback when a multirun ends: a table of each
run's status, final and best val/loss, tokens seen and wall time; a table of each group of runs that differ only in
their seed (mean final val/loss, sd, n, 95% CI, and against a reference group: Δ, its CI and Welch's p); the val-loss
curves of each group (mean ± 95% CI) in one plot."""

import csv
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from gpt2lab.config import in_multirun, swept_overrides
from gpt2lab.errors import DataError, RunRequeued, RunStopped, RunTerminated, user_error_message
from gpt2lab.metrics import VAL_LOSS
from gpt2lab.stats import ALPHA, describe, holm, welch
from gpt2lab.trackers import record_run_end

log = logging.getLogger(__name__)

FINAL_METRICS = ("final/val_loss", "final/tokens_seen")  # logged once, beside the hyperparameters
SUMMARY_FILES = ("summary.csv", "summary.md", "val_loss.png", "summary_groups.csv")
REPLICATE_KEYS = ("seed", "search.trial")  # overrides that repeat a config rather than change it: a group's runs
NOT_HPARAMS = ("hydra", "callbacks", "logger")  # config groups that do not change what a run learns


RUN_STATUS_FILE = "status.json"  # in a run dir: how the run ended (write_run_status)
RUN_STATUSES = ("completed", "stopped", "failed", "pruned")
WENT_WELL = ("completed", "pruned")  # a pruned run is the search's choice, not a failure


def write_run_status(run_dir: str | Path, status: str, detail: str | None = None) -> None:
    """Record how a run ended, for the sweep summary: `status` is one of RUN_STATUSES; `detail` says why
    (the stop's reason, the error's one line, the pruning step)."""
    if status not in RUN_STATUSES:
        raise ValueError(f"status={status!r}: must be one of {', '.join(RUN_STATUSES)}")
    Path(run_dir, RUN_STATUS_FILE).write_text(json.dumps({"status": status, "detail": detail}) + "\n")
    record_run_end(run_dir, status, str(RunStatus(status, detail)))  # and in the run's MLflow run, if any


class RunStatus(NamedTuple):
    """How a run ended, as status.json records it: `status` one of RUN_STATUSES (or `unknown`), `detail` why."""

    status: str
    detail: str | None = None

    def __str__(self) -> str:  # `completed`, `stopped: <reason>`, `failed: <error>`, `pruned: <when>`
        return f"{self.status}: {self.detail}" if self.detail else self.status


def read_run_status(run_dir: Path) -> RunStatus:
    """The run's status.json; `unknown` without one (a run killed before it could write one, or one from before
    status.json)."""
    path = run_dir / RUN_STATUS_FILE
    if not path.is_file():
        return RunStatus("unknown")
    record = json.loads(path.read_text())
    return RunStatus(record["status"], record.get("detail"))


def how_it_ended(error: BaseException) -> tuple[str, str]:
    """A run's status and its detail, on one line, from what ended it."""
    if isinstance(error, RunStopped):
        return "stopped", error.reason
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return "stopped", "interrupted"
    lines = str(error).strip().splitlines()
    return "failed", user_error_message(error) or ": ".join([type(error).__name__, *lines[:1]])


@contextmanager
def recording_run_end() -> Iterator[None]:
    """Around a Hydra job's training: record how it ended in its run dir's status.json, for the sweep summary.

    In a multirun, a run that stops (RunStopped: a non-finite step, a signal), fails on its config (a UserError) or
    raises anything else is logged, recorded, and the sweep goes on to its next run: Hydra's run_job catches only
    Exception, and its BasicSweeper re-raises the first failed job's after the last, so one run would end the sweep
    (and skip its summary). A second Ctrl-C ends the whole sweep (Lightning turns it into a plain SystemExit), and so
    does SIGTERM (RunTerminated: the process is asked to end, e.g. pre-empted). A run stopped for a SLURM requeue
    (RunRequeued) raises on: its job has not ended, and a submitit launcher that got a result would take it as final.
    A single run raises as before. A status the run wrote itself (a search's pruner) stands, and its exception, if
    any, goes on to the sweeper."""
    if not HydraConfig.initialized():
        yield
        return
    hydra = HydraConfig.get()
    status_file = Path(hydra.runtime.output_dir, RUN_STATUS_FILE)
    status_file.unlink(missing_ok=True)  # a run resumed in its dir: its last end is history
    try:
        yield
    except BaseException as error:
        if status_file.exists():
            raise
        write_run_status(status_file.parent, *how_it_ended(error))
        ends_sweep = isinstance(error, (RunRequeued, RunTerminated)) or not isinstance(error, (RunStopped, Exception))
        if not in_multirun() or ends_sweep:
            if in_multirun():
                log.warning("sweep interrupted: `python scripts/summarize.py %s` summarizes its runs", hydra.sweep.dir)
            raise
        report = str(error) if isinstance(error, RunStopped) else user_error_message(error)
        log.error("%s\nrecorded in %s; the sweep goes on", report or "run failed", status_file, exc_info=not report)
    else:
        if not status_file.exists():
            write_run_status(status_file.parent, "completed")


def flat(values: dict, prefix: str) -> dict:
    """{"muon": {"lr": 0.02}} as {"<prefix>muon.lr": 0.02}, without Hydra's `_target_`-like keys."""
    items = {}
    for key, value in values.items():
        if not key.startswith("_"):
            items |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return items


def run_hparams(cfg: DictConfig) -> dict:
    """What a sweep varies, flat: the swept keys first (with this run's values), then the chosen config of each
    group and the values of the knobs."""
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    hparams = {key: choices[key] if key in choices else OmegaConf.select(cfg, key) for key in swept_overrides()}
    if (trial := OmegaConf.select(cfg, "search.trial")) is not None:  # an Optuna search's run: its trial first
        hparams = {"search.trial": trial, **hparams}
    hparams |= {group: choice for group, choice in choices.items() if group.split("/")[0] not in NOT_HPARAMS and choice}
    for section in ("model", "init", "optim", "scheduler"):
        hparams |= flat(OmegaConf.to_container(cfg[section], resolve=True), prefix=f"{section}.")
    for key in ("data.batch_size", "data.seq_len", "train.total_batch_size", "trainer.max_steps", "seed"):
        hparams[key] = OmegaConf.select(cfg, key)
    return hparams


def log_final_metrics(trainer: L.Trainer, cfg: DictConfig, val_loss: float, tokens_seen: int) -> None:
    """Record the run's final metrics at its last step, in every logger, and its hyperparameters beside them for
    TensorBoard's HParams tab, the swept ones marked as those that differ: the tab sorts them first (its default
    order is by name, which puts `accelerator` first)."""
    metrics = dict(zip(FINAL_METRICS, (val_loss, tokens_seen)))
    hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in run_hparams(cfg).items()}
    swept = swept_overrides()
    experiment, session_start, session_end = hparams_summaries(hparams, metrics)
    plugin_data = experiment.value[0].metadata.plugin_data
    content = HParamsPluginData.FromString(plugin_data.content)
    for info in content.experiment.hparam_infos:
        info.differs = info.name in swept
    plugin_data.content = content.SerializeToString()
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment._get_file_writer()  # as Lightning's log_hyperparams writes them
            for summary in (experiment, session_start, session_end):
                writer.add_summary(summary, trainer.global_step)
        else:  # Lightning's finalize came as fit ended: again, for what it does (CSV writes, MLflow flushes)
            logger.finalize("success")


@dataclass
class RunSummary:
    run: str  # the run's dir, relative to the sweep dir
    overrides: str  # those that differ between the sweep's runs
    status: str  # how it ended: completed, stopped, failed, pruned, unknown (read_run_status)
    detail: str | None  # why: the stop's reason, the error's one line, the pruning step
    final_val_loss: float | None
    best_val_loss: float | None
    tokens_seen: int | None
    wall_time_s: float | None  # from the run's first TensorBoard event to its last


@dataclass
class GroupSummary:
    group: str  # what its runs share of what the sweep varies: their overrides without the seed
    runs: int  # however they ended
    n: int  # completed with a final val/loss: the sample below
    mean: float | None  # of the final val/loss
    sd: float | None
    ci95: float | None  # ± around the mean (Student t, n − 1 df)
    delta: float | None  # mean − the reference group's
    delta_ci95: float | None  # ± around delta (Welch–Satterthwaite df)
    p: float | None  # Welch's t-test, two-sided
    p_holm: float | None = None  # p adjusted over every group compared with the reference (stats.holm)
    significant: bool | None = None  # p_holm < alpha


def group_of(overrides: str) -> str:
    """`ablation=rope,seed=1338` → `ablation=rope`: the config a run repeats; runs that differ only in a
    REPLICATE_KEYS value are one sample of it."""
    return ",".join(o for o in overrides.split(",") if o and o.split("=")[0] not in REPLICATE_KEYS)


def summarize_groups(rows: list[RunSummary], alpha: float = ALPHA, reference: str | None = None) -> list[GroupSummary]:
    """Per group of runs (group_of their differing overrides), in the order of their first run: the statistics of
    its completed runs' final val/loss, and the difference from the `reference` group (default: the first, that of
    the sweep's first job: each swept key's first value)."""
    groups: dict[str, list[RunSummary]] = {}
    for row in rows:
        groups.setdefault(group_of(row.overrides), []).append(row)
    finals = {
        group: [r.final_val_loss for r in runs if r.status == "completed" and r.final_val_loss is not None]
        for group, runs in groups.items()
    }
    reference = next(iter(groups)) if reference is None else reference
    if reference not in groups:
        raise DataError(
            f"reference={reference!r} is not a group of this sweep: pass one of {', '.join(map(repr, groups))}"
        )
    summaries = []
    for group, runs in groups.items():
        sample = describe(finals[group]) if finals[group] else None
        compared = group != reference and finals[group] and finals[reference]  # the reference: no Δ against itself
        versus = welch(finals[group], finals[reference]) if compared else None
        spread = (sample.mean, sample.sd, sample.ci) if sample else (None,) * 3
        difference = (versus.delta, versus.ci, versus.p) if versus else (None,) * 3
        summaries.append(GroupSummary(group, len(runs), len(finals[group]), *spread, *difference))
    for summary, p_holm in zip(summaries, holm([s.p for s in summaries])):
        summary.p_holm, summary.significant = p_holm, None if p_holm is None else p_holm < alpha
    return summaries


def run_dirs(sweep_dir: Path) -> list[Path]:
    """Every Hydra job dir under sweep_dir, in the order the sweep started them (hydra.job.num: 0, 1, …, 10)."""

    def job_order(run_dir: Path) -> tuple[int, str]:
        num = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.job.get("num")
        return num if isinstance(num, int) else -1, str(run_dir)

    return sorted((p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")), key=job_order)


def read_events(run_dir: Path) -> list[EventAccumulator]:
    """One accumulator per directory of TensorBoard event files under the run dir."""
    event_dirs = sorted({p.parent for p in run_dir.glob("**/events.out.tfevents.*")})
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # not a line per event file it opens
    accumulators = [EventAccumulator(str(d), size_guidance={"scalars": 0}) for d in event_dirs]  # 0: keep all
    for events in accumulators:
        events.Reload()
    return accumulators


def scalar_series(accumulators: list[EventAccumulator], tag: str) -> list[tuple[int, float, float]]:
    """(step, value, wall time) of a tag over all of a run's event files, by wall time."""
    points = [
        (e.step, e.value, e.wall_time) for a in accumulators if tag in a.Tags()["scalars"] for e in a.Scalars(tag)
    ]
    return sorted(points, key=lambda p: p[2])


def summarize_run(run_dir: Path, sweep_dir: Path) -> tuple[RunSummary, list[tuple[int, float]]]:
    """The run's row of the summary table, and its val-loss curve."""
    overrides = override_dirname(run_dir)
    accumulators = read_events(run_dir)
    val_loss = scalar_series(accumulators, VAL_LOSS)
    tokens = scalar_series(accumulators, FINAL_METRICS[1])
    times = [p[2] for tag in (VAL_LOSS, "train/loss") for p in scalar_series(accumulators, tag)]
    start = min((a.FirstEventTimestamp() for a in accumulators), default=None)
    row = RunSummary(
        run=str(run_dir.relative_to(sweep_dir)),
        overrides=overrides,
        status=(ended := read_run_status(run_dir)).status,
        detail=ended.detail,
        final_val_loss=val_loss[-1][1] if val_loss else None,
        best_val_loss=min(v for _, v, _ in val_loss) if val_loss else None,
        tokens_seen=int(tokens[-1][1]) if tokens else None,
        wall_time_s=round(max(times) - start, 1) if times and start is not None else None,
    )
    return row, [(step, value) for step, value, _ in val_loss]


@dataclass
class RunResult:
    """How a run of a sweep ended, as the comparisons across its runs read it (ablation, lr sweep)."""

    run_dir: Path
    overrides: str  # those that differ between the sweep's runs
    choices: dict[str, str]  # each config group's option (hydra.runtime.choices)
    config: DictConfig  # as Hydra composed it (.hydra/config.yaml)
    final_val_loss: float | None  # completed, with a finite val/loss at its last step
    diverged: bool  # did not complete, after a non-finite loss, gradient norm or val/loss: at its lr it cannot train


DIVERGED_IF_NONFINITE = ("train/loss", "train/grad_norm", VAL_LOSS)


def run_results(sweep_dir: str | Path) -> list[RunResult]:
    """Every run of the sweep (run_dirs' order), read back from its config, status.json and TensorBoard events."""
    runs = run_dirs(Path(sweep_dir))
    results = []
    for run_dir, overrides in zip(runs, differing_overrides([override_dirname(run) for run in runs])):
        events = read_events(run_dir)
        last = scalar_series(events, VAL_LOSS)[-1:]
        completed = read_run_status(run_dir).status == "completed" and last and math.isfinite(last[0][1])
        values = [v for tag in DIVERGED_IF_NONFINITE for _, v, _ in scalar_series(events, tag)]
        choices = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices
        config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        final, diverged = (last[0][1], False) if completed else (None, not all(map(math.isfinite, values)))
        results.append(RunResult(run_dir, overrides, dict(choices), config, final, diverged))
    return results


def override_dirname(run_dir: Path) -> str:
    """The run's overrides as Hydra names them (`ablation=rope,seed=1338`), without those conf/hydra excludes."""
    return OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.job.override_dirname


def differing_overrides(all_overrides: list[str]) -> list[str]:
    """Each run's overrides without those every run shares (`model=tiny` in a sweep over lr)."""
    split = [o.split(",") if o else [] for o in all_overrides]
    shared = set.intersection(*map(set, split)) if len(split) > 1 else set()
    return [",".join(o for o in items if o not in shared) for items in split]


def summarize(sweep_dir: str | Path, alpha: float = ALPHA, reference: str | None = None) -> list[RunSummary]:
    """Write summary.csv (a row per run), summary_groups.csv (a row per group of seeds: summarize_groups),
    summary.md (both tables) and val_loss.png into sweep_dir; return the runs' rows."""
    sweep_dir = Path(sweep_dir)
    runs = run_dirs(sweep_dir)
    if not runs:
        raise DataError(
            f"no Hydra runs (*/.hydra/overrides.yaml) under {sweep_dir}: pass the sweep dir of a multirun, "
            "e.g. outputs/multiruns/<date>_<time>"
        )
    rows, curves = zip(*(summarize_run(run, sweep_dir) for run in runs))
    for row, overrides in zip(rows, differing_overrides([r.overrides for r in rows])):
        row.overrides = overrides or row.overrides
    groups = summarize_groups(list(rows), alpha, reference)
    runs_csv, md, png, groups_csv = (sweep_dir / name for name in SUMMARY_FILES)
    write_csv(rows, runs_csv)
    write_csv(groups, groups_csv)
    md.write_text(markdown_table(rows) + "\n" + markdown_groups(groups, alpha, reference or groups[0].group))
    plot_val_loss(rows, curves, png)
    log.info("sweep summary of %d runs: %s", len(rows), ", ".join(str(sweep_dir / f) for f in SUMMARY_FILES))
    return list(rows)


def write_csv(rows: list, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def markdown_table(rows: list[RunSummary]) -> str:
    def cell(field: str, value) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.4f}" if field.endswith("loss") else f"{value:.1f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    fields = [f for f in asdict(rows[0]) if f != "detail"]  # the status column says `status: detail`
    if all(r.overrides == r.run for r in rows):  # a run dir named by what its sweep varies (sweep_run_name)
        fields.remove("overrides")

    def value(row: RunSummary, field: str):
        return RunStatus(row.status, row.detail) if field == "status" else getattr(row, field)

    lines = ["| " + " | ".join(fields) + " |", "|" + " --- |" * len(fields)]
    lines += ["| " + " | ".join(cell(f, value(r, f)) for f in fields) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown_groups(groups: list[GroupSummary], alpha: float, reference: str) -> str:
    """Each group's final val/loss over its seeds and its difference from the reference group."""

    def pm(value: float | None, ci: float | None, sign: str = "") -> str:
        if value is None:
            return "–"
        return f"{value:{sign}.4f}" + (f" ± {ci:.4f}" if ci is not None else " (no CI: n = 1)")

    lines = [
        f"| group | completed | final val/loss (± 95% CI) | sd | Δ vs {reference or 'all runs'} (± 95% CI) | p (Welch) "
        f"| Holm p | Holm p < {alpha:g} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for g in groups:
        delta = "–" if g.group == reference else pm(g.delta, g.delta_ci95, "+")
        p, p_holm = ("–" if value is None else f"{value:.2g}" for value in (g.p, g.p_holm))
        verdict = "–" if g.significant is None else ("**yes**" if g.significant else "no")
        sd = "–" if g.sd is None else f"{g.sd:.4f}"
        cells = [g.group or "all runs", f"{g.n} of {g.runs}", pm(g.mean, g.ci95), sd, delta, p, p_holm, verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_val_loss(rows: list[RunSummary], curves: list[list[tuple[int, float]]], path: Path) -> None:
    """Each group's val/loss curve: the mean over its completed runs at the steps they share, with the 95% CI of
    that mean as error bars (none for a group of one run); a run that did not complete, dashed on its own."""
    try:
        import matplotlib
    except ImportError:
        log.warning("no plot %s: matplotlib is missing; install it with `pip install -e '.[sweeps]'`", path)
        return
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict[int, float]]] = {}
    lines = len({group_of(row.overrides) for row in rows})  # at most, each a legend entry
    fig, ax = plt.subplots(figsize=(7 + 3 * (lines > 12), 4.5 + 0.06 * max(0, lines - 12)))
    for row, curve in zip(rows, curves):
        if not curve:
            continue
        if row.status != "completed":
            steps, values = zip(*curve)
            ax.plot(steps, values, linestyle="--", marker="x", label=f"{row.overrides or row.run} ({row.status})")
        else:
            groups.setdefault(group_of(row.overrides), []).append(dict(curve))
    for group, runs in groups.items():
        steps = sorted(set.intersection(*(set(run) for run in runs)))
        samples = [describe([run[step] for run in runs]) for step in steps]
        bars = [s.ci for s in samples] if len(runs) > 1 else None
        label = (group or "all runs") + (f" (n = {len(runs)})" if len(runs) > 1 else "")
        ax.errorbar(steps, [s.mean for s in samples], yerr=bars, marker="o", markersize=3, capsize=3, label=label)
    ax.set(xlabel="optimizer step", ylabel=VAL_LOSS + " (error bars: 95% CI over seeds)",
           title=f"{path.parent.name}: {len(rows)} runs")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small" if lines <= 12 else "x-small", ncol=1 + (lines > 12))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SummarizeSweep(Callback):
    """Hydra callback: when a multirun ends, summarize its sweep dir (see `summarize`: `alpha`, the significance
    level of its verdicts); if some of its runs did not complete, exit non-zero saying how many (Hydra lets a
    SystemExit from a callback through)."""

    def __init__(self, alpha: float = ALPHA):
        self.alpha = alpha

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        rows = summarize(config.hydra.sweep.dir, self.alpha)
        failed = [row for row in rows if row.status not in WENT_WELL]
        if failed:
            summary = Path(config.hydra.sweep.dir, SUMMARY_FILES[1])
            raise SystemExit(f"{len(failed)} of {len(rows)} runs failed: {summary}")
