"""What a run knows of its config: its run dir name and, in a multirun, what the sweep varies (the OmegaConf
resolvers conf/ uses, registered by register_resolvers, which every entry point calls before Hydra composes);
the schema of `train`, and the checks run on a composed config before any work starts."""

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from enum import Enum
from itertools import count
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf, ValidationError

from gpt2lab import tokenizer
from gpt2lab.errors import ConfigError
from gpt2lab.model import GPTConfig, check_attention

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """The SLURM job this process runs in, as `scontrol requeue` takes it (`<array job>_<task>` for an array
    task); None outside SLURM."""
    if array_job := os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def new_run_name() -> str:
    """A run dir name that two runs started in the same second on one machine never share, and that every process
    of one run, on every node, agrees on: under SLURM the job's id, so that a requeued job runs in the same dir
    again (and resumes from its last.ckpt); under torchrun its rendezvous id (`--rdzv-id`, one per job)."""
    if job := slurm_job_id():
        return f"slurm_{job}"
    if rdzv_id := os.environ.get("TORCHELASTIC_RUN_ID"):
        if rdzv_id == "none" and int(os.environ["WORLD_SIZE"]) > 1:  # torchrun's default: each rank would name its own
            raise ConfigError(
                "torchrun without --rdzv-id gives its workers no common run dir: pass --rdzv-id=<a job id> (the same "
                "on every node), or hydra.run.dir=<a dir on the shared filesystem>"
            )
        return f"torchrun_{rdzv_id}"
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{os.getpid()}"


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def if_multirun(in_a_multirun: str, otherwise: str) -> str:
    """${gpt2lab.if_multirun:a,b}: a in a multirun's job, else b (a single run, or outside Hydra)."""
    return in_a_multirun if in_multirun() else otherwise


def sweep_dir() -> str:
    """${gpt2lab.sweep_dir:}: a multirun's sweep dir, absolute (what its jobs share lives there, e.g. an MLflow store);
    "" for a single run."""
    return str(Path(HydraConfig.get().sweep.dir).absolute()) if in_multirun() else ""


def basename(path: str) -> str:
    """${gpt2lab.basename:<path>}: its last part, e.g. a run dir's name."""
    return Path(path).name


def swept_keys() -> set[str]:
    """The keys this multirun varies: those its command line or hydra.sweeper.params give several values (`a=1,2`,
    choice(), range(), interval()). A job's config holds only its own values; the sweep's are in the config the
    sweeper saved before the first job, <sweep dir>/multirun.yaml."""
    hydra = HydraConfig.get()
    saved = Path(hydra.sweep.dir, "multirun.yaml")
    sweep = OmegaConf.load(saved).hydra if saved.is_file() else hydra
    params = [f"{key}={value}" for key, value in (sweep.sweeper.get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides([*params, *sweep.overrides.task])
    is_swept = {o.key_or_group: o.is_sweep_override() for o in overrides}  # the last of a key wins, as in the sweeper
    return {key for key, swept in is_swept.items() if swept}


def swept_overrides() -> dict[str, str]:
    """This job's overrides of the keys its multirun varies, {key: `key=value` as Hydra writes it}, in the order of
    Hydra's override_dirname; {} for a single run."""
    if not in_multirun():
        return {}
    keys = swept_keys()
    overrides = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return {
        o.key_or_group: o.input_line for o in sorted(overrides, key=lambda o: o.input_line) if o.key_or_group in keys
    }


def sweep_run_name() -> str:
    """A multirun job's name (hydra.sweep.subdir: its dir, and so its TensorBoard run): what the sweep varies
    (`init=gpt2,optim.lr=0.001`), no job number and no override every job shares, so that the same run keeps its
    name when the sweep runs again; the job number when nothing varies. "" for a single run or outside Hydra.

    Another sweep into the same sweep dir whose jobs differ only in an override they all share (the sweep again with
    model.parametrization=mup) would get the same names, and overwrite the first sweep's runs: a dir that holds a
    run of other overrides is not this job's, and the job takes the first free or own of `<name>~2`, `<name>~3`...
    A job resuming (ckpt_path) with another override changed too continues the run whose overrides are closest."""
    if not in_multirun():
        return ""
    hydra = HydraConfig.get()
    name = ",".join(swept_overrides().values()).replace("/", "_") or str(hydra.job.num)  # not nested
    if hydra.output_subdir is None:  # no .hydra/overrides.yaml to tell whose a dir is
        return name
    mine = job_identity(hydra.overrides.task)
    taken: dict[str, frozenset[str]] = {}  # name: its run's overrides, for a run of other overrides
    for n in count(1):
        candidate = name if n == 1 else f"{name}~{n}"
        recorded = Path(hydra.sweep.dir, candidate, hydra.output_subdir, "overrides.yaml")
        if not recorded.is_file():
            break
        theirs = job_identity(OmegaConf.load(recorded))
        if theirs == mine:
            return candidate  # this run's dir: the sweep runs again, or a requeued job
        taken[candidate] = theirs
    if taken and any(line.startswith("ckpt_path=") for line in hydra.overrides.task):
        # ckpt_path=last with another change (trainer.max_steps=…): the run it resumes shares the most overrides
        return min(taken, key=lambda other: len(taken[other] ^ mine))
    if taken:
        log.warning("%s holds a run of other overrides: it is left as it is, and this run goes to %s",
                    Path(hydra.sweep.dir, name), candidate)  # fmt: skip
    return candidate


def job_identity(overrides: Sequence[str]) -> frozenset[str]:
    """What makes two multirun jobs the same run: their overrides, but for where they read and write
    (hydra.job.config.override_dirname.exclude_keys: the paths, and ckpt_path, so that a job resumes in its dir)."""
    excluded = set(HydraConfig.get().job.config.override_dirname.exclude_keys)
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return frozenset(o.input_line for o in parsed if o.key_or_group not in excluded)


def register_resolvers() -> None:
    """${gpt2lab.run_name:} (hydra.run.dir), ${gpt2lab.sweep_run_name:} (a multirun job's dir),
    ${gpt2lab.if_multirun:a,b}, ${gpt2lab.sweep_dir:} and ${gpt2lab.basename:path} (conf/logger): what no built-in
    resolver knows. Every entry point calls this before Hydra composes; calling it again is harmless."""
    OmegaConf.register_new_resolver("gpt2lab.run_name", new_run_name, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("gpt2lab.sweep_run_name", sweep_run_name, replace=True)
    OmegaConf.register_new_resolver("gpt2lab.if_multirun", if_multirun, replace=True)
    OmegaConf.register_new_resolver("gpt2lab.sweep_dir", sweep_dir, replace=True)
    OmegaConf.register_new_resolver("gpt2lab.basename", basename, replace=True)


class OnNonFinite(str, Enum):
    """train.on_nonfinite: what a step with a non-finite loss or gradient norm (never applied) does to the run."""

    stop = "stop"
    skip = "skip"


@dataclass
class TrainSchema:
    """conf/train.yaml's `train` node, checked by Hydra as it composes (a typo or a wrong type is an error
    before anything runs); the values live in the YAML."""

    total_batch_size: int | None = MISSING
    val_every_n_steps: int = MISSING
    lr_scale: float = MISSING
    grad_clip: float | None = MISSING
    on_nonfinite: OnNonFinite = MISSING
    z_loss: float = MISSING
    monitor_every_n_steps: int | None = MISSING


ConfigStore.instance().store(name="train_schema", node=TrainSchema, package="train")


@dataclass
class ModelSchema(GPTConfig):
    """conf/train.yaml's `model` node: GPTConfig's fields, defaults and types (its design switches default to
    GPT-2's choices), written once, in model.py: `model.position=rope` is a plain override, and a mistyped key or
    value type fails as Hydra composes. The sizes come from conf/model/*.yaml."""

    _target_: str = "gpt2lab.model.GPTConfig"


ConfigStore.instance().store(name="model_schema", node=ModelSchema, package="model")


# Types of the keys that, mistyped, would otherwise fail deep inside Lightning or torch. (Their groups
# take any further keys, e.g. +trainer.profiler=simple, so they are checked here rather than by a schema.)
@dataclass
class _TrainerTypes:
    max_steps: int = MISSING
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
    if cfg.model.parametrization == "mup" and "muon" in cfg.optim:
        # μP's lr rule (hidden matrices × 1/width) is for AdamW's per-entry update; Muon's orthogonalized update is
        # already scaled per matrix shape (optim.muon.adjust_lr_fn), and the two would compound
        raise ConfigError(
            "optim=muon with model.parametrization=mup: μP's hidden-matrix lr × mup_base_width/n_embd is AdamW's rule, "
            "and Muon scales its update by matrix shape itself; use optim=adamw with mup, or parametrization=sp"
        )
    if cfg.model.vocab_size < tokenizer.VOCAB_SIZE:  # the shards hold GPT-2 BPE ids: each needs an embedding row
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the {tokenizer.VOCAB_SIZE} ids of GPT-2's BPE, "
            f"which the data is tokenized with: set model.vocab_size={tokenizer.VOCAB_SIZE} (or more)"
        )
    if cfg.data.seq_len > cfg.model.block_size:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is longer than model.block_size={cfg.model.block_size}: "
            f"set data.seq_len<={cfg.model.block_size} or pick a model with a longer context"
        )
    try:
        check_attention(cfg.accelerator.attention)
    except ValueError as e:
        raise ConfigError(f"accelerator.{e}") from None
    if cfg.train.val_every_n_steps < 1:
        raise ConfigError(
            f"train.val_every_n_steps={cfg.train.val_every_n_steps}: must be >= 1 (it also validates at the last step)"
        )
    if cfg.train.monitor_every_n_steps is not None and cfg.train.monitor_every_n_steps < 1:
        raise ConfigError(
            f"train.monitor_every_n_steps={cfg.train.monitor_every_n_steps}: must be >= 1 (it also monitors the last "
            "step), or null to turn the stability instruments off"
        )
    if cfg.train.z_loss < 0:
        raise ConfigError(f"train.z_loss={cfg.train.z_loss}: must be >= 0 (e.g. 1e-4, PaLM's), or 0 for off")
    if cfg.trainer.max_steps < 1:
        raise ConfigError(f"trainer.max_steps={cfg.trainer.max_steps}: must be >= 1 optimizer steps")
    if str(cfg.accelerator.precision).startswith("16") and cfg.accelerator.name != "cuda":
        raise ConfigError(
            f"accelerator.precision={cfg.accelerator.precision} on {cfg.accelerator.name}: fp16 with a gradient scaler "
            "is for CUDA GPUs without bf16 (V100, T4); use bf16-mixed or 32-true"
        )
    if not cfg.train.lr_scale > 0:
        raise ConfigError(f"train.lr_scale={cfg.train.lr_scale}: must be positive (1.0: the optimizers' own lrs)")
    if not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr}: the learning rate must be positive, e.g. optim.lr=6e-4")
