"""Ablations: each option of one config group (e.g. `ablation=rope`) against a baseline option, over several
seeds. `python scripts/summarize.py <sweep dir> --ablation ablation` writes ablation.md, ablation.csv and
ablation.png: per option the mean final val/loss, its Δ against the baseline, the seed spread of both, and
whether the difference exceeds that spread (the seeds' ranges do not overlap)."""

import csv
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gpt2lab.errors import DataError
from gpt2lab.metrics import VAL_LOSS
from gpt2lab.sweep import read_events, run_dirs, scalar_series

log = logging.getLogger(__name__)

ABLATION_FILES = ("ablation.md", "ablation.csv", "ablation.png")


@dataclass
class AblationRow:
    option: str  # the group's choice, e.g. rope
    seeds: int  # runs that finished with a val/loss
    val_loss: float  # mean over seeds of the final val/loss
    spread: float  # half the range of the seeds' final val/loss: ± around the mean
    delta: float  # val_loss − the baseline's
    exceeds_spread: bool  # |delta| > spread + the baseline's spread: the seeds' ranges do not overlap


def final_val_losses(sweep_dir: Path, group: str) -> dict[str, list[float]]:
    """The final val/loss of every run of the sweep, by its choice of `group` (runs without one are skipped)."""
    losses: dict[str, list[float]] = {}
    for run_dir in run_dirs(sweep_dir):
        choice = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices.get(group)
        val_loss = scalar_series(read_events(run_dir), VAL_LOSS)
        if choice is None or not val_loss:
            log.warning("%s: no %s choice or no val/loss; left out", run_dir, group)
            continue
        losses.setdefault(choice, []).append(val_loss[-1][1])
    return losses


def ablation_table(sweep_dir: str | Path, group: str = "ablation", baseline: str = "baseline") -> list[AblationRow]:
    """The table of `summarize.py --ablation`, baseline first, then the options by Δ; written into sweep_dir."""
    sweep_dir = Path(sweep_dir)
    losses = final_val_losses(sweep_dir, group)
    if baseline not in losses:
        raise DataError(
            f"{sweep_dir}: no finished run with {group}={baseline} (found {', '.join(sorted(losses)) or 'none'}): "
            f"the baseline every option is compared with; pass --baseline <option>"
        )

    def spread(values: list[float]) -> float:
        return (max(values) - min(values)) / 2

    base_mean, base_spread = mean(losses[baseline]), spread(losses[baseline])
    rows = [
        AblationRow(
            option=option,
            seeds=len(values),
            val_loss=mean(values),
            spread=spread(values),
            delta=mean(values) - base_mean,
            exceeds_spread=option != baseline and abs(mean(values) - base_mean) > spread(values) + base_spread,
        )  # fmt: skip
        for option, values in losses.items()
    ]
    rows.sort(key=lambda r: (r.option != baseline, r.delta))
    write_ablation(rows, sweep_dir, group)
    return rows


def markdown(rows: list[AblationRow], group: str) -> str:
    lines = [
        f"| {group} | seeds | final val/loss (± half range) | Δ vs {rows[0].option} | beyond the seed spread |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        verdict = "–" if r is rows[0] else ("**yes**" if r.exceeds_spread else "no")
        delta = "–" if r is rows[0] else f"{r.delta:+.4f}"
        lines.append(f"| {r.option} | {r.seeds} | {r.val_loss:.4f} ± {r.spread:.4f} | {delta} | {verdict} |")
    return "\n".join(lines) + "\n"


def write_ablation(rows: list[AblationRow], sweep_dir: Path, group: str) -> None:
    md, csv_path, png = (sweep_dir / name for name in ABLATION_FILES)
    md.write_text(markdown(rows, group))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    plot(rows, png, group)
    log.info("ablation of %d options: %s", len(rows), ", ".join(str(sweep_dir / n) for n in ABLATION_FILES))


def plot(rows: list[AblationRow], path: Path, group: str) -> None:
    """Δ final val/loss of each option against the baseline, with the seed spread of both as error bars."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    options = rows[1:]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(options) + 1.5))
    ax.barh(
        [r.option for r in options], [r.delta for r in options],
        xerr=[r.spread + rows[0].spread for r in options],
        color=["C3" if r.delta > 0 else "C2" for r in options], alpha=0.8, capsize=3,
    )  # fmt: skip
    ax.axvline(0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set(xlabel=f"Δ final val/loss vs {rows[0].option} (error bar: both seed spreads)", ylabel=group)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SummarizeAblation(Callback):
    """Hydra callback (experiment=design_ablations): when the multirun ends, its ablation table (see ablation_table).
    Hydra calls end callbacks last-registered first, so it is written before the sweep summary's, whose exit
    status may report failed runs."""

    def __init__(self, group: str = "ablation", baseline: str = "baseline"):
        self.group, self.baseline = group, baseline

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        ablation_table(config.hydra.sweep.dir, self.group, self.baseline)
