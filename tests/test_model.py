import math

import pytest
import torch
from hydra.utils import instantiate

from gpt2lab.hf import state_dict_from_hf
from gpt2lab.model import GPT, GPTConfig, KVCache, init_weights

TINY = dict(block_size=32, vocab_size=101, n_layer=2, n_head=4, n_embd=64)


def make_model(compose_train, *overrides: str) -> GPT:
    """A model built and initialized from the real configs."""
    cfg = compose_train(*overrides)
    model = GPT(instantiate(cfg.model))
    instantiate(cfg.init)(model)
    return model


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 101, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 101) and loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)


def test_changing_later_tokens_leaves_earlier_logits_unchanged():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.randint(0, 101, (2, 20))
    t = 11
    changed = idx.clone()
    changed[:, t + 1 :] = torch.randint(0, 101, (2, 20 - t - 1))
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_initial_loss_is_near_uniform_over_the_vocabulary(compose_train, size):
    torch.manual_seed(0)
    model = make_model(compose_train, f"model={size}")
    idx = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        _, loss = model(idx, torch.roll(idx, -1, dims=1))
    assert abs(loss.item() - math.log(50257)) < 0.3, loss.item()


def test_lm_head_and_token_embedding_are_one_parameter():
    model = GPT(GPTConfig(**TINY))
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # counted once, as transformer.wte.weight


@pytest.mark.parametrize("init, expected_factor", [("gpt2", (2 * 12) ** -0.5), ("unscaled", 1.0)])
def test_residual_projection_std_follows_the_init_config(compose_train, init, expected_factor):
    torch.manual_seed(0)
    model = make_model(compose_train, "model=small", f"init={init}")
    for block in model.transformer.h:
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            assert proj.weight.std().item() == pytest.approx(0.02 * expected_factor, rel=0.02)
            assert proj.bias.abs().max().item() == 0
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)


# GPT-2's published parameter counts (the tied embedding counted once), as Hugging Face reports them
PUBLISHED_PARAMS = {"small": 124_439_808, "medium": 354_823_168, "large": 774_030_080, "xl": 1_557_611_200}


@pytest.mark.parametrize("size", sorted(PUBLISHED_PARAMS))
def test_model_sizes_have_gpt2s_parameter_counts(compose_train, size):
    cfg = compose_train(f"model={size}")
    with torch.device("meta"):
        model = GPT(instantiate(cfg.model))
    assert model.num_params() == PUBLISHED_PARAMS[size]


def test_padded_vocab_rounds_up_to_a_multiple_of_64(compose_train):
    config = instantiate(compose_train("model=small", "model.pad_vocab=true").model)
    assert config.padded_vocab_size == 50304
    with torch.device("meta"):
        model = GPT(config)
    assert model.lm_head.weight.shape == (50304, 768)


def test_logits_equal_hugging_face_gpt2_with_the_same_weights():
    transformers = pytest.importorskip("transformers")  # a dev dependency: installed by `.[dev]`
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=TINY["vocab_size"], n_positions=TINY["block_size"], n_embd=TINY["n_embd"],
        n_layer=TINY["n_layer"], n_head=TINY["n_head"], activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours = GPT(GPTConfig(**TINY)).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict()))
    idx = torch.randint(0, TINY["vocab_size"], (2, TINY["block_size"]))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    assert (logits - expected).abs().max().item() <= 1e-4


def eager_and_sdpa_models() -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    sdpa = GPT(GPTConfig(**TINY), attention="sdpa")
    eager = GPT(GPTConfig(**TINY), attention="eager")
    eager.load_state_dict(sdpa.state_dict())
    return sdpa, eager


def test_eager_attention_gives_sdpas_logits_and_gradients():
    sdpa, eager = eager_and_sdpa_models()
    idx = torch.randint(0, TINY["vocab_size"], (2, TINY["block_size"]))
    for model in (sdpa, eager):
        model(idx, idx.roll(-1, dims=1))[1].backward()
    torch.testing.assert_close(eager(idx)[0], sdpa(idx)[0], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(sdpa.named_parameters(), eager.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_eager_attention_gives_sdpas_logits_with_a_kv_cache():
    """Generation: a cached prefix, then a few positions at once (the mask offset by the prefix)."""
    sdpa, eager = eager_and_sdpa_models()
    idx = torch.randint(0, TINY["vocab_size"], (2, 12))
    with torch.no_grad():
        logits = {}
        for name, model in (("sdpa", sdpa), ("eager", eager)):
            cache = KVCache(model.config)
            model(idx[:, :7], kv_cache=cache)
            logits[name] = model(idx[:, 7:], kv_cache=cache)[0]
        full = sdpa(idx)[0][:, 7:]
    torch.testing.assert_close(logits["eager"], full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["sdpa"], full, atol=1e-5, rtol=1e-5)


def test_eager_attention_in_bf16_autocast_gives_sdpas_loss():
    sdpa, eager = eager_and_sdpa_models()
    idx = torch.randint(0, TINY["vocab_size"], (4, TINY["block_size"]))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        losses = [model(idx, idx.roll(-1, dims=1))[1].item() for model in (sdpa, eager)]
    assert losses[1] == pytest.approx(losses[0], abs=2e-2)  # bf16 rounds each to ~3 significant digits


def test_unknown_attention_is_a_clear_error():
    with pytest.raises(ValueError, match="attention='flash': must be one of sdpa, eager"):
        GPT(GPTConfig(**TINY), attention="flash")


def test_sequence_longer_than_block_size_is_a_clear_error():
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match="length 33 is longer than the context, block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_n_embd_not_divisible_by_n_head_is_a_clear_error():
    with pytest.raises(ValueError, match="n_embd=100 is not divisible by model.n_head=3"):
        GPTConfig(**{**TINY, "n_embd": 100, "n_head": 3})


def test_init_weights_zeroes_biases_and_resets_layernorm():
    model = GPT(GPTConfig(**TINY))
    init_weights(model, std=0.02, scale_residual=True)
    ln = model.transformer.h[0].ln_1
    assert torch.equal(ln.weight, torch.ones_like(ln.weight)) and torch.equal(ln.bias, torch.zeros_like(ln.bias))
    assert model.transformer.h[1].mlp.c_fc.bias.abs().max().item() == 0


def test_the_loss_takes_targets_that_are_a_strided_slice_of_the_sequence():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    seq = torch.randint(0, 50, (2, 9))
    assert not seq[:, 1:].is_contiguous()
    _, loss = model(seq[:, :-1], seq[:, 1:])  # x and its shifted labels, both views of one tensor
    _, expected = model(seq[:, :-1], seq[:, 1:].contiguous())
    assert torch.equal(loss, expected)
