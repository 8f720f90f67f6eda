"""OmegaConf resolvers used by conf/ and the checks run on a composed config before any work starts."""

import os
from dataclasses import dataclass, fields
from datetime import datetime

import torch
from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf, ValidationError

from gpt2lab.callbacks.safe_stop import OnNonFinite
from gpt2lab.fastpath import cpu_default_attention, cpu_default_precision
from gpt2lab.model import ATTENTION
from gpt2lab.sweep import sweep_run_name


def detect_device() -> str:
    """cuda if available, else mps, else cpu: build-nanogpt's detection order."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def new_run_name() -> str:
    """A run dir name that two runs started in the same second on one machine never share."""
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{os.getpid()}"


OmegaConf.register_new_resolver("gpt2lab.device", detect_device, replace=True)
OmegaConf.register_new_resolver("gpt2lab.run_name", new_run_name, use_cache=True, replace=True)
OmegaConf.register_new_resolver("gpt2lab.cpu_precision", cpu_default_precision, replace=True)
OmegaConf.register_new_resolver("gpt2lab.cpu_attention", cpu_default_attention, replace=True)
OmegaConf.register_new_resolver("gpt2lab.sweep_run_name", sweep_run_name, replace=True)


@dataclass
class TrainSchema:
    """conf/train.yaml's `train` node, checked by Hydra as it composes (a typo or a wrong type is an error
    before anything runs); the values live in the YAML."""

    total_batch_size: int | None = MISSING
    val_every_n_steps: int = MISSING
    on_nonfinite: OnNonFinite = MISSING


ConfigStore.instance().store(name="train_schema", node=TrainSchema, package="train")


# Types of the keys that, mistyped, would otherwise fail deep inside Lightning or torch. (Their groups
# take any further keys, e.g. +trainer.profiler=simple, so they are checked here rather than by a schema.)
@dataclass
class _TrainerTypes:
    max_steps: int = MISSING
    gradient_clip_val: float | None = MISSING
    log_every_n_steps: int = MISSING


@dataclass
class _DataTypes:
    batch_size: int = MISSING
    seq_len: int = MISSING
    val_batches: int = MISSING


@dataclass
class _OptimTypes:
    lr: float = MISSING
    weight_decay: float = MISSING


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


TYPE_NAMES = {int: "an integer", float: "a number", int | None: "an integer or null", float | None: "a number or null"}


def _check_types(cfg: DictConfig) -> None:
    for node, schema in (("trainer", _TrainerTypes), ("data", _DataTypes), ("optim", _OptimTypes)):
        keys = [f.name for f in fields(schema) if f.name in cfg[node]]
        try:
            OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.masked_copy(cfg[node], keys))
        except ValidationError as e:
            expected = TYPE_NAMES[{f.name: f.type for f in fields(schema)}[e.key]]
            raise ConfigError(f"{node}.{e.key}={cfg[node][e.key]!r}: expected {expected}") from None


def check_config(cfg: DictConfig) -> None:
    """Fail early, naming the key and the fix, on values that would fail (or mislead) later."""
    _check_types(cfg)
    try:
        instantiate(cfg.model)  # GPTConfig checks that the sizes fit together
    except InstantiationException as e:
        raise ConfigError(str(e.__cause__)) from None
    if cfg.data.seq_len > cfg.model.block_size:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is longer than model.block_size={cfg.model.block_size}: "
            f"set data.seq_len<={cfg.model.block_size} or pick a model with a longer context"
        )
    if cfg.accelerator.attention not in ATTENTION:
        raise ConfigError(
            f"accelerator.attention={cfg.accelerator.attention!r}: must be sdpa (F.scaled_dot_product_attention, "
            "flash where the backend has it) or eager (softmax(q·kᵀ)·v in plain ops)"
        )
    if not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr}: the learning rate must be positive, e.g. optim.lr=6e-4")


def grad_accum_steps(total_batch_size: int | None, batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that each step sees total_batch_size tokens."""
    tokens_per_micro_batch = batch_size * seq_len * world_size
    if total_batch_size is None:
        return 1
    if total_batch_size % tokens_per_micro_batch:
        raise ConfigError(
            f"train.total_batch_size={total_batch_size} is not divisible by data.batch_size × data.seq_len × "
            f"world size = {batch_size} × {seq_len} × {world_size} = {tokens_per_micro_batch}: "
            "make it a multiple, or set train.total_batch_size=null for one micro-batch per step"
        )
    return total_batch_size // tokens_per_micro_batch
