"""HellaSwag (Zellers et al. 2019): complete a context with one of 4 endings; the model picks the ending
it finds most likely. Scored as build-nanogpt / llm.c do for a base model: each ending's cross-entropy
given the context, averaged over the ending's tokens (acc_norm) or summed (acc)."""

import http.client
import json
import logging
import os
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import tiktoken
import torch
from torch.nn import functional as F
from tqdm import tqdm

from gpt2lab import tokenizer
from gpt2lab.errors import DataError
from gpt2lab.model import GPT

log = logging.getLogger(__name__)

VAL_EXAMPLES = 10_042  # in the official hellaswag_val.jsonl
T = TypeVar("T")


def download(url: str, path: Path) -> None:
    """url's bytes to path, or a DataError that says how to put the file there by hand. The bytes go to a
    .part file renamed into place when complete, so a failed or killed download never looks like the data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading HellaSwag %s -> %s", url, path)
    partial = path.with_suffix(path.suffix + ".part")
    try:
        with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
            # http.client returns a cut connection's bytes as if they were all: compare with what it announced
            if total is not None and out.tell() != total:
                raise http.client.IncompleteRead(b"", total - out.tell())
        partial.rename(path)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
        raise DataError(
            f"could not download HellaSwag from {url} ({type(e).__name__}: {e}): on a machine without network, "
            f"put hellaswag_val.jsonl at {path} or set GPT2LAB_HELLASWAG=/path/to/hellaswag_val.jsonl "
            "(see conf/callbacks/hellaswag.yaml and conf/eval_hellaswag.yaml)"
        ) from e
    finally:
        partial.unlink(missing_ok=True)


def load_examples(url: str, path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The examples of the jsonl file at `path`, downloaded from `url` first if it is not there.
    Each line: {"ctx": str, "endings": [4 × str], "label": int, ...} (the official format)."""
    path = Path(path)
    if not path.exists():
        download(url, path)
    examples = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError:
                example = None
            if not (isinstance(example, dict) and isinstance(example.get("ctx"), str)
                    and len(example.get("endings", ())) == 4 and example.get("label") in (0, 1, 2, 3)):  # fmt: skip
                found = f"found keys {sorted(example)}" if isinstance(example, dict) else "found no JSON object"
                raise DataError(
                    f"{path}:{line_no} is not a HellaSwag example: it needs ctx (text), endings (4 texts) and "
                    f"label (0-3), {found}; point GPT2LAB_HELLASWAG (or load_examples.path) at the official "
                    "hellaswag_val.jsonl, or delete the file to download it again"
                )
            examples.append(example)
            if limit is not None and len(examples) == limit:
                break
    return examples


def rank_zero_first(load: Callable[[], T], is_global_zero: bool, barrier: Callable[[], None]) -> T:
    """load() on every rank, on rank 0 first: what it downloads is downloaded once, and the other ranks
    read the finished file (the training callback and scripts/eval_hellaswag.py both load this way)."""
    result = load() if is_global_zero else None
    barrier()
    return result if is_global_zero else load()


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
    enc = tokenizer.encoding()
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
