"""What validation measures: val/loss, and its exact split at token ids the training split never holds
(experiment=unused_tokens), with the report that plots a run's split and states the finding."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gpt2lab.errors import DataError
from gpt2lab.model import GPT

VAL_LOSS = "val/loss"  # the validation loss: what train() returns, a sweep compares and a search minimizes


@torch.no_grad()
def unused_token_sums(
    logits: torch.Tensor, targets: torch.Tensor, unseen: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """What splits the loss at token ids the training split never holds (`unseen`, a bool per logit column),
    summed over the positions of `logits` (..., V) in float32: [Σ_S −log p_seen(y), Σ_S −log(1 − m),
    Σ_U −log p(y), |U|, Σ m]. S are the positions whose target y training holds, U the others; m is the
    probability on never-seen ids and p_seen the distribution renormalized over the seen ids, so on S
    p(y) = p_seen(y) · (1 − m): −log p(y) = −log p_seen(y) − log(1 − m), exactly.
    Rows go `chunk` at a time, so the float32 copies stay small beside a large batch's logits."""
    logits, targets = logits.flatten(0, -2), targets.flatten()  # (N, V), (N,)
    sums = torch.zeros(5, device=logits.device)
    for rows, ys in zip(logits.split(chunk), targets.split(chunk)):
        rows = rows.float()
        log_z = rows.logsumexp(-1)  # (n,)
        log_z_seen = rows.masked_fill(unseen, float("-inf")).logsumexp(-1)  # (n,) the normalizer over seen ids
        # log(1 − m) as a difference of normalizers: 1 − m itself rounds to 0 or 1 in float32 at the extremes
        log_seen_mass = log_z_seen - log_z
        target_logits = rows.gather(-1, ys[:, None]).squeeze(-1)  # (n,)
        unseen_target = unseen[ys]
        seen_target = ~unseen_target
        sums += torch.stack(
            (
                (log_z_seen - target_logits)[seen_target].sum(),
                -log_seen_mass[seen_target].sum(),
                (log_z - target_logits)[unseen_target].sum(),
                unseen_target.sum().float(),
                -torch.expm1(log_seen_mass).sum(),
            )
        )
    return sums


def unseen_token_mask(train_token_counts: np.ndarray, padded_vocab_size: int) -> torch.Tensor:
    """True for each logit column whose token the training split never holds (padded rows included)."""
    unseen = torch.ones(padded_vocab_size, dtype=torch.bool)
    unseen[: len(train_token_counts)] = torch.from_numpy(train_token_counts == 0)
    return unseen


@torch.no_grad()
def validation_metrics(
    model: GPT, batches, unseen: torch.Tensor | None = None, reduce_sums: Callable | None = None
) -> dict[str, torch.Tensor]:
    """val/loss, the mean over the positions of `batches` of (x, y), and given the `unseen` mask its exact split
    at never-seen ids (S, U, m, p_seen as in unused_token_sums; p_U = |U| / (|S| + |U|)):
        val/loss              = (1 − p_U) · val/loss_seen_targets + p_U · val/loss_unseen_targets
        val/loss_seen_targets = val/loss_seen_vocab + val/unseen_mass_nll
    with val/loss_seen_targets, val/loss_seen_vocab, val/unseen_mass_nll the means over S of −log p(y),
    −log p_seen(y) and −log(1 − m); val/loss_unseen_targets the mean over U of −log p(y);
    val/unseen_target_share = p_U; val/unused_token_mass the mean of m over all positions.
    Sums over the whole validation, and over ranks (`reduce_sums`, e.g. the strategy's sum-reduce), are taken
    before dividing: the identities hold for the values logged, where means of per-batch or per-rank means
    would not (each rank holds its own share of U)."""
    device = next(model.parameters()).device
    sums = torch.zeros(2 if unseen is None else 7, device=device)  # Σ loss, positions, then unused_token_sums
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits, loss = model(x, y)
        sums[0] += loss.float() * y.numel()
        sums[1] += y.numel()
        if unseen is not None:
            sums[2:] += unused_token_sums(logits, y, unseen)
    if reduce_sums is not None:
        sums = reduce_sums(sums)
    positions = sums[1]
    metrics = {VAL_LOSS: sums[0] / positions}
    if unseen is None:
        return metrics
    seen_vocab_nll, unseen_mass_nll, unseen_target_nll, unseen_targets, unused_mass = sums[2:]
    seen_targets = positions - unseen_targets
    return metrics | {
        "val/loss_seen_targets": (seen_vocab_nll + unseen_mass_nll) / seen_targets.clamp(min=1),
        "val/loss_seen_vocab": seen_vocab_nll / seen_targets.clamp(min=1),
        "val/unseen_mass_nll": unseen_mass_nll / seen_targets.clamp(min=1),
        "val/loss_unseen_targets": unseen_target_nll / unseen_targets.clamp(min=1),  # 0 when no target is unseen
        "val/unseen_target_share": unseen_targets / positions,
        "val/unused_token_mass": unused_mass / positions,
    }


UNUSED_TOKEN_TAGS = (VAL_LOSS, "val/loss_seen_vocab", "val/unseen_mass_nll", "val/loss_unseen_targets",
                     "val/unseen_target_share", "val/unused_token_mass")  # fmt: skip
# val/loss = the sum of these three at every validation (validation_metrics): name: (formula, its value from the tags)
LOSS_PARTS = {
    "learning the seen vocabulary": (
        "(1 − p_U) · val/loss_seen_vocab",
        lambda t: (1 - t["val/unseen_target_share"]) * t["val/loss_seen_vocab"],
    ),
    "the never-seen mass term": (
        "(1 − p_U) · val/unseen_mass_nll",
        lambda t: (1 - t["val/unseen_target_share"]) * t["val/unseen_mass_nll"],
    ),
    "the unseen-target positions": (
        "p_U · val/loss_unseen_targets",
        lambda t: t["val/unseen_target_share"] * t["val/loss_unseen_targets"],
    ),
}


def unused_token_report(run_dir: str | Path, up_to_step: int | None = None) -> str:
    """Where a run's early val-loss drop comes from: plot val/loss and its three parts (LOSS_PARTS) and the
    probability on never-seen ids into <run dir>/unused_tokens.png, and return the finding in one line, from
    the first validation to the last at or before `up_to_step` (default: all)."""
    from gpt2lab.sweep import read_events, scalar_series  # here: it imports Lightning, which validation never needs

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
    at = [{tag: series[tag][s] for tag in UNUSED_TOKEN_TAGS} for s in steps]
    loss, mass = [t[VAL_LOSS] for t in at], [t["val/unused_token_mass"] for t in at]
    parts = {name: [part(t) for t in at] for name, (_, part) in LOSS_PARTS.items()}
    plot_unused_tokens(steps, loss, parts, mass, run_dir / "unused_tokens.png")
    drop, first, last = loss[0] - loss[-1], at[0], at[-1]
    explained = ", ".join(
        f"{name} {p[0]:.2f} → {p[-1]:.2f}: {p[0] - p[-1]:.2f} nats = {(p[0] - p[-1]) / drop:.0%}"
        for name, p in parts.items()
    )
    return (
        f"from optimizer step {steps[0]} to {steps[-1]}, val/loss fell {loss[0]:.2f} → {loss[-1]:.2f} "
        f"({drop:.2f} nats) = {explained}; {first['val/unseen_target_share']:.1%} of val positions have a target "
        f"training never holds, their loss {first['val/loss_unseen_targets']:.2f} → "
        f"{last['val/loss_unseen_targets']:.2f}; the seen-vocabulary loss {first['val/loss_seen_vocab']:.2f} → "
        f"{last['val/loss_seen_vocab']:.2f}; the probability on never-seen tokens {mass[0]:.3f} → {mass[-1]:.3f}"
    )


def plot_unused_tokens(steps, loss, parts: dict[str, list[float]], mass, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    labels = [f"{name}: {LOSS_PARTS[name][0]}" for name in parts]
    top.stackplot(steps, *parts.values(), labels=labels, alpha=0.5)  # the parts stack up to val/loss
    top.plot(steps, loss, color="black", label="val/loss (p_U = val/unseen_target_share)")
    top.set(ylabel="loss (nats)", title="where the early loss drop comes from")
    top.legend(fontsize="small", loc="upper right")
    bottom.plot(steps, mass, color="C3")
    bottom.set(xlabel="optimizer step", ylabel="val/unused_token_mass")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
