"""μTransfer (Yang et al. 2022, "Tensor Programs V", Figure 1): the same lr grid at several widths under each
parametrization; where the best lr sits at each width. Under μP it should stay put as the model widens, so that an
lr tuned on a small model holds on a large one; under GPT-2's standard parametrization it drifts down.

The runs are grouped by (model.parametrization, model.n_embd) and read as an lr sweep over `optim.lr`
(gpt2lab.lr_sweep: per group its best lr, the final val/loss there ± CI over seeds, its LR sensitivity).
`python scripts/summarize.py <sweep dir> --mu-transfer` writes mu_transfer.md, .csv and .png (experiment=mu_transfer:
also its Hydra callback)."""

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gpt2lab.errors import DataError
from gpt2lab.lr_sweep import CELL_FIELDS, LrGroup, cell_fields, cell_text, lr_groups
from gpt2lab.sweep import RunResult, run_results

log = logging.getLogger(__name__)

LR_KEY = "optim.lr"  # the axis: AdamW's base lr (μP's hidden matrices take it × base_width / width)
TRANSFER_FILES = ("mu_transfer.md", "mu_transfer.csv", "mu_transfer.png")


def parametrization_of(result: RunResult) -> str:
    return OmegaConf.select(result.config, "model.parametrization", default="sp")  # a run from before μP: sp


def width_of(result: RunResult) -> int:
    return int(result.config.model.n_embd)


@dataclass
class Transfer:
    """One parametrization's lr sweeps, one per width, and how far their best lr moves across the widths."""

    parametrization: str
    widths: list[int]  # ascending
    groups: list[LrGroup]  # one per width, in that order
    grid: list[float]  # every lr of the sweep, ascending

    def best_step(self, group: LrGroup) -> int:
        """The best lr's index on the grid."""
        return self.grid.index(group.best.lr)

    @property
    def shift(self) -> int:
        """Grid steps between the largest and the smallest best lr across the widths: 0 or 1 is μP's promise."""
        steps = [self.best_step(g) for g in self.groups]
        return max(steps) - min(steps)

    @property
    def drift(self) -> float:
        """log2 of (best lr at the widest) / (best lr at the narrowest): negative if it falls as width grows."""
        return math.log2(self.groups[-1].best.lr / self.groups[0].best.lr)

    @property
    def on_edge(self) -> list[int]:
        """Widths whose best lr is the grid's smallest or largest: the optimum may lie beyond the grid."""
        edges = (self.grid[0], self.grid[-1])
        return [w for w, g in zip(self.widths, self.groups) if g.best.lr in edges]


def transfers(results: list[RunResult], lr_key: str = LR_KEY) -> list[Transfer]:
    """The sweep's runs as one Transfer per parametrization (sp first), each an lr sweep per width."""
    grid = sorted({float(OmegaConf.select(r.config, lr_key)) for r in results})
    by_parametrization: dict[str, list[RunResult]] = {}
    for result in results:
        by_parametrization.setdefault(parametrization_of(result), []).append(result)
    out = []
    for parametrization in sorted(by_parametrization, key=lambda p: (p != "sp", p)):
        groups = lr_groups(by_parametrization[parametrization], lr_key, lambda r: str(width_of(r)))
        groups.sort(key=lambda g: int(g.group))
        out.append(Transfer(parametrization, [int(g.group) for g in groups], groups, grid))
    return out


def transfer_table(sweep_dir: str | Path, lr_key: str = LR_KEY) -> list[Transfer]:
    """mu_transfer.md, .csv and .png of the sweep dir, from its runs' own events; the transfers."""
    sweep_dir = Path(sweep_dir)
    found = transfers(run_results(sweep_dir), lr_key)
    if not any(len(t.widths) > 1 and len(t.grid) > 1 for t in found):
        raise DataError(
            f"{sweep_dir}: μTransfer needs runs at several model.n_embd and several {lr_key}, e.g. "
            f"experiment=mu_transfer; found widths {[t.widths for t in found]} and {lr_key} grid {found[0].grid}"
        )
    md, csv_path, png = (sweep_dir / name for name in TRANSFER_FILES)
    md.write_text(markdown(found, lr_key))
    write_csv(found, csv_path)
    plot(found, png, lr_key)
    log.info(
        "μTransfer of %s: %s", ", ".join(t.parametrization for t in found), ", ".join(map(str, (md, csv_path, png)))
    )
    return found


def markdown(found: list[Transfer], lr_key: str) -> str:
    """Two tables: the best lr per parametrization and width, with the shift across widths; then every cell."""
    widths = sorted({w for t in found for w in t.widths})
    lines = [
        "| parametrization | " + " | ".join(f"best {lr_key} at width {w}" for w in widths)
        + " | shift across widths (grid steps) | drift (log2, widest / narrowest) |",
        "| --- |" + " ---: |" * len(widths) + " ---: | ---: |",
    ]  # fmt: skip
    for t in found:
        at = dict(zip(t.widths, t.groups))
        best = [f"{at[w].best.lr:g} ({at[w].best.loss})" if w in at else "" for w in widths]
        lines.append(f"| {t.parametrization} | " + " | ".join(best) + f" | {t.shift} | {t.drift:+.2f} |")
    edges = [f"{t.parametrization} at width {w}" for t in found for w in t.on_edge]
    lines += [
        "",
        "Each best lr is the grid's lowest mean final val/loss (± its 95% CI over seeds). Shift: grid steps between "
        "the largest and the smallest best lr across the widths (μP's promise: 0 or 1); drift: log2 of the widest "
        "width's best lr over the narrowest's.",
    ]
    if edges:
        lines.append(f"On the grid's edge, so the optimum may lie beyond it: {', '.join(edges)}.")
    lines += ["", "| parametrization | width | " + " | ".join(f"{lr:g}" for lr in found[0].grid) + " |"]
    lines.append("| --- | ---: |" + " ---: |" * len(found[0].grid))
    for t in found:
        for w, g in zip(t.widths, t.groups):
            at = {cell.lr: cell for cell in g.cells}
            lines.append(f"| {t.parametrization} | {w} | " + " | ".join(
                cell_text(at[lr]) if lr in at else "" for lr in t.grid) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_csv(found: list[Transfer], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["parametrization", "width", "lr", *CELL_FIELDS])
        for t in found:
            for w, g in zip(t.widths, t.groups):
                for c in g.cells:
                    writer.writerow([t.parametrization, w, c.lr, *cell_fields(g, c)])


def plot(found: list[Transfer], path: Path, lr_key: str) -> None:
    """One panel per parametrization (the μP paper's Figure 1): final val/loss against the lr, a curve per width
    (darker = wider), the 95% CI over seeds as error bars, each width's best lr circled."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(found), figsize=(5.5 * len(found), 4.5), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], found):
        colors = plt.cm.viridis_r([0.15 + 0.75 * i / max(1, len(t.widths) - 1) for i in range(len(t.widths))])
        for color, w, g in zip(colors, t.widths, t.groups):
            lrs, means = [c.lr for c in g.cells], [c.loss.mean for c in g.cells]
            ax.errorbar(lrs, means, yerr=[c.loss.ci or 0.0 for c in g.cells], color=color, marker="o",
                        markersize=3, capsize=3, label=f"width {w}")  # fmt: skip
            ax.plot(g.best.lr, g.best.loss.mean, "o", markersize=10, markerfacecolor="none", color=color)
        ax.set_xscale("log", base=2)
        steps = f"{t.shift} grid step{'' if t.shift == 1 else 's'}"
        ax.set(xlabel=lr_key, title=f"{t.parametrization}: best lr shifts {steps} across widths")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("final val/loss (95% CI over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SummarizeMuTransfer(Callback):
    """Hydra callback (experiment=mu_transfer): when the multirun ends, its μTransfer table and plot."""

    def __init__(self, lr_key: str = LR_KEY):
        self.lr_key = lr_key

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        transfer_table(config.hydra.sweep.dir, self.lr_key)
