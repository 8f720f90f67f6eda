"""OmegaConf resolvers used by conf/ and the checks run on a composed config before any work starts."""

import torch
from omegaconf import DictConfig, OmegaConf

from gpt2lab.fastpath import cpu_default_precision


def detect_device() -> str:
    """cuda if available, else mps, else cpu: build-nanogpt's detection order."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


OmegaConf.register_new_resolver("gpt2lab.device", detect_device, replace=True)
OmegaConf.register_new_resolver("gpt2lab.cpu_precision", cpu_default_precision, replace=True)


def check_config(cfg: DictConfig) -> None:
    """Fail early, naming the key and the fix, on values that would fail (or mislead) later."""
    if cfg.data.seq_len > cfg.model.block_size:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} is longer than model.block_size={cfg.model.block_size}: "
            f"set data.seq_len<={cfg.model.block_size} or pick a model with a longer context"
        )
    if not cfg.optim.lr > 0:
        raise ValueError(f"optim.lr={cfg.optim.lr}: the learning rate must be positive, e.g. optim.lr=6e-4")


def grad_accum_steps(total_batch_size: int | None, batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that each step sees total_batch_size tokens."""
    tokens_per_micro_batch = batch_size * seq_len * world_size
    if total_batch_size is None:
        return 1
    if total_batch_size % tokens_per_micro_batch:
        raise ValueError(
            f"train.total_batch_size={total_batch_size} is not divisible by data.batch_size × data.seq_len × "
            f"world size = {batch_size} × {seq_len} × {world_size} = {tokens_per_micro_batch}: "
            "make it a multiple, or set train.total_batch_size=null for one micro-batch per step"
        )
    return total_batch_size // tokens_per_micro_batch
