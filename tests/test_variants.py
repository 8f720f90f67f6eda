"""The design switches (GPTConfig): each changes what it should and nothing else; every variant generates the same
tokens with the key/value cache as without it; combined variants train through train(), checkpoint, resume bit for
bit and load for sampling. GPT-2's defaults stay guarded by test_model.py (Hugging Face logits) and test_train.py
(the golden loss curve). optim=muon: test_muon.py, and its exact resume here (variant "modern")."""

import math

import pytest
import torch
from conftest import SHORT_RUN, assert_resumes_exactly, compose_train_in
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from torch import nn
from torch.nn import functional as F

from gpt2lab.checkpoint import load_checkpoint, load_model
from gpt2lab.config import check_config
from gpt2lab.errors import CheckpointError, ConfigError
from gpt2lab.hf import export_hf
from gpt2lab.model import GPT, GPTConfig, KVCache, Rotary, init_weights
from gpt2lab.sample import generate

SMALL = dict(block_size=32, vocab_size=101, n_layer=2, n_head=4, n_embd=64)
SWITCHES = {  # each switch set to its alternative to GPT-2's choice
    "position=sinusoidal": dict(position="sinusoidal"),
    "position=rope": dict(position="rope"),
    "norm_placement=post": dict(norm_placement="post"),
    "norm=rmsnorm": dict(norm="rmsnorm"),
    "qk_norm=true": dict(qk_norm=True),
    "activation=relu2": dict(activation="relu2"),
    "tie_embeddings=false": dict(tie_embeddings=False),
}


def build(std: float = 0.02, **switches) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, **switches)).eval()
    init_weights(model, std=std, scale_residual=True)
    return model


def block_outputs(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    outputs = []
    hooks = [block.register_forward_hook(lambda m, args, out: outputs.append(out)) for block in model.transformer.h]
    with torch.no_grad():
        model(idx)
    for hook in hooks:
        hook.remove()
    return outputs


def test_the_composed_model_is_gpt2_by_default_and_its_keys_are_gpt_configs(compose_train):
    cfg = compose_train("model=tiny")
    assert instantiate(cfg.model) == GPTConfig(block_size=256, vocab_size=50257, n_layer=4, n_head=4, n_embd=128)
    assert {k: cfg.model[k] for k in ("position", "norm_placement", "norm", "activation")} == {
        "position": "learned", "norm_placement": "pre", "norm": "layernorm", "activation": "gelu_tanh"
    }  # fmt: skip
    assert cfg.model.qk_norm is False and cfg.model.tie_embeddings is True
    assert compose_train("model.qk_norm=true").model.qk_norm is True  # a plain override: the schema has the key
    with pytest.raises(ConfigCompositionException, match="qk_norms"):  # a typo fails as Hydra composes
        compose_train("model.qk_norms=true")
    with pytest.raises(ConfigCompositionException, match="tie_embeddings"):  # so does a wrong type
        compose_train("model.tie_embeddings=maybe")


@pytest.mark.parametrize(
    "switch, missing, extra",
    [
        ("position=sinusoidal", ["transformer.wpe.weight"], []),
        ("position=rope", ["transformer.wpe.weight"], []),
        ("norm_placement=post", ["transformer.ln_f.bias", "transformer.ln_f.weight"], []),
        ("norm=rmsnorm", ["transformer.h.0.ln_1.bias", "transformer.h.0.ln_2.bias", "transformer.h.1.ln_1.bias",
                          "transformer.h.1.ln_2.bias", "transformer.ln_f.bias"], []),
        ("qk_norm=true", [], ["transformer.h.0.attn.k_norm.weight", "transformer.h.0.attn.q_norm.weight",
                              "transformer.h.1.attn.k_norm.weight", "transformer.h.1.attn.q_norm.weight"]),
        ("activation=relu2", [], []),
        ("tie_embeddings=false", [], []),
    ],
)  # fmt: skip
def test_each_switch_changes_only_its_own_tensors(switch, missing, extra):
    gpt2 = {k: v.shape for k, v in build().state_dict().items()}
    variant = {k: v.shape for k, v in build(**SWITCHES[switch]).state_dict().items()}
    assert sorted(gpt2.keys() - variant.keys()) == missing and sorted(variant.keys() - gpt2.keys()) == extra
    assert all(variant[k] == gpt2[k] for k in gpt2.keys() & variant.keys())
    assert all(variant[k] == (16,) for k in extra)  # qk_norm: a gain over one head's dimensions


# model=tiny: GPT-2 (7,259,008) less wpe (256 × 128), ln_f (2 × 128), 9 norm biases, plus 4 × 2 q/k gains of 32,
# plus a second 50257 × 128 matrix
TINY_PARAMS = {
    "gpt2": (7_259_008, 7_226_240),
    "position=sinusoidal": (7_226_240, 7_226_240),
    "position=rope": (7_226_240, 7_226_240),
    "norm_placement=post": (7_258_752, 7_225_984),
    "norm=rmsnorm": (7_257_856, 7_225_088),
    "qk_norm=true": (7_259_264, 7_226_496),
    "activation=relu2": (7_259_008, 7_226_240),
    "tie_embeddings=false": (13_691_904, 7_226_240),  # non-embedding: lm_head is a matmul, an untied wte a lookup
}


@pytest.mark.parametrize("variant", sorted(TINY_PARAMS))
def test_parameter_counts_of_model_tiny(compose_train, variant):
    switch = [] if variant == "gpt2" else [f"model.{variant}"]
    with torch.device("meta"):
        model = GPT(instantiate(compose_train("model=tiny", *switch).model))
    assert (model.num_params(), model.num_params(non_embedding=True)) == TINY_PARAMS[variant]


def test_sinusoidal_positions_are_the_original_transformers_fixed_encoding():
    model = build(position="sinusoidal")
    assert not any("wpe" in name for name, _ in model.named_parameters())
    assert "sinusoids" not in model.state_dict() and not model.sinusoids.requires_grad
    C = SMALL["n_embd"]
    pe = model.sinusoids * C**0.5  # added at 1/√C: the original's ratio to its √C-scaled token embeddings
    for pos, i in [(0, 0), (3, 0), (17, 5), (31, 31)]:  # PE(pos, 2i) = sin(pos / 10000^(2i/C)), 2i+1: cos
        assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / C)), abs=1e-6)
        assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / C)), abs=1e-6)
    idx = torch.randint(0, 101, (2, 20))
    inputs = []
    model.transformer.h[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    with torch.no_grad():
        model(idx)
    torch.testing.assert_close(inputs[0], model.transformer.wte(idx) + pe[:20] / C**0.5)


def test_rope_rotates_q_and_k_as_llama_does():
    """Against transformers' Llama rotary embedding (half-split), at positions 5..11 as after a cached prefix."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    llama = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=32,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 4, 7, 16)
    cos, sin = LlamaRotaryEmbedding(llama)(q, torch.arange(5, 12)[None])
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos, sin)
    rotary = Rotary(head_size=16, block_size=32)
    torch.testing.assert_close(rotary(q, start=5), expected_q)
    torch.testing.assert_close(rotary(k, start=5), expected_k)
    assert build(position="rope").transformer.h[0].attn.rotary is not None


def test_post_norm_normalizes_the_residual_stream_after_each_add():
    idx = torch.randint(0, 101, (2, 20))
    for out in block_outputs(build(norm_placement="post"), idx):  # LayerNorm's fresh gain 1 and bias 0
        torch.testing.assert_close(out.mean(-1), torch.zeros(2, 20), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 20), atol=1e-3, rtol=0)
    assert all(out.var(-1).mean() < 0.1 for out in block_outputs(build(), idx))  # pre: the stream is not normalized


def test_rmsnorm_scales_without_centering_and_has_no_bias():
    model = build(norm="rmsnorm")
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    assert len(norms) == 2 * SMALL["n_layer"] + 1 and all(isinstance(m, nn.RMSNorm) for m in norms)
    x = torch.randn(3, 64) + 2.0
    y = model.transformer.h[0].ln_1(x)
    torch.testing.assert_close(y, x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt())
    assert y.mean(-1).abs().min() > 0.5  # the mean stays


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    idx = torch.randint(0, 101, (2, 20))
    for qk_norm, blind in ((True, True), (False, False)):
        model = build(std=0.2, qk_norm=qk_norm)
        with torch.no_grad():
            before = model(idx)[0]
            for block in model.transformer.h:  # queries and keys × 10: the first 2C rows of c_attn
                block.attn.c_attn.weight[:128] *= 10
                block.attn.c_attn.bias[:128] *= 10
            after = model(idx)[0]
        assert torch.allclose(after, before, atol=1e-4) == blind


def test_relu2_is_relu_squared():
    mlp = build(activation="relu2").transformer.h[0].mlp
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2))
        assert not torch.allclose(mlp(x), mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh")))


def test_untied_output_layer_is_a_second_matrix_initialized_like_the_embedding():
    model = build(tie_embeddings=False)
    wte, lm_head = model.transformer.wte.weight, model.lm_head.weight
    assert wte is not lm_head and not torch.equal(wte, lm_head)
    assert {"transformer.wte.weight", "lm_head.weight"} <= {name for name, _ in model.named_parameters()}
    assert wte.std().item() == pytest.approx(0.02, rel=0.05) and lm_head.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize(
    "override, message",
    [("model.position=alibi", "model.position='alibi': must be one of learned, sinusoidal, rope"),
     ("model.activation=gelu", "model.activation='gelu': must be one of gelu_tanh, relu2"),
     ("model.n_head=128", "model.position=rope needs an even n_embd / n_head, got 1")],
)  # fmt: skip
def test_bad_switch_value_is_a_config_error_naming_key_value_and_choices(compose_train, override, message):
    rope = [] if "alibi" in override else ["model.position=rope"]
    with pytest.raises(ConfigError, match=message):
        check_config(compose_train("model=tiny", *rope, override))


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_every_variant_generates_the_same_tokens_with_the_kv_cache(switch):
    model = build(std=0.2, **SWITCHES[switch])  # wide init: peaked, varied predictions
    idx = torch.randint(0, 101, (2, 30))
    cache = KVCache(model.config)
    with torch.no_grad():
        full = model(idx)[0]
        chunks = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in [(0, 7), (7, 8), (8, 30)]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)
    prompt = torch.randint(0, 101, (3, 5))
    # 40 new tokens: past block_size=32, where the window slides and the cache is set aside
    draws = [generate(model, prompt, 40, generator=torch.Generator().manual_seed(0), kv_cache=c) for c in (True, False)]
    assert torch.equal(draws[0], draws[1]) and len(set(draws[0][0, 5:].tolist())) > 5


def test_export_refuses_a_variant_gpt2lmheadmodel_cannot_hold_naming_the_switch(tmp_path):
    with pytest.raises(CheckpointError, match="model.activation='relu2' is not GPT-2's 'gelu_tanh'.*GPT2LMHeadModel"):
        export_hf(build(activation="relu2"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_untied_model_exports_to_what_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = build(tie_embeddings=False)
    hf = transformers.GPT2LMHeadModel.from_pretrained(export_hf(model, tmp_path / "out")).eval()
    assert hf.config.tie_word_embeddings is False and torch.equal(hf.lm_head.weight, model.lm_head.weight)
    idx = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-4, rtol=1e-4)


def test_checkpoint_written_before_the_switches_existed_still_loads_and_resumes(compose_train, tmp_path):
    module = instantiate(compose_train("model=tiny").module)
    sizes = dict(block_size=256, vocab_size=50257, n_layer=4, n_head=4, n_embd=128, pad_vocab=False)
    old = {"hyper_parameters": {"model": sizes}, "gpt2lab_format": 2,
           "state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()}}  # fmt: skip
    torch.save(old, tmp_path / "old.ckpt")
    assert load_checkpoint(tmp_path / "old.ckpt").config == GPTConfig(**sizes)  # the defaults fill in
    module.on_load_checkpoint(old)  # the same model to resume: no error
    with pytest.raises(CheckpointError, match="'position': 'learned'.*this run builds.*'position': 'rope'"):
        instantiate(compose_train("model=tiny", "model.position=rope").module).on_load_checkpoint(old)


# combined variants for the end-to-end runs, each switch in one: modded-nanogpt's levers (with optim=muon: its exact
# resume), and the original transformer's choices
VARIANTS = {
    "modern": [
        "model.position=rope",
        "model.norm=rmsnorm",
        "model.qk_norm=true",
        "model.activation=relu2",
        "optim=muon",
    ],
    "original": ["model.position=sinusoidal", "model.norm_placement=post", "model.tie_embeddings=false"],
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_trains_resumes_exactly_and_samples_the_same_with_the_cache(tmp_path, data_dir, variant):
    run_dir = assert_resumes_exactly(VARIANTS[variant], tmp_path, data_dir)
    model = load_model(str(run_dir), None, tmp_path).eval()  # as scripts/sample.py and HellaSwag load it
    assert model.config == instantiate(compose_train_in(tmp_path, data_dir, *SHORT_RUN, *VARIANTS[variant]).model)
    assert model.config != GPTConfig(**{k: getattr(model.config, k) for k in SMALL})  # not GPT-2's
    prompt = torch.tensor([[50256, 464, 1110]])
    draws = [generate(model, prompt, 12, generator=torch.Generator().manual_seed(1), kv_cache=c) for c in (1, 0)]
    assert torch.equal(draws[0], draws[1])
