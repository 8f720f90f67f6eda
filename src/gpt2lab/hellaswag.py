"""HellaSwag (Zellers et al. 2019): complete a context with one of 4 endings; the model picks the ending
it finds most likely. Scored as build-nanogpt / llm.c do for a base model: each ending's cross-entropy
given the context, averaged over the ending's tokens (acc_norm) or summed (acc)."""

import json
import logging
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import tiktoken
import torch
from hydra.utils import instantiate
from torch.nn import functional as F
from tqdm import tqdm

from gpt2lab.model import GPT
from gpt2lab.sample import load_model

log = logging.getLogger(__name__)

VAL_EXAMPLES = 10_042  # in the official hellaswag_val.jsonl


def load_examples(url: str, path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The examples of the jsonl file at `path`, downloaded from `url` first if it is not there.
    Each line: {"ctx": str, "endings": [4 × str], "label": int, ...} (the official format)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading HellaSwag %s -> %s", url, path)
        partial = path.with_suffix(path.suffix + ".part")  # a killed download never looks complete
        with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        partial.rename(path)
    examples = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            example = json.loads(line)
            if not (isinstance(example.get("ctx"), str) and len(example.get("endings", ())) == 4
                    and example.get("label") in (0, 1, 2, 3)):  # fmt: skip
                raise ValueError(
                    f"{path}:{line_no} is not a HellaSwag example: it needs ctx (text), endings (4 texts) and "
                    f"label (0-3), found keys {sorted(example)}; point hellaswag.path at the official "
                    "hellaswag_val.jsonl, or delete the file to download it again"
                )
            examples.append(example)
            if limit is not None and len(examples) == limit:
                break
    return examples


def render(example: dict, enc: tiktoken.Encoding, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, mask), each (4, L): row i is context + ending i, right-padded with 0; the mask is 1 on the
    ending's tokens. A row longer than block_size keeps its last block_size tokens."""
    ctx = enc.encode(example["ctx"])
    # the ending follows the context after a space, which GPT-2's BPE folds into the ending's first token
    rows = [(ctx + end, [0] * len(ctx) + [1] * len(end)) for end in (enc.encode(" " + e) for e in example["endings"])]
    rows = [(t[-block_size:], m[-block_size:]) for t, m in rows]
    L = max(len(t) for t, _ in rows)
    tokens = torch.zeros(4, L, dtype=torch.long)
    mask = torch.zeros(4, L, dtype=torch.long)
    for i, (t, m) in enumerate(rows):
        tokens[i, : len(t)] = torch.tensor(t)
        mask[i, : len(m)] = torch.tensor(m)
    return tokens, mask


@torch.no_grad()
def ending_losses(model: GPT, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the cross-entropy of the masked (ending) tokens, summed and averaged over them."""
    logits, _ = model(tokens)  # (N, L, vocab)
    # position t predicts token t+1: score the ending tokens 1..L-1 from the logits at 0..L-2
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none").view(
        tokens.size(0), -1
    )  # (N, L-1)
    m = mask[:, 1:].float()
    summed = (losses * m).sum(dim=1)
    return summed, summed / m.sum(dim=1)


def batches(examples: list[dict], enc, block_size: int, size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """`size` examples at a time as (tokens, mask, labels): tokens and mask (4·size, L), padded to the
    longest row (causal attention: padding on the right changes nothing before it)."""
    for start in range(0, len(examples), size):
        rendered = [render(ex, enc, block_size) for ex in examples[start : start + size]]
        L = max(t.size(1) for t, _ in rendered)
        tokens = torch.cat([F.pad(t, (0, L - t.size(1))) for t, _ in rendered])
        mask = torch.cat([F.pad(m, (0, L - m.size(1))) for _, m in rendered])
        labels = torch.tensor([ex["label"] for ex in examples[start : start + size]])
        yield tokens, mask, labels


def evaluate(
    model: GPT,
    examples: list[dict],
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """This rank's share of the examples (every world_size-th, from the rank-th) scored on the model's
    device; returns the counts [examples, correct by average loss, correct by summed loss], to be summed
    over ranks. The caller sets eval mode and autocast."""
    enc = tiktoken.get_encoding("gpt2")
    device = next(model.parameters()).device
    shard = examples[rank::world_size]
    counts = torch.zeros(3, dtype=torch.long, device=device)
    # eager even if the model is compiled: every batch has another length, each a recompilation
    with torch.compiler.set_stance("force_eager"):
        for tokens, mask, labels in tqdm(
            batches(shard, enc, model.config.block_size, batch_size),
            total=-(-len(shard) // batch_size), desc="HellaSwag", disable=not progress, leave=False,
        ):  # fmt: skip
            summed, averaged = ending_losses(model, tokens.to(device), mask.to(device))
            labels = labels.to(device)
            counts[0] += labels.numel()
            counts[1] += (averaged.view(-1, 4).argmin(dim=1) == labels).sum()
            counts[2] += (summed.view(-1, 4).argmin(dim=1) == labels).sum()
    return counts


def accuracies(counts: torch.Tensor) -> dict[str, float]:
    n, correct_norm, correct = counts.tolist()
    return {"acc_norm": correct_norm / n, "acc": correct / n, "examples": n}


def evaluate_from_config(cfg) -> dict[str, float]:
    """scripts/eval_hellaswag.py: the model that cfg.ckpt or cfg.hf names, scored on cfg.accelerator's
    devices (one process each, Lightning Fabric) at its precision."""
    fabric = L.Fabric(
        accelerator=cfg.accelerator.name, devices=cfg.accelerator.devices, precision=cfg.accelerator.precision
    )
    fabric.launch()
    if cfg.accelerator.matmul_precision:
        torch.set_float32_matmul_precision(cfg.accelerator.matmul_precision)
    load = instantiate(cfg.hellaswag.load_examples)
    if fabric.is_global_zero:
        load()  # downloads once, on one rank
    fabric.barrier()
    examples = load()
    model = load_model(cfg).to(fabric.device).eval()
    with fabric.autocast():
        counts = evaluate(
            model, examples, fabric.global_rank, fabric.world_size, cfg.hellaswag.batch_size,
            progress=fabric.is_global_zero,
        )  # fmt: skip
    return accuracies(fabric.all_reduce(counts, reduce_op="sum"))
