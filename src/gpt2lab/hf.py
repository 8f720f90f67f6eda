"""Hugging Face GPT-2 weights ⇄ ours. The names are the same; HF's Conv1D layers store their weight as
(in, out), our nn.Linear as (out, in), so those four matrices are transposed on the way."""

import torch

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers versions


def state_dict_from_hf(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k: v.t() if k.endswith(CONV1D_WEIGHTS) else v
        for k, v in hf_state_dict.items()
        if not k.endswith(HF_BUFFERS)
    }


def state_dict_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.t() if k.endswith(CONV1D_WEIGHTS) else v for k, v in state_dict.items()}
