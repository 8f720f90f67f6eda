"""Text from a GPT: sampling with temperature and top-k (with the key/value cache), GPT-2 BPE prompts in and
text out, and the model from a training checkpoint or Hugging Face weights."""

import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.nn import functional as F

from gpt2lab.data.prepare import gpt2_encoding
from gpt2lab.hf import load_weights
from gpt2lab.model import GPT, GPTConfig, KVCache

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
) -> torch.Tensor:
    """Extend each row of idx (B, T) by up to max_new_tokens sampled tokens; returns (B, T + new).

    A row that samples stop_token is padded with it from then on; generation ends when all rows have.
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
        if done.all():
            break
    return idx


def encode_prompt(prompt: str, block_size: int) -> list[int]:
    """GPT-2 BPE ids of prompt; an empty prompt is <|endoftext|>, the start of a new document (as in the
    training data); a prompt longer than the context keeps its last block_size tokens."""
    enc = gpt2_encoding()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]
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
    enc = gpt2_encoding()
    device = next(model.parameters()).device
    prompt_ids = encode_prompt(prompt, model.config.block_size)
    idx = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)
    # a generator of its own: the same seed gives the same text, and the global RNG stream (training's) is untouched
    generator = torch.Generator(device=device).manual_seed(seed)
    stop_token = enc.eot_token if stop_at_eot else None
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


def resolve_checkpoint(ckpt: str | os.PathLike, runs_dir: str | os.PathLike) -> Path:
    """The .ckpt file that ckpt names: a file; a run dir (its checkpoints/last.ckpt); or `last`, the
    newest run under runs_dir that has one."""
    if str(ckpt) == "last":
        found = list(Path(runs_dir).glob("*/checkpoints/last.ckpt"))
        if not found:
            raise FileNotFoundError(
                f"ckpt=last: no run under {runs_dir} has checkpoints/last.ckpt; train one, or pass "
                "ckpt=<run dir or .ckpt file> (or runs_dir=...)"
            )
        return max(found, key=lambda p: p.stat().st_mtime)
    path = Path(ckpt)
    for candidate in (path, path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"ckpt={ckpt}: no checkpoint there (looked for the file, <dir>/checkpoints/last.ckpt and <dir>/last.ckpt); "
        "pass a .ckpt file, a run dir, or ckpt=last"
    )


def load_checkpoint(path: str | os.PathLike) -> GPT:
    """The GPT of a training checkpoint, rebuilt from the config GPTModule saves in it
    (hyper_parameters.model); its weights are state_dict's `model.*` entries."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data: no code runs
    except Exception as e:
        raise ValueError(f"{path} is not a training checkpoint: torch.load failed ({type(e).__name__}: {e})") from e
    config = ckpt.get("hyper_parameters", {}).get("model") if isinstance(ckpt, dict) else None
    if config is None or "state_dict" not in ckpt:
        raise ValueError(
            f"{path} is not a gpt2lab training checkpoint: it lacks hyper_parameters.model (the GPTConfig "
            "GPTModule saves) or state_dict; for Hugging Face weights pass hf=... instead"
        )
    model = GPT(GPTConfig(**config))
    state_dict = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    load_weights(model, state_dict, str(path))
    return model


def load_model(cfg: DictConfig) -> GPT:
    """The model that cfg.ckpt (a training checkpoint) or cfg.hf (Hugging Face weights) names: exactly one."""
    if (cfg.ckpt is None) == (cfg.hf is None):
        raise ValueError(
            f"pass exactly one of ckpt=<run dir | .ckpt file | last> or hf=<gpt2... | save_pretrained dir> "
            f"(got ckpt={cfg.ckpt}, hf={cfg.hf})"
        )
    if cfg.hf is not None:
        return GPT.from_pretrained(cfg.hf)
    path = resolve_checkpoint(cfg.ckpt, cfg.runs_dir)
    log.info("loading %s", path)
    return load_checkpoint(path)


def sample_from_config(cfg: DictConfig) -> list[str]:
    """scripts/sample.py: load the model conf/sample.yaml names and sample from it."""
    model = load_model(cfg).to(cfg.device).eval()
    log.info("%s parameters on %s", f"{model.num_params():,}", cfg.device)
    return sample(
        model, cfg.prompt, num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed, stop_at_eot=cfg.stop_at_eot,
        kv_cache=cfg.kv_cache,
    )  # fmt: skip
