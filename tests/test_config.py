from pathlib import Path

import pytest
from conftest import CONF_DIR, CPU_PRECISION, HOST_DEVICE
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gpt2lab.accelerator import resolve_accelerator
from gpt2lab.model import GPTConfig
from gpt2lab.train import train

# the groups of train's config (lm_eval_tasks is eval_lm's: tests/test_eval_lm.py builds each of its options)
GROUPS = sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir() and d.name not in ("hydra", "lm_eval_tasks"))
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF_DIR / g).glob("*.yaml"))]


def test_every_group_has_options():
    assert {"model", "init", "accelerator", "data", "optim", "scheduler", "trainer", "logger", "callbacks"} <= set(
        GROUPS
    )
    assert {o for g, o in OPTIONS if g == "model"} == {"tiny", "small", "medium", "large", "xl"}
    assert {o for g, o in OPTIONS if g == "accelerator"} == {"auto", "cpu", "cuda", "mps"}


# `# @package _global_` groups: they set keys all over the config, not a node of their own
GLOBAL_GROUPS = {"experiment", "hparams_search", "ablation"}
# options that take values from another choice, composed with it
COMPOSED_WITH = {("trainer", "slurm"): ["hydra/launcher=slurm"]}


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_of_every_group_composes_and_resolves(compose_train, hydra_runtime, group, option):
    cfg = compose_train(f"{group}={option}", *COMPOSED_WITH.get((group, option), []), return_hydra_config=True)
    hydra_runtime.set_config(cfg)  # ${hydra:...} values resolve
    resolved = {
        k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for k in cfg
        if k != "hydra"
    }  # fmt: skip  (every interpolation has a value)
    assert group in GLOBAL_GROUPS or resolved[group] is not None
    assert isinstance(instantiate(cfg.model), GPTConfig)
    assert callable(instantiate(cfg.init)) and callable(instantiate(cfg.optim)) and callable(instantiate(cfg.scheduler))


def test_auto_accelerator_picks_this_machines_device_with_its_defaults(compose_train):
    cfg = compose_train(resolve=False)  # accelerator=auto: worked out when the run starts, not as Hydra composes
    assert {cfg.accelerator[key] for key in ("name", "precision", "compile", "attention", "malloc")} == {"auto"}
    resolve_accelerator(cfg.accelerator)
    assert cfg.accelerator.name == HOST_DEVICE
    chosen = compose_train(f"accelerator={HOST_DEVICE}")  # the same settings as naming that device
    settings = ("precision", "compile", "attention", "matmul_precision", "malloc")
    assert {k: cfg.accelerator[k] for k in settings} == {k: chosen.accelerator[k] for k in settings}
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == (HOST_DEVICE, chosen.accelerator.precision)


@pytest.mark.parametrize(
    "device, precision, compile, attention",
    [
        ("cuda", "bf16-mixed", True, "sdpa"),
        ("mps", "32-true", False, "sdpa"),
        ("cpu", CPU_PRECISION, False, "eager" if CPU_PRECISION == "bf16-mixed" else "sdpa"),
    ],
)
def test_each_accelerator_sets_the_trainer_and_a_precision_that_works_there(
    compose_train, device, precision, compile, attention
):
    cfg = compose_train(f"accelerator={device}")
    resolve_accelerator(cfg.accelerator)
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.module.compile) == (device, precision, compile)
    assert cfg.module.attention == attention


@pytest.mark.parametrize("precision, attention", [("bf16-mixed", "eager"), ("32-true", "sdpa")])
def test_cpu_attention_follows_the_precision_chosen(compose_train, precision, attention):
    """PyTorch's CPU flash kernel is the faster in fp32 and the slower in bf16 (README, Performance)."""
    cfg = compose_train("accelerator=cpu", f"accelerator.precision={precision}")
    resolve_accelerator(cfg.accelerator)
    assert cfg.accelerator.attention == attention
    module = instantiate(cfg.module)
    assert {block.attn.attention for block in module.model.transformer.h} == {attention}
    assert "attention" not in module.hparams["model"]  # how to compute: a checkpoint loads on any device


def test_accelerator_settings_can_be_overridden(compose_train):
    cfg = compose_train("accelerator=cuda", "accelerator.compile=false", "accelerator.precision=16-mixed")
    resolve_accelerator(cfg.accelerator)
    assert (cfg.trainer.precision, cfg.module.compile) == ("16-mixed", False)


def test_unknown_group_option_lists_the_choices(compose_train):
    with pytest.raises(ConfigCompositionException, match="Could not find 'model/smal'") as e:
        compose_train("model=smal")
    assert "small" in str(e.value) and "tiny" in str(e.value)


def test_unknown_key_is_refused(compose_train):
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        compose_train("trainer.max_stepz=5")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=tiny", "data.seq_len=512"], "data.seq_len=512 is longer than model.block_size=256"),
        (["optim.lr=0"], "optim.lr=0"),
        (["model.vocab_size=50000"], "model.vocab_size=50000 is smaller than the 50257 ids of GPT-2's BPE"),
        (["model=tiny", "model.n_head=3"], "n_embd=128 is not divisible by model.n_head=3"),
        (["model=tiny", "train.total_batch_size=1000"], "train.total_batch_size=1000 is not divisible by"),
        (["trainer.max_steps=abc"], "trainer.max_steps='abc': expected an integer"),
        (["data.batch_size=1.5"], "data.batch_size=1.5: expected an integer"),
        (["optim.lr=fast"], "optim.lr='fast': expected a number"),
        (["accelerator.attention=flash"], "accelerator.attention='flash': must be one of sdpa, eager"),
        (["accelerator.name=tpu"], "accelerator.name='tpu': must be auto, cuda, mps or cpu"),
    ],
)
def test_inconsistent_config_fails_before_training_starts(compose_train, overrides, message, tmp_path):
    cfg = compose_train("trainer.max_steps=2", *overrides, resolve=False)  # train() resolves `auto`
    with pytest.raises((ValueError, InstantiationException), match=message):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()
