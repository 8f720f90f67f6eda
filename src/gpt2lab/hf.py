"""Hugging Face GPT-2 weights ⇄ ours. The names are the same; HF's Conv1D layers store their weight as
(in, out), our nn.Linear as (out, in), so those four matrices are transposed on the way.

Loading and export go through `transformers` itself (an optional dependency: `pip install -e ".[hf]"`), so
every format it reads (safetensors, .bin, sharded) works, and what we write is exactly what it loads.
"""

import json
import os
from dataclasses import fields
from pathlib import Path

import torch

from gpt2lab import tokenizer
from gpt2lab.checkpoint import load_weights, shape_mismatches
from gpt2lab.errors import CheckpointError
from gpt2lab.model import GPT, GPTConfig

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers versions
TIED = ("transformer.wte.weight", "lm_head.weight")  # one tensor (two with tie_embeddings=false), vocabulary rows first
# the hub's GPT-2 checkpoints and the conf/model option of the same size
HUB_MODELS = {"gpt2": "small", "gpt2-medium": "medium", "gpt2-large": "large", "gpt2-xl": "xl"}
ARCHITECTURE = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")  # the GPTConfig fields a checkpoint fixes
# design switches GPT2LMHeadModel has no place for: only GPT-2's own choice (GPTConfig's default) converts
GPT2_ONLY = ("position", "norm_placement", "norm", "qk_norm", "activation", "parametrization")


def state_dict_from_hf(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k: v.t() if k.endswith(CONV1D_WEIGHTS) else v for k, v in hf_state_dict.items() if not k.endswith(HF_BUFFERS)
    }


def state_dict_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.t() if k.endswith(CONV1D_WEIGHTS) else v for k, v in state_dict.items()}


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise CheckpointError('Hugging Face import/export needs transformers: pip install -e ".[hf]"') from e
    return transformers


def check_gpt2_source(name_or_dir: str | os.PathLike) -> None:
    """Fail with one clear message unless name_or_dir is a hub GPT-2 name or a GPT-2 save_pretrained dir."""
    path = Path(name_or_dir)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(
                f"{path} is not a GPT-2 checkpoint: it has no config.json (expected a directory written by "
                "GPT2LMHeadModel.save_pretrained or scripts/export_hf.py)"
            )
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type != "gpt2":
            raise CheckpointError(
                f"{config_file} has model_type={model_type!r}, expected 'gpt2': only GPT-2 checkpoints load "
                "into this model"
            )
        if not any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")) and not any(
            path.glob("*.index.json")
        ):
            raise CheckpointError(
                f"{path} is not a GPT-2 checkpoint: it has a config.json but no weights "
                "(model.safetensors or pytorch_model.bin)"
            )
    elif str(name_or_dir).removeprefix("openai-community/") not in HUB_MODELS:
        raise CheckpointError(
            f"unknown model {str(name_or_dir)!r}: not a directory, nor one of the hub's GPT-2 names "
            f"{', '.join(HUB_MODELS)}; pass one of those or a directory written by save_pretrained"
        )


def check_gpt2_architecture(config: GPTConfig, what: str) -> None:
    """Fail naming the switch unless config is an architecture GPT2LMHeadModel holds: GPT-2's own (the output
    layer may be untied: GPT2Config.tie_word_embeddings=false)."""
    gpt2 = {f.name: f.default for f in fields(GPTConfig)}
    for name in GPT2_ONLY:
        if getattr(config, name) != gpt2[name]:
            raise CheckpointError(
                f"{what}: model.{name}={getattr(config, name)!r} is not GPT-2's {gpt2[name]!r}, and Hugging Face's "
                "GPT2LMHeadModel cannot hold it; only a model with GPT-2's choices converts"
            )


def config_from_hf(hf_config, source: str) -> GPTConfig:
    """Our GPTConfig for a transformers GPT2Config, after checking it is the architecture we implement."""
    # (field, what ours computes): variants GPT2Config can express that this model does not
    ours = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "n_inner": (None, 4 * hf_config.n_embd),
        "layer_norm_epsilon": (1e-5,),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
    }
    for field, allowed in ours.items():
        if getattr(hf_config, field, allowed[0]) not in allowed:
            raise CheckpointError(
                f"{source} is a GPT-2 variant with {field}={getattr(hf_config, field)!r}; this model implements "
                f"{field}={allowed[0]!r} (GPT-2's own) only"
            )
    return GPTConfig(
        block_size=hf_config.n_positions,
        vocab_size=hf_config.vocab_size,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=hf_config.n_embd,
        tie_embeddings=getattr(hf_config, "tie_word_embeddings", True),
    )


def load_pretrained(name_or_dir: str | os.PathLike) -> GPT:
    """GPT-2 from the Hugging Face hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl; needs the network once) or
    from a local directory written by `save_pretrained` (offline)."""
    check_gpt2_source(name_or_dir)
    transformers = _transformers()
    try:
        hf = transformers.GPT2LMHeadModel.from_pretrained(str(name_or_dir))
    except OSError as e:  # hub unreachable, or a file transformers cannot read
        raise CheckpointError(
            f"could not load GPT-2 {str(name_or_dir)!r} ({e}); offline, pass a local save_pretrained directory"
        ) from e
    model = GPT(config_from_hf(hf.config, str(name_or_dir)))
    load_weights(model, state_dict_from_hf(hf.state_dict()), str(name_or_dir))
    return model


@torch.no_grad()
def init_from_pretrained(model: GPT, name: str) -> None:
    """`init=pretrained`: overwrite the freshly built model with GPT-2 weights, to fine-tune them. The
    model=... config must be the checkpoint's size; model.pad_vocab=true is allowed."""
    check_gpt2_architecture(model.config, f"init=pretrained (init.name={name!r})")
    pretrained = load_pretrained(name)
    found, expected = pretrained.config, model.config
    differ = [f"{k}={getattr(found, k)} (model.{k}={getattr(expected, k)})" for k in ARCHITECTURE
              if getattr(found, k) != getattr(expected, k)]  # fmt: skip
    if differ:
        hub_size = HUB_MODELS.get(str(name).removeprefix("openai-community/"))
        hint = f"model={hub_size}" if hub_size else "the model=... it was trained with"
        shapes = "; ".join(shape_mismatches(model, pretrained.state_dict())[:2])
        raise CheckpointError(
            f"init.name={name!r} holds a model of another size than this run builds: {', '.join(differ)}; "
            f"shapes {shapes}. Use {hint}"
        )
    if expected.tie_embeddings and not found.tie_embeddings:  # tied to untied is fine: both matrices start as wte
        raise CheckpointError(
            f"init.name={name!r} has an output layer of its own (tie_word_embeddings=false), which a tied model "
            "would drop: set model.tie_embeddings=false"
        )
    state_dict = pretrained.state_dict()
    padding = expected.padded_vocab_size - found.vocab_size
    if padding:
        # rows of tokens that never occur: the mean embedding puts their logits at the mean of the real
        # ones, far below the likely tokens (zero rows would score 0, above most of GPT-2's negative logits)
        for k in TIED:  # each from its own rows: two matrices with tie_embeddings=false
            state_dict[k] = torch.cat([state_dict[k], state_dict[k].mean(dim=0, keepdim=True).expand(padding, -1)])
    load_weights(model, state_dict, f"init.name={name!r}")


def export_hf(model: GPT, out_dir: str | os.PathLike) -> Path:
    """Write `model` as a directory that transformers.GPT2LMHeadModel.from_pretrained loads, with the padded
    vocabulary rows (model.pad_vocab) trimmed back to the tokenizer's vocab_size."""
    c = model.config
    check_gpt2_architecture(c, "cannot export to Hugging Face")
    transformers = _transformers()
    eot = tokenizer.EOT_ID if c.vocab_size > tokenizer.EOT_ID else None  # when the vocabulary is GPT-2's
    hf_config = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # we train without dropout
        bos_token_id=eot, eos_token_id=eot, architectures=["GPT2LMHeadModel"], tie_word_embeddings=c.tie_embeddings,
    )  # fmt: skip
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for k in TIED:
        state_dict[k] = state_dict[k][: c.vocab_size]
    hf = transformers.GPT2LMHeadModel(hf_config)
    hf.load_state_dict(state_dict_to_hf(state_dict))
    out_dir = Path(out_dir)
    hf.save_pretrained(out_dir)
    return out_dir
