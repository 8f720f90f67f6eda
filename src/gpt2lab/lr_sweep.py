"""Learning-rate sweeps (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
instabilities"): runs of several groups (the options of an ablation, widths × parametrizations) at each value of a
log-spaced lr axis, `train.lr_scale` by default (every lr of a run × it), over seeds. Per group: its best lr, the
final val/loss there ± its 95% CI, and its LR sensitivity; a plot of the final val/loss against the lr, a curve per
group with error bars. `python scripts/summarize.py <sweep dir> --lr-sweep` writes lr_sensitivity.md, .csv and .png
(experiment=lr_sensitivity: also its Hydra callback)."""

import csv
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gpt2lab.errors import DataError
from gpt2lab.stats import Sample, describe, lr_sensitivity
from gpt2lab.sweep import RunResult, flat, group_of, run_results

log = logging.getLogger(__name__)

LR_KEY = "train.lr_scale"  # the axis: every learning rate of the run (AdamW's, Muon's) × this
LR_FILES = ("lr_sensitivity.md", "lr_sensitivity.csv", "lr_sensitivity.png")


@dataclass
class LrCell:
    """The runs of one group at one lr: their final val/loss, a diverged run's counted as the loss at init."""

    lr: float  # the axis' value
    lrs: str  # the runs' actual learning rates, e.g. `optim.lr=0.0024, optim.muon.lr=0.08`
    diverged: int  # of its runs
    losses: list[float]  # a run's min(final val/loss, init loss); a diverged run's: the init loss

    @property
    def loss(self) -> Sample:
        return describe(self.losses)


@dataclass
class LrGroup:
    group: str
    cells: list[LrCell]  # by lr
    best: LrCell  # the lowest mean
    sensitivity: float  # Wortsman et al.'s LR sensitivity over the cells (gpt2lab.stats.lr_sensitivity)
    init_loss: float  # ℓ₀: a uniform guess's, ln(vocabulary), which GPT-2's init gives


def lr_of(result: RunResult, lr_key: str = LR_KEY) -> float:
    """The run's value of the lr axis (a run from before train.lr_scale: its lrs as configured, × 1)."""
    return float(OmegaConf.select(result.config, lr_key, default=1.0 if lr_key == LR_KEY else None))


def actual_lrs(config: DictConfig) -> str:
    """Every learning rate of the run's optimizers (optim.lr, optim=muon's optim.muon.lr), × its train.lr_scale."""
    scale = OmegaConf.select(config, LR_KEY, default=1.0)  # a run from before the knob: its lrs as configured
    optim = flat(OmegaConf.to_container(config.optim, resolve=True), prefix="optim.")
    return ", ".join(f"{key}={value * scale:.3g}" for key, value in optim.items() if key.rsplit(".", 1)[-1] == "lr")


def uniform_guess_loss(config: DictConfig) -> float:
    """ln(vocabulary): the loss of a uniform guess over the model's outputs, which its initialization gives."""
    return math.log(instantiate(config.model).padded_vocab_size)


def without(overrides: str, key: str) -> str:
    return ",".join(o for o in overrides.split(",") if o and o.split("=")[0] != key)


def lr_groups(
    results: list[RunResult], lr_key: str = LR_KEY, group_by: Callable[[RunResult], str] | None = None
) -> list[LrGroup]:
    """The runs by group (group_by; default: their differing overrides without the seed and the lr axis) and by
    their value of `lr_key`, in the order groups first appear. A run that neither completed nor diverged (stopped by
    a signal, failed on its config) is no result at any lr: it is left out, with a warning."""
    group_by = group_by or (lambda result: without(group_of(result.overrides), lr_key))
    grid: dict[str, dict[float, list[RunResult]]] = {}
    for result in results:
        if result.final_val_loss is None and not result.diverged:
            log.warning("%s: neither completed nor diverged; left out of the lr sweep", result.run_dir)
            continue
        grid.setdefault(group_by(result), {}).setdefault(lr_of(result, lr_key), []).append(result)
    groups = []
    for group, by_lr in grid.items():
        init_loss = uniform_guess_loss(next(iter(by_lr.values()))[0].config)
        cells = []
        for lr, runs in sorted(by_lr.items()):
            losses = [init_loss if r.diverged else min(r.final_val_loss, init_loss) for r in runs]
            diverged = sum(r.diverged for r in runs)
            cells.append(LrCell(lr, actual_lrs(runs[0].config), diverged, losses))
        best = min(cells, key=lambda cell: cell.loss.mean)
        sensitivity = lr_sensitivity([cell.loss.mean for cell in cells], init_loss)
        groups.append(LrGroup(group, cells, best, sensitivity, init_loss))
    return groups


def lr_sweep_table(sweep_dir: str | Path, lr_key: str = LR_KEY) -> list[LrGroup]:
    """lr_sensitivity.md, .csv and .png of the sweep dir, from its runs' own events; the groups."""
    sweep_dir = Path(sweep_dir)
    groups = lr_groups(run_results(sweep_dir), lr_key)
    if not any(len(g.cells) > 1 for g in groups):
        raise DataError(
            f"{sweep_dir}: no group was run at more than one {lr_key}: sweep it, e.g. {lr_key}=0.25,0.5,1,2,4,8 "
            "(or pass the axis: --lr-sweep <key>)"
        )
    md, csv_path, png = (sweep_dir / name for name in LR_FILES)
    md.write_text(markdown(groups, lr_key))
    write_csv(groups, csv_path)
    plot(groups, png, lr_key)
    log.info("lr sweep of %d groups: %s", len(groups), ", ".join(map(str, (md, csv_path, png))))
    return groups


def markdown(groups: list[LrGroup], lr_key: str) -> str:
    """A row per group: its best lr, the loss there, its LR sensitivity, then its final val/loss at every lr."""
    lrs = sorted({cell.lr for g in groups for cell in g.cells})
    lines = [
        f"| group | best {lr_key} | its lrs | final val/loss there (± 95% CI) | n | LR sensitivity | "
        + " | ".join(f"{lr:g}" for lr in lrs) + " |",
        "| --- | ---: | --- | ---: | ---: | ---: |" + " ---: |" * len(lrs),
    ]  # fmt: skip
    for g in groups:
        at = {cell.lr: cell for cell in g.cells}
        cells = [cell_text(at[lr]) if lr in at else "" for lr in lrs]
        best = [f"{g.best.lr:g}", g.best.lrs, str(g.best.loss), str(g.best.loss.n), f"{g.sensitivity:.4f}"]
        lines.append("| " + " | ".join([g.group or "all runs", *best, *cells]) + " |")
    lines += [
        "",
        (
            f"LR sensitivity (Wortsman et al. 2023): the mean over the {lr_key} grid of min(ℓ(η), ℓ₀) − ℓ*, with "
            f"ℓ(η) the mean final val/loss at η, ℓ* the best of them and ℓ₀ = ln(vocabulary) = "
            f"{groups[0].init_loss:.4f}, the loss at initialization, which a diverged run counts as."
        ),
    ]
    return "\n".join(lines) + "\n"


def cell_text(cell: LrCell) -> str:
    return str(cell.loss) + (f" ({cell.diverged} of {cell.loss.n} diverged)" if cell.diverged else "")


CELL_FIELDS = ["n", "diverged", "mean", "sd", "ci95", "best", "sensitivity"]  # a csv row's columns for one cell


def cell_fields(group: LrGroup, cell: LrCell) -> list:
    """One cell's CELL_FIELDS: its runs' statistics, whether it is its group's best lr, the group's sensitivity."""
    loss = cell.loss
    return [loss.n, cell.diverged, loss.mean, loss.sd, loss.ci, cell is group.best, group.sensitivity]


def write_csv(groups: list[LrGroup], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "lr", "lrs", *CELL_FIELDS])
        for g in groups:
            for c in g.cells:
                writer.writerow([g.group, c.lr, c.lrs, *cell_fields(g, c)])


def plot(groups: list[LrGroup], path: Path, lr_key: str) -> None:
    """Final val/loss against the lr axis (log scale), a curve per group, the 95% CI over seeds as error bars; the
    best lr of each circled."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, g in enumerate(groups):
        color = f"C{i % 10}"
        lrs, means = [c.lr for c in g.cells], [c.loss.mean for c in g.cells]
        bars = [c.loss.ci or 0.0 for c in g.cells]
        label = f"{g.group or 'all runs'} (sensitivity {g.sensitivity:.3f})"
        ax.errorbar(lrs, means, yerr=bars, color=color, marker="o", markersize=3, capsize=3, label=label)
        ax.plot(g.best.lr, g.best.loss.mean, "o", markersize=10, markerfacecolor="none", color=color)
    ax.axhline(groups[0].init_loss, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set(
        xlabel=f"{lr_key} (× each option's own learning rates)" if lr_key == LR_KEY else lr_key,
        ylabel="final val/loss (95% CI over seeds; diverged = ln V)",
        title=f"{path.parent.name}: final loss against learning rate",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SummarizeLrSweep(Callback):
    """Hydra callback (experiment=lr_sensitivity): when the multirun ends, its lr sweep's table and plot
    (lr_sweep_table)."""

    def __init__(self, lr_key: str = LR_KEY):
        self.lr_key = lr_key

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        lr_sweep_table(config.hydra.sweep.dir, self.lr_key)
