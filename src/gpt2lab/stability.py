"""Training instabilities at small scale (Wortsman et al. 2023, arXiv 2309.14322): what a sweep over the learning
rate, model.qk_norm and train.z_loss (experiment=instabilities) shows in the stability instruments.
`python scripts/summarize.py <sweep dir> --instabilities` writes instabilities.md and instabilities.csv (per
setting: each seed's largest attention logit over training, its final output log Z, its final val/loss, and
whether it diverged) and instabilities.png (the largest attention logit against the step at the highest learning
rate, and the final val/loss against the learning rate: Wortsman et al.'s figures 1 and 3)."""

import csv
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gpt2lab.errors import DataError
from gpt2lab.lit_module import STABILITY
from gpt2lab.metrics import VAL_LOSS
from gpt2lab.sweep import read_events, read_run_status, run_dirs, scalar_series

log = logging.getLogger(__name__)

INSTABILITY_FILES = ("instabilities.md", "instabilities.csv", "instabilities.png")
ATTENTION = f"{STABILITY}attn_logit_max/layer_"


@dataclass
class InstabilityRun:
    lr: float
    qk_norm: bool
    z_loss: float
    seed: int
    nonfinite_at: int | None  # the step whose non-finite loss or gradient stopped the run (train.on_nonfinite=stop)
    initial_loss: float  # train/loss of the first step: ln(50257) = 10.8 for GPT-2's init
    final_val_loss: float | None  # at the last step (None: stopped before it)
    attn_logit_max: float  # the largest attention logit of any layer at any monitored step
    final_log_z: float  # the output's mean log Z at the last monitored step

    @property
    def diverged(self) -> bool:
        """Stopped by a non-finite step, or ended worse than the first step's loss (the uniform guess's)."""
        return self.nonfinite_at is not None or self.final_val_loss is None or self.final_val_loss > self.initial_loss


def attention_logit_curve(accumulators) -> list[tuple[int, float]]:
    """(step, the largest attention logit over the layers) at each monitored step."""
    by_step: dict[int, float] = {}
    tags = {tag for a in accumulators for tag in a.Tags()["scalars"] if tag.startswith(ATTENTION)}
    for tag in tags:
        for step, value, _ in scalar_series(accumulators, tag):
            by_step[step] = max(by_step.get(step, -math.inf), value)
    return sorted(by_step.items())


def read_run(run_dir: Path) -> tuple[InstabilityRun, list[tuple[int, float]]]:
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    accumulators = read_events(run_dir)
    curve = attention_logit_curve(accumulators)
    log_z = scalar_series(accumulators, f"{STABILITY}log_z_mean")
    val_loss = scalar_series(accumulators, VAL_LOSS)
    train_loss = scalar_series(accumulators, "train/loss")
    ended = read_run_status(run_dir)
    if not curve or not train_loss:
        raise DataError(
            f"{run_dir}: no {ATTENTION}* or train/loss scalars: run it with train.monitor_every_n_steps set"
        )
    nonfinite = ended.status == "stopped" and "non-finite" in (ended.detail or "")
    run = InstabilityRun(
        lr=cfg.optim.lr, qk_norm=cfg.model.qk_norm, z_loss=cfg.train.z_loss, seed=cfg.seed,
        nonfinite_at=train_loss[-1][0] if nonfinite else None, initial_loss=train_loss[0][1],
        final_val_loss=val_loss[-1][1] if val_loss and val_loss[-1][0] == cfg.trainer.max_steps else None,
        attn_logit_max=max(v for _, v in curve), final_log_z=log_z[-1][1],
    )  # fmt: skip
    return run, curve


def instability_table(sweep_dir: str | Path) -> list[InstabilityRun]:
    """Every run of the sweep (see the module doc), written into sweep_dir as INSTABILITY_FILES."""
    sweep_dir = Path(sweep_dir)
    if not (dirs := run_dirs(sweep_dir)):
        raise DataError(f"no Hydra runs under {sweep_dir}: pass the sweep dir of experiment=instabilities")
    runs, curves = zip(*map(read_run, dirs))
    order = sorted(range(len(runs)), key=lambda i: (runs[i].qk_norm, runs[i].z_loss, runs[i].lr, runs[i].seed))
    runs, curves = [runs[i] for i in order], [curves[i] for i in order]
    md, csv_path, png = (sweep_dir / name for name in INSTABILITY_FILES)
    md.write_text(markdown(runs))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*asdict(runs[0]), "diverged"])
        writer.writeheader()
        writer.writerows(asdict(r) | {"diverged": r.diverged} for r in runs)
    plot(runs, curves, png)
    log.info("instabilities of %d runs: %s", len(runs), ", ".join(str(sweep_dir / n) for n in INSTABILITY_FILES))
    return runs


def markdown(runs: list[InstabilityRun]) -> str:
    """A row per setting (qk_norm, z_loss, lr), each seed's values side by side."""
    settings: dict[tuple, list[InstabilityRun]] = {}
    for r in runs:
        settings.setdefault((r.qk_norm, r.z_loss, r.lr), []).append(r)

    def each(values) -> str:
        return " / ".join(values)

    lines = [
        "| qk_norm | z_loss | lr | diverged | largest attention logit | final log Z | final val/loss |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for (qk_norm, z_loss, lr), seeds in settings.items():
        diverged = [
            f"non-finite at {r.nonfinite_at}" if r.nonfinite_at else "**yes**" if r.diverged else "no" for r in seeds
        ]
        val = ["–" if r.final_val_loss is None else f"{r.final_val_loss:.3f}" for r in seeds]
        lines.append(
            f"| {str(qk_norm).lower()} | {z_loss:g} | {lr:g} | {each(diverged)} | "
            f"{each(f'{r.attn_logit_max:.1f}' for r in seeds)} | {each(f'{r.final_log_z:.2f}' for r in seeds)} | "
            f"{each(val)} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[InstabilityRun], curves: list[list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    highest = sorted({r.lr for r in runs})[-2:]  # the attention logits at the two highest learning rates
    fig, axes = plt.subplots(1, len(highest) + 1, figsize=(5 * len(highest) + 6, 4.5))
    for growth, lr in zip(axes, highest):
        labelled = set()
        for r, curve in zip(runs, curves):
            if r.lr != lr:
                continue
            steps, values = zip(*curve)
            label = (
                None if (r.qk_norm, r.z_loss) in labelled else f"qk_norm={str(r.qk_norm).lower()}, z_loss={r.z_loss:g}"
            )
            labelled.add((r.qk_norm, r.z_loss))
            growth.plot(steps, values, color="C0" if r.qk_norm else "C3", linestyle="--" if r.z_loss else "-",
                        alpha=0.8, label=label)  # fmt: skip
        growth.set(yscale="log", xlabel="optimizer step", ylabel="largest attention logit (any layer)",
                   title=f"attention logits at lr={lr:g} (a line per seed)")  # fmt: skip
        growth.legend(fontsize=8)
        growth.grid(alpha=0.3)
    sensitivity = axes[-1]
    settings: dict[tuple[bool, float], dict[float, list[InstabilityRun]]] = {}
    for r in runs:
        settings.setdefault((r.qk_norm, r.z_loss), {}).setdefault(r.lr, []).append(r)
    for (qk_norm, z_loss), by_lr in settings.items():
        lrs = sorted(by_lr)
        finished = [[r.final_val_loss for r in by_lr[lr] if r.final_val_loss is not None] for lr in lrs]
        color, style = ("C0" if qk_norm else "C3"), ("--" if z_loss else "-")
        sensitivity.plot(lrs, [sum(v) / len(v) if v else math.nan for v in finished], color=color, linestyle=style,
                         marker="o", label=f"qk_norm={str(qk_norm).lower()}, z_loss={z_loss:g}")  # fmt: skip
        for lr, values in zip(lrs, finished):  # each seed
            sensitivity.scatter([lr] * len(values), values, color=color, s=8, alpha=0.6)
    start = sum(r.initial_loss for r in runs) / len(runs)
    sensitivity.axhline(start, color="gray", linewidth=0.8, linestyle=":", label=f"loss at step 1 ({start:.1f})")
    sensitivity.set(xscale="log", yscale="log", xlabel="peak learning rate (optim.lr)",
                    ylabel="final val/loss (line: mean of seeds)", title="learning-rate sensitivity")  # fmt: skip
    sensitivity.legend(fontsize=8)
    sensitivity.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SummarizeInstabilities(Callback):
    """Hydra callback (experiment=instabilities): when the multirun ends, its table and figure (instability_table)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        instability_table(config.hydra.sweep.dir)
