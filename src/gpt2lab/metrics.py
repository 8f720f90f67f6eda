"""What validation measures: val/loss, and how much of it is owed to token ids the training split never
holds (experiment=unused_tokens), with the report that plots a run's unused-token metrics and states the finding."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpt2lab.errors import DataError
from gpt2lab.model import GPT
from gpt2lab.sweep import read_events, scalar_series


@torch.no_grad()
def unused_token_metrics(
    logits: torch.Tensor, targets: torch.Tensor, unseen: torch.Tensor, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """How much of the loss is owed to token ids the training split never holds (`unseen`, a bool per
    logit column): the mean probability the model puts on them, and the cross-entropy with their logits
    masked out (−inf), over the positions whose target does occur in training (another would cost ∞).
    Rows go `chunk` at a time, so the float32 copies stay small beside a large batch's logits."""
    logits, targets = logits.flatten(0, -2), targets.flatten()  # (B·T, V), (B·T,)
    mass, loss_sum, seen_targets = logits.new_zeros((), dtype=torch.float32), 0.0, 0
    for rows, ys in zip(logits.split(chunk), targets.split(chunk)):
        rows = rows.float()
        log_z = rows.logsumexp(-1)  # (N,)
        seen_rows = rows.masked_fill(unseen, float("-inf"))
        log_z_seen = seen_rows.logsumexp(-1)  # (N,) the normalizer over seen ids alone
        mass = mass + (1 - (log_z_seen - log_z).exp()).sum()
        ignore = unseen[ys]
        loss_sum = loss_sum + F.cross_entropy(seen_rows, ys.masked_fill(ignore, -100), reduction="sum")
        seen_targets += int((~ignore).sum())
    return mass / len(targets), loss_sum / max(seen_targets, 1)


def unseen_token_mask(train_token_counts: np.ndarray, padded_vocab_size: int) -> torch.Tensor:
    """True for each logit column whose token the training split never holds (padded rows included)."""
    unseen = torch.ones(padded_vocab_size, dtype=torch.bool)
    unseen[: len(train_token_counts)] = torch.from_numpy(train_token_counts == 0)
    return unseen


@torch.no_grad()
def validation_metrics(model: GPT, batches, unseen: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Means over `batches` of (x, y) of val/loss and, given the `unseen` mask, val/unused_token_mass and
    val/loss_seen_vocab (val/loss − val/loss_seen_vocab: the part of the loss still owed to never-seen tokens)."""
    device = next(model.parameters()).device
    sums = torch.zeros(3 if unseen is not None else 1, device=device)
    for n, (x, y) in enumerate(batches, 1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits, loss = model(x, y)
        sums[0] += loss.float()
        if unseen is not None:
            sums[1:] += torch.stack(unused_token_metrics(logits, y, unseen))
    return dict(zip(("val/loss", "val/unused_token_mass", "val/loss_seen_vocab"), sums / n))


UNUSED_TOKEN_TAGS = ("val/loss", "val/loss_seen_vocab", "val/unused_token_mass")


def unused_token_report(run_dir: str | Path, up_to_step: int | None = None) -> str:
    """How much of a run's early val-loss drop is learning to stop predicting never-seen tokens: plot
    val/loss, val/loss_seen_vocab and val/unused_token_mass into <run dir>/unused_tokens.png, and return the
    finding in one line, from the first validation to the last at or before `up_to_step` (default: all)."""
    run_dir = Path(run_dir)
    accumulators = read_events(run_dir)
    series = {tag: {step: value for step, value, _ in scalar_series(accumulators, tag)} for tag in UNUSED_TOKEN_TAGS}
    steps = sorted(set.intersection(*(set(s) for s in series.values())))
    steps = [s for s in steps if up_to_step is None or s <= up_to_step]
    if len(steps) < 2:
        raise DataError(
            f"{run_dir} has fewer than two validations logging {', '.join(UNUSED_TOKEN_TAGS)}: run "
            "`python scripts/train.py experiment=unused_tokens` (its data dir must hold train_token_counts.npy)"
        )
    loss, seen, mass = ([series[tag][s] for s in steps] for tag in UNUSED_TOKEN_TAGS)
    gap = [a - b for a, b in zip(loss, seen)]
    plot_unused_tokens(steps, loss, seen, mass, run_dir / "unused_tokens.png")
    drop, gap_drop = loss[0] - loss[-1], gap[0] - gap[-1]
    return (
        f"from optimizer step {steps[0]} to {steps[-1]}, val/loss fell {loss[0]:.2f} → {loss[-1]:.2f} "
        f"({drop:.2f} nats), of which the part owed to never-seen tokens (val/loss − val/loss_seen_vocab, "
        f"{gap[0]:.2f} → {gap[-1]:.2f}) explains {gap_drop:.2f} nats = {gap_drop / drop:.0%}; the probability "
        f"on never-seen tokens fell {mass[0]:.3f} → {mass[-1]:.3f}"
    )


def plot_unused_tokens(steps, loss, seen, mass, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    top.plot(steps, loss, label="val/loss")
    top.plot(steps, seen, label="val/loss_seen_vocab (never-seen tokens masked)")
    top.fill_between(steps, seen, loss, alpha=0.2, label="owed to never-seen tokens")
    top.set(ylabel="loss (nats)", title="where the early loss drop comes from")
    top.legend(fontsize="small")
    bottom.plot(steps, mass, color="C3")
    bottom.set(xlabel="optimizer step", ylabel="val/unused_token_mass")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
