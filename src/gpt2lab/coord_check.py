"""μP's coordinate check (Yang et al. 2022, "Tensor Programs V"; the mup package's coord_check): train the same model at
several widths for a few AdamW steps and record, after each, the RMS of every layer's output on a fixed batch. Under
μP each coordinate's size stays the same as the width grows (a log-log slope ≈ 0); under SP the logits, and later the
attention logits, grow with it. scripts/coord_check.py runs it (conf/coord_check.yaml); docs/mup.md shows the plot."""

import csv
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.optim import Optimizer

from gpt2lab.lit_module import adamw_groups
from gpt2lab.model import GPT, GPTConfig

FIELDS = ("parametrization", "width", "seed", "step", "coordinate", "rms")
KINDS = ("embedding", "attn_logits", "attn_out", "mlp_out", "logits")  # a coordinate: `<kind>` or `<kind>/layer_<i>`


@dataclass
class Row:
    parametrization: str
    width: int
    seed: int
    step: int  # optimizer steps done: 0 is the init
    coordinate: str
    rms: float


def rms(t: torch.Tensor) -> float:
    return t.float().square().mean().sqrt().item()


def record(model: GPT, x: torch.Tensor) -> dict[str, float]:
    """The RMS of each coordinate in one forward of x (B, T), read by forward hooks: the embeddings (wte + wpe, the
    first block's input), each block's attention logits q·kᵀ·scale over the positions a query sees, its attention and
    MLP outputs (what each adds to the residual stream), and the output logits."""
    found, hooks = {}, []
    blocks = model.transformer.h

    def embedding(module, args):
        found["embedding"] = rms(args[0])

    def output(name):
        def hook(module, args, out):
            found[name] = rms(out)

        return hook

    def attention_logits(i):
        attn = blocks[i].attn

        def hook(module, args, out):  # out: c_attn's (B, T, 3C), q, k and v side by side
            B, T, C = out.size(0), out.size(1), out.size(2) // 3
            q, k, _ = out.split(C, dim=2)
            q = q.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)  # (B, nh, T, hs)
            att = (q @ k.transpose(-2, -1)) * attn.scale  # (B, nh, T, T): the model's own scale
            seen = torch.ones(T, T, dtype=torch.bool, device=out.device).tril()  # the keys each query attends to
            found[f"attn_logits/layer_{i}"] = rms(att[..., seen])

        return hook

    hooks.append(blocks[0].register_forward_pre_hook(embedding))
    for i, block in enumerate(blocks):
        hooks.append(block.attn.c_attn.register_forward_hook(attention_logits(i)))
        hooks.append(block.attn.register_forward_hook(output(f"attn_out/layer_{i}")))
        hooks.append(block.mlp.register_forward_hook(output(f"mlp_out/layer_{i}")))
    try:
        with torch.no_grad():
            found["logits"] = rms(model(x)[0])  # the model's output: under mup after the readout's 1/m
    finally:
        for hook in hooks:
            hook.remove()
    return found


def coord_check(
    config: GPTConfig,
    widths: Sequence[int],
    parametrizations: Sequence[str],
    seeds: Sequence[int],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    probe: torch.Tensor,
    init_weights: Callable[[GPT], None],
    make_optimizer: Callable[..., Optimizer],
    attention: str = "sdpa",
) -> list[Row]:
    """For each parametrization, width (n_embd; config's other sizes) and seed: a model initialized by init_weights,
    trained one AdamW step on each of `batches` (x, y), at the lr make_optimizer gives (optim.lr: constant, no warmup
    and no gradient clipping, which would hide how the update grows with width) in the project's parameter groups
    (adamw_groups: under mup the hidden matrices' lr × 1/m); the coordinates' RMS on `probe` (B, T) at init and after
    every step."""
    if config.position == "rope" or config.qk_norm:
        raise ValueError("coord_check reads q and k off c_attn: GPT-2's learned positions, no qk_norm")
    rows = []
    for parametrization in parametrizations:
        for width in widths:
            for seed in seeds:
                torch.manual_seed(seed)
                model = GPT(replace(config, n_embd=width, parametrization=parametrization), attention)
                init_weights(model)
                named = [(name, p) for name, p in model.named_parameters()]
                optimizer = make_optimizer(adamw_groups(model.config, named, make_optimizer.keywords["lr"]))
                for step in range(len(batches) + 1):
                    if step:
                        x, y = batches[step - 1]
                        model(x, y)[1].backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    for coordinate, value in record(model, probe).items():
                        rows.append(Row(parametrization, width, seed, step, coordinate, value))
    return rows


def mean_rms(rows: Iterable[Row]) -> dict[tuple[str, int, str, int], float]:
    """{(parametrization, step, coordinate, width): the mean RMS over seeds}."""
    sums = {}
    for r in rows:
        key = (r.parametrization, r.step, r.coordinate, r.width)
        total, n = sums.get(key, (0.0, 0))
        sums[key] = (total + r.rms, n + 1)
    return {key: total / n for key, (total, n) in sums.items()}


def slopes(rows: Iterable[Row]) -> dict[tuple[str, int, str], float]:
    """{(parametrization, step, coordinate): the least-squares slope of log RMS (mean over seeds) against log width}:
    0 when the coordinate's size does not depend on the width, 0.5 when it grows as √width."""
    points = {}
    for (parametrization, step, coordinate, width), value in mean_rms(rows).items():
        points.setdefault((parametrization, step, coordinate), []).append((math.log(width), math.log(value)))
    fits = {}
    for key, xy in points.items():
        mx, my = sum(x for x, _ in xy) / len(xy), sum(y for _, y in xy) / len(xy)
        fits[key] = sum((x - mx) * (y - my) for x, y in xy) / sum((x - mx) ** 2 for x, _ in xy)
    return fits


def coordinates(rows: Iterable[Row]) -> list[str]:
    """The coordinates in the model's order: embeddings, then each kind layer by layer, the logits last."""
    names = {r.coordinate for r in rows}
    return sorted(names, key=lambda c: (KINDS.index(c.split("/")[0]), int(c.rsplit("_", 1)[1]) if "/" in c else 0))


def slope_table(rows: Sequence[Row]) -> str:
    """Each coordinate's slope per parametrization and step, as a markdown table."""
    fits = slopes(rows)
    parametrizations = list(dict.fromkeys(r.parametrization for r in rows))
    steps = sorted({r.step for r in rows})
    header = ["coordinate", *(f"{p} step {s}" for p in parametrizations for s in steps)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for c in coordinates(rows):
        lines.append(f"| {c} | " + " | ".join(f"{fits[p, s, c]:+.2f}" for p in parametrizations for s in steps) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        writer.writerows([getattr(r, name) for name in FIELDS] for r in rows)


def plot(rows: Sequence[Row], path: Path) -> None:
    """One panel per step (columns) and parametrization (rows): RMS (mean over seeds) against width, log-log, a line
    per coordinate: a kind's layers in one color, lighter to darker with depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = mean_rms(rows)
    parametrizations = list(dict.fromkeys(r.parametrization for r in rows))
    steps, widths = sorted({r.step for r in rows}), sorted({r.width for r in rows})
    names = coordinates(rows)
    layers = max([int(c.rsplit("_", 1)[1]) + 1 for c in names if "/" in c] or [1])
    colors = dict(zip(KINDS, ("tab:gray", "tab:red", "tab:blue", "tab:green", "black")))
    fig, axes = plt.subplots(len(parametrizations), len(steps), figsize=(3.2 * len(steps), 3.2 * len(parametrizations)),
                             sharex=True, sharey=True, squeeze=False)  # fmt: skip
    for row, parametrization in enumerate(parametrizations):
        for col, step in enumerate(steps):
            ax = axes[row][col]
            for c in names:
                kind, layer = c.split("/")[0], int(c.rsplit("_", 1)[1]) if "/" in c else layers - 1
                ax.plot(widths, [means[parametrization, step, c, w] for w in widths], marker="o", markersize=3,
                        color=colors[kind], alpha=0.35 + 0.65 * (layer + 1) / layers, label=c)  # fmt: skip
            ax.set(xscale="log", yscale="log", title=f"{parametrization}, step {step}")
            ax.set_xticks(widths, [str(w) for w in widths], minor=False)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            if row == len(parametrizations) - 1:
                ax.set_xlabel("width (n_embd)")
            if col == 0:
                ax.set_ylabel("RMS on a fixed batch")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
