"""Ablations: each option of one config group (e.g. `ablation=rope`) against a baseline option, over seeds.
`python scripts/summarize.py <sweep dir> --ablation ablation` writes ablation.md, ablation.csv and ablation.png: per
option its mean final val/loss ± 95% CI over seeds, Δ against the baseline with its 95% CI, Welch's p, that p
adjusted for the number of options (Holm) and the verdict at α on it, at the options' default lr; and, when the
sweep also varies the lr (experiment=lr_sensitivity, or an lr sweep dir given: --best-lr-from), the same at each
option's own best lr. A fixed-lr Δ mixes "this option is worse" with "this lr suits it less"; the best-lr Δ
compares each at its best (Wortsman et al. 2023)."""

import csv
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gpt2lab.errors import DataError
from gpt2lab.lr_sweep import LR_KEY, LrCell, lr_groups, lr_of
from gpt2lab.stats import ALPHA, Difference, describe, holm, welch
from gpt2lab.sweep import RunResult, run_results

log = logging.getLogger(__name__)

ABLATION_FILES = ("ablation.md", "ablation.csv", "ablation.png")


@dataclass
class AblationRow:
    option: str  # the group's choice, e.g. rope
    runs: int  # at the default lr, however they ended
    n: int  # of them completed: the sample below
    val_loss: float | None  # mean final val/loss over the seeds
    ci95: float | None  # ± around it (Student t; None for n = 1)
    delta: float | None  # val_loss − the baseline's
    delta_ci95: float | None  # ± around delta (Welch–Satterthwaite df)
    p: float | None  # Welch's t-test against the baseline, two-sided
    p_holm: float | None = None  # p adjusted over the options of this column (stats.holm)
    significant: bool | None = None  # p_holm < alpha
    # the same at each option's best lr, when the sweep has an lr axis (LR_KEY): the option's and the baseline's
    best_lr: float | None = None  # train.lr_scale × the option's own lrs
    best_lrs: str | None = None  # those lrs
    best_n: int | None = None
    best_val_loss: float | None = None
    best_ci95: float | None = None
    best_delta: float | None = None
    best_delta_ci95: float | None = None
    best_p: float | None = None
    best_p_holm: float | None = None
    best_significant: bool | None = None


def ablation_table(
    sweep_dir: str | Path,
    group: str = "ablation",
    baseline: str = "baseline",
    alpha: float = ALPHA,
    best_lr_from: str | Path | None = None,
) -> list[AblationRow]:
    """The table of `summarize.py --ablation`, baseline first, then the options by Δ; written into sweep_dir. The
    fixed-lr columns are the runs at train.lr_scale=1 (a sweep at one other scale: that one); the best-lr columns
    come from this sweep's lr axis, or from the lr sweep in `best_lr_from`."""
    sweep_dir = Path(sweep_dir)
    results = [r for r in run_results(sweep_dir) if r.choices.get(group) is not None]
    if baseline not in {r.choices[group] for r in results}:
        found = ", ".join(sorted({r.choices[group] for r in results})) or "none"
        raise DataError(
            f"{sweep_dir}: no run with {group}={baseline} (found {found}): the baseline every option is compared "
            "with; pass --baseline <option>"
        )
    scales = {lr_of(r) for r in results}
    fixed = 1.0 if 1.0 in scales or len(scales) > 1 else scales.pop()
    fixed_runs: dict[str, list[RunResult]] = {}
    for result in results:
        if lr_of(result) == fixed:
            fixed_runs.setdefault(result.choices[group], []).append(result)
    finals = {
        option: [r.final_val_loss for r in runs if r.final_val_loss is not None] for option, runs in fixed_runs.items()
    }
    if not finals.get(baseline):
        raise DataError(f"{sweep_dir}: no completed run with {group}={baseline} at {LR_KEY}={fixed:g}")
    rows = []
    for option, runs in fixed_runs.items():
        sample = describe(finals[option]) if finals[option] else None
        spread = (sample.mean, sample.ci) if sample else (None, None)
        versus = welch(finals[option], finals[baseline]) if sample and option != baseline else None
        rows.append(AblationRow(option, len(runs), len(finals[option]), *spread, *comparison(versus)))
    for row, p_holm in zip(rows, holm([r.p for r in rows])):
        row.p_holm, row.significant = p_holm, below(p_holm, alpha)
    lr_results = run_results(best_lr_from) if best_lr_from is not None else results
    if len({lr_of(r) for r in lr_results}) > 1:
        add_best_lr(rows, lr_results, group, baseline)
        for row, p_holm in zip(rows, holm([r.best_p for r in rows])):
            row.best_p_holm, row.best_significant = p_holm, below(p_holm, alpha)
    rows.sort(key=lambda r: (r.option != baseline, r.delta is None, r.delta or 0.0))
    write_ablation(rows, sweep_dir, group, alpha)
    return rows


def comparison(versus: Difference | None) -> tuple:
    return (None, None, None) if versus is None else (versus.delta, versus.ci, versus.p)


def below(p: float | None, alpha: float) -> bool | None:
    return None if p is None else p < alpha


def add_best_lr(rows: list[AblationRow], results: list[RunResult], group: str, baseline: str) -> None:
    """Fill each row's best-lr columns: its option's best cell of the lr sweep against the baseline's best cell."""
    swept = [r for r in results if r.choices.get(group) is not None]
    best: dict[str, LrCell] = {g.group: g.best for g in lr_groups(swept, group_by=lambda r: r.choices[group])}
    if baseline not in best:
        raise DataError(f"the lr sweep has no run with {group}={baseline}: the baseline every option is compared with")
    for row in rows:
        cell = best.get(row.option)
        if cell is None:
            log.warning("%s=%s: not in the lr sweep; no best-lr comparison", group, row.option)
            continue
        loss = cell.loss
        row.best_lr, row.best_lrs, row.best_n, row.best_val_loss, row.best_ci95 = (
            cell.lr, cell.lrs, loss.n, loss.mean, loss.ci
        )  # fmt: skip
        versus = welch(cell.losses, best[baseline].losses) if row.option != baseline else None
        row.best_delta, row.best_delta_ci95, row.best_p = comparison(versus)


def markdown(rows: list[AblationRow], group: str, alpha: float) -> str:
    base = rows[0].option
    best_lr = any(r.best_lr is not None for r in rows)
    header = f"| {group} | n | final val/loss (± 95% CI) | Δ vs {base} (± 95% CI) | p (Welch) | Holm p "
    header += f"| Holm p < {alpha:g} |"
    align = "| --- | ---: | ---: | ---: | ---: | ---: | --- |"
    if best_lr:
        header += f" best {LR_KEY} | final val/loss there | Δ at each one's best lr | p | Holm p "
        header += f"| Holm p < {alpha:g} |"
        align += " ---: | ---: | ---: | ---: | ---: | --- |"
    lines = [header, align]
    for r in rows:
        cells = [r.option, f"{r.n}" if r.n == r.runs else f"{r.n} of {r.runs}", pm(r.val_loss, r.ci95)]
        cells += [pm(r.delta, r.delta_ci95, "+"), p_text(r.p), p_text(r.p_holm), yes_no(r.significant)]
        if best_lr:
            cells += [f"{r.best_lr:g}" if r.best_lr is not None else "–", pm(r.best_val_loss, r.best_ci95)]
            cells += [pm(r.best_delta, r.best_delta_ci95, "+"), p_text(r.best_p), p_text(r.best_p_holm),
                      yes_no(r.best_significant)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pm(value: float | None, ci: float | None, sign: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:{sign}.4f}" + (f" ± {ci:.4f}" if ci is not None else "")


def p_text(p: float | None) -> str:
    return "–" if p is None else f"{p:.2g}"


def yes_no(significant: bool | None) -> str:
    return "–" if significant is None else ("**yes**" if significant else "no")


def write_ablation(rows: list[AblationRow], sweep_dir: Path, group: str, alpha: float) -> None:
    md, csv_path, png = (sweep_dir / name for name in ABLATION_FILES)
    md.write_text(markdown(rows, group, alpha))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    plot(rows, png, group)
    log.info("ablation of %d options: %s", len(rows), ", ".join(str(sweep_dir / n) for n in ABLATION_FILES))


def plot(rows: list[AblationRow], path: Path, group: str) -> None:
    """Δ final val/loss of each option against the baseline with its 95% CI as error bars: at the default lr, and
    at each option's best lr when the sweep had an lr axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    options = [r for r in rows[1:] if r.delta is not None]
    best_lr = any(r.best_delta is not None for r in options)
    height = 0.4 if best_lr else 0.8
    fig, ax = plt.subplots(figsize=(7.5, (0.55 if best_lr else 0.45) * len(options) + 1.5))
    y = range(len(options))
    ax.barh(
        [i - height / 2 * best_lr for i in y], [r.delta for r in options], height=height,
        xerr=[r.delta_ci95 or 0.0 for r in options], color="C0", alpha=0.8, capsize=3,
        label=f"at the default lr ({LR_KEY}=1)",
    )  # fmt: skip
    if best_lr:
        ax.barh(
            [i + height / 2 for i in y], [r.best_delta or 0.0 for r in options], height=height,
            xerr=[r.best_delta_ci95 or 0.0 for r in options], color="C1", alpha=0.8, capsize=3,
            label="each at its best lr",
        )  # fmt: skip
        ax.legend(fontsize="small")
    ax.set_yticks(list(y), [r.option for r in options])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set(xlabel=f"Δ final val/loss vs {rows[0].option} (error bars: 95% CI, Welch)", ylabel=group)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SummarizeAblation(Callback):
    """Hydra callback (experiment=design_ablations): when the multirun ends, its ablation table (see ablation_table).
    Hydra calls end callbacks last-registered first, so it is written before the sweep summary's, whose exit
    status may report failed runs."""

    def __init__(self, group: str = "ablation", baseline: str = "baseline", alpha: float = ALPHA):
        self.group, self.baseline, self.alpha = group, baseline, alpha

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        ablation_table(config.hydra.sweep.dir, self.group, self.baseline, self.alpha)
