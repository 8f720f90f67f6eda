"""Text from a GPT: sampling with temperature and top-k (with the key/value cache), GPT-2 BPE prompts in and
text out. The model comes from gpt2lab.checkpoint.load_model; scripts/sample.py joins the two."""

import logging
from collections.abc import Callable

import torch
from torch.nn import functional as F

from gpt2lab import tokenizer
from gpt2lab.model import GPT, KVCache

log = logging.getLogger(__name__)


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """One token id per row of logits (B, vocab): greedy at temperature 0, else drawn from
    softmax(logits / temperature) restricted to the top_k likeliest tokens."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    if top_k is None:
        return torch.multinomial(F.softmax(logits / temperature, dim=-1), num_samples=1, generator=generator)
    # draw among the k likeliest only: k random numbers a token instead of one per vocabulary entry
    top_logits, top_ids = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k) each
    choice = torch.multinomial(F.softmax(top_logits / temperature, dim=-1), num_samples=1, generator=generator)
    return top_ids.gather(-1, choice)  # (B, 1)


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
    kv_cache: bool = True,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Extend each row of idx (B, T) by up to max_new_tokens sampled tokens; returns (B, T + new).

    A row that samples stop_token is padded with it from then on; generation ends when all rows have, or when
    stop (given the tokens generated so far, (B, new)) says of every row that it is complete (B,): e.g. that a
    stop string appeared in its text.
    With kv_cache, each step runs the model on the newest token only; without, on the whole context.
    Both give the same tokens.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 samples greedily)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k}: must be >= 1, or null to sample from the whole vocabulary")
    block_size = model.config.block_size
    cache = KVCache(model.config) if kv_cache else None
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    prompt_len = idx.size(1)
    for _ in range(max_new_tokens):
        if cache is not None and idx.size(1) <= block_size:
            # the cache holds every position but the newest: run only those (the whole prompt, at first)
            logits, _ = model(idx[:, cache.pos :], kv_cache=cache)
        else:
            # once the sequence outgrows the context the window slides and every position shifts, so
            # nothing cached stays valid: each token costs a run over the last block_size tokens
            logits, _ = model(idx[:, -block_size:])
        logits = logits[:, -1, : model.config.vocab_size]  # padded vocabulary rows are never sampled
        next_token = sample_next(logits, temperature, top_k, generator)  # (B, 1)
        if stop_token is not None:
            next_token = next_token.masked_fill(done[:, None], stop_token)
            done |= next_token[:, 0] == stop_token
        idx = torch.cat([idx, next_token], dim=1)
        if stop is not None:
            done |= stop(idx[:, prompt_len:])
        if done.all():
            break
    return idx


def encode_prompt(prompt: str, block_size: int) -> list[int]:
    """GPT-2 BPE ids of prompt; an empty prompt is <|endoftext|>, the start of a new document (as in the
    training data); a prompt longer than the context keeps its last block_size tokens."""
    enc = tokenizer.encoding()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [tokenizer.EOT_ID]
    if len(ids) > block_size:
        log.warning(
            "the prompt is %d tokens, longer than the context (block_size=%d): keeping its last %d",
            len(ids), block_size, block_size,
        )  # fmt: skip
        ids = ids[-block_size:]
    return ids


def sample(
    model: GPT,
    prompt: str,
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    stop_at_eot: bool = True,
    kv_cache: bool = True,
) -> list[str]:
    """num_samples texts continuing prompt (each starts with the prompt), the same for the same seed."""
    enc = tokenizer.encoding()
    device = next(model.parameters()).device
    prompt_ids = encode_prompt(prompt, model.config.block_size)
    idx = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)
    # a generator of its own: the same seed gives the same text, and the global RNG stream (training's) is untouched
    generator = torch.Generator(device=device).manual_seed(seed)
    stop_token = tokenizer.EOT_ID if stop_at_eot else None
    out = generate(
        model, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
        stop_token=stop_token, kv_cache=kv_cache,
    )  # fmt: skip
    shown_prompt = prompt_ids if prompt else []  # the <|endoftext|> an empty prompt starts from is not text
    texts = []
    for row in out[:, len(prompt_ids) :].tolist():
        if stop_token in row:
            row = row[: row.index(stop_token)]
        texts.append(enc.decode(shown_prompt + row))
    return texts
