"""model.parametrization=mup (μP for Adam, Yang et al. 2022): the coordinate check (each layer's output keeps its size
as the width grows; under SP the logits grow), μP is SP exactly at the base width, the optimizer's lr groups, the
init, and the refusals (optim=muon, HF export, a bad value); a μP checkpoint resumes exactly and samples. SP stays
GPT-2's: test_model.py (Hugging Face logits) and test_train.py (the golden loss curve) guard it unchanged."""

import math
from functools import partial

import lightning as L
import pytest
import torch
from conftest import SHORT_RUN, assert_resumes_exactly, compose_train_in, scalars
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from gpt2lab.checkpoint import load_checkpoint, load_model
from gpt2lab.config import check_config
from gpt2lab.coord_check import coord_check, slopes
from gpt2lab.errors import CheckpointError, ConfigError
from gpt2lab.hf import export_hf
from gpt2lab.lit_module import GPTModule
from gpt2lab.model import GPT, GPTConfig, init_weights
from gpt2lab.sample import generate
from gpt2lab.train import train

WIDTHS = (64, 128, 256, 512)
HIDDEN = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@pytest.fixture(scope="module")
def coordinate_slopes() -> dict[tuple[str, int, str], float]:
    """The coordinate check at widths 64..512 (base 128): 2 layers, a 256-token vocabulary, 3 AdamW steps at lr 1e-2
    on random tokens, 3 seeds; {(parametrization, step, coordinate): log-log slope of RMS against width}."""
    V, T, B = 256, 16, 8
    generator = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, V, (B, T + 1), generator=generator) for _ in range(3)]
    batches = [(w[:, :-1], w[:, 1:]) for w in windows]
    probe = torch.randint(0, V, (B, T), generator=generator)
    config = GPTConfig(block_size=T, vocab_size=V, n_layer=2, n_head=4, n_embd=128)
    adamw = partial(torch.optim.AdamW, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)  # conf/optim/adamw
    rows = coord_check(config, WIDTHS, ("sp", "mup"), (0, 1, 2), batches, probe,
                       partial(init_weights, std=0.02, scale_residual=True), adamw)  # fmt: skip
    return slopes(rows)


def test_mup_keeps_every_coordinate_from_growing_with_width_and_sp_grows_the_logits(coordinate_slopes):
    """μP's init keeps the hidden coordinates Θ(1) and makes the logits and the attention logits Θ(width^-1/2): the
    readout's 1/m on a sum of n_embd terms, and q·k of independent q and k (∝ √hs) × 1/hs. At step 0 their slopes are
    0 and -0.5. After a step each coordinate is that init part plus a Θ(1) update, so its slope lies between -0.5 and
    0: at these widths the vanishing parts still weigh (the hidden outputs inherit them through the softmax), so the
    slope is not yet 0 (-0.1 to -0.6 here). What μP rules out is growth: a slope above 0.1. Under SP the logits grow,
    ∝ √width at init (std 0.02 over n_embd terms) and faster once trained."""
    mup = {(step, c): v for (p, step, c), v in coordinate_slopes.items() if p == "mup"}
    sp = {(step, c): v for (p, step, c), v in coordinate_slopes.items() if p == "sp"}
    vanishing_at_init = ("logits", "attn_logits")
    for (step, coordinate), slope in mup.items():
        if step == 0:
            expected = -0.5 if coordinate.startswith(vanishing_at_init) else 0.0
            assert abs(slope - expected) < 0.1, (coordinate, slope)
        else:
            assert -0.75 < slope < 0.1, (step, coordinate, slope)  # neither grows nor vanishes faster than init's part
    assert len(mup) == 4 * (1 + 2 * 3 + 1)  # steps 0..3: embeddings, 3 kinds × 2 layers, logits
    assert all(sp[step, "logits"] > 0.3 for step in range(4)), sp
    assert all(sp[step, f"attn_out/layer_{i}"] > 0.5 for step in range(4) for i in range(2)), sp


def tiny_module(compose_train, *overrides: str) -> GPTModule:
    module = instantiate(compose_train("model=tiny", "accelerator=cpu", "trainer.max_steps=100", *overrides).module)
    module.trainer = L.Trainer(max_steps=100, accelerator="cpu", logger=False, enable_checkpointing=False)
    return module


def test_mup_is_sp_exactly_at_the_base_width(compose_train):
    """model=tiny is 128 wide, mup_base_width's default: the same init, logits and first AdamW steps, bit for bit."""
    modules = {}
    for parametrization in ("sp", "mup"):
        torch.manual_seed(0)
        modules[parametrization] = tiny_module(compose_train, f"model.parametrization={parametrization}")
    idx = torch.randint(0, 50257, (2, 33))
    with torch.no_grad():
        assert torch.equal(modules["sp"].model(idx)[0], modules["mup"].model(idx)[0])
    losses = {}
    for parametrization, module in modules.items():
        optimizer = module.configure_optimizers()["optimizer"]  # mup: 3 groups, the hidden matrices' at lr × 1
        losses[parametrization] = []
        for _ in range(3):
            loss = module.model(idx[:, :-1], idx[:, 1:])[1]
            losses[parametrization].append(loss.item())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert losses["sp"] == losses["mup"] and len(set(losses["sp"])) == 3  # it trains, identically
    for (name, p), q in zip(modules["sp"].model.named_parameters(), modules["mup"].model.parameters()):
        assert torch.equal(p, q), name


def group_lrs(module: GPTModule) -> tuple[dict[str, tuple[float, float]], torch.optim.Optimizer]:
    """Each parameter's (initial lr, lr now) in the module's AdamW, by name; and the AdamW."""
    optimizer = module.configure_optimizers()["optimizer"]
    names = {id(p): name for name, p in module.model.named_parameters()}
    return {names[id(p)]: (g["initial_lr"], g["lr"]) for g in optimizer.param_groups for p in g["params"]}, optimizer


@pytest.mark.parametrize("lr_scale", [1.0, 0.5])
def test_mup_gives_the_hidden_matrices_lr_times_base_width_over_width_and_the_rest_the_base_lr(compose_train, lr_scale):
    overrides = ("model.n_embd=256", "model.tie_embeddings=false", f"train.lr_scale={lr_scale}")
    lrs, optimizer = group_lrs(tiny_module(compose_train, "model.parametrization=mup", *overrides))
    hidden = {f"transformer.h.{i}.{m}.weight" for i in range(4) for m in HIDDEN}
    assert hidden <= set(lrs) and "lm_head.weight" in lrs
    first = lr_scale / 10  # the schedule's first step: warmup (scheduler.warmup_steps=10) × train.lr_scale
    for name, (initial, now) in lrs.items():
        expected = 6e-4 * 128 / 256 if name in hidden else 6e-4  # optim.lr × base width / width
        assert initial == pytest.approx(expected, rel=1e-12) and now == pytest.approx(expected * first), name
    assert optimizer.param_groups[0]["initial_lr"] == 6e-4  # the group whose lr is logged
    sp, _ = group_lrs(tiny_module(compose_train, *overrides))  # sp: one lr, whatever the width
    assert {lr for lr, _ in sp.values()} == {6e-4} and set(sp) == set(lrs)


@pytest.mark.parametrize("init, residual", [("gpt2", (2 * 4) ** -0.5), ("unscaled", 1.0)])
def test_mup_initializes_hidden_matrices_with_std_times_width_mult_to_the_minus_half(compose_train, init, residual):
    torch.manual_seed(0)
    model = tiny_module(compose_train, "model.parametrization=mup", "model.n_embd=512", f"init={init}").model
    m = 512 / 128
    for name, p in model.named_parameters():
        if name.endswith(tuple(f"{h}.weight" for h in HIDDEN)):
            expected = 0.02 * m**-0.5 * (residual if "c_proj" in name else 1.0)
        elif name in ("transformer.wte.weight", "transformer.wpe.weight"):
            expected = 0.02  # the embeddings (and the tied readout) keep SP's init
        else:
            continue
        assert p.std().item() == pytest.approx(expected, rel=0.03), name


def test_optim_muon_with_mup_is_refused_before_training_starts(compose_train, tmp_path):
    cfg = compose_train("model=tiny", "optim=muon", "model.parametrization=mup", "trainer.max_steps=2", resolve=False)
    with pytest.raises(ConfigError, match="optim=muon with model.parametrization=mup: .*use optim=adamw"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    check_config(compose_train("model=tiny", "optim=muon"))  # each alone is fine
    check_config(compose_train("model=tiny", "model.parametrization=mup"))


@pytest.mark.parametrize(
    "override, message",
    [("model.parametrization=mu", "model.parametrization='mu': must be one of sp, mup"),
     ("model.mup_base_width=100", "model.mup_base_width=100: must be a positive integer divisible by model.n_head=8"),
     ("model.mup_base_width=0", "model.mup_base_width=0: must be a positive integer")],
)  # fmt: skip
def test_bad_mup_settings_are_config_errors_naming_the_key_and_the_choices(compose_train, override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_train("model=tiny", "model.n_head=8", "model.parametrization=mup", override))


def test_init_pretrained_refuses_mup_by_name(compose_train):
    cfg = compose_train("model=tiny", "model.parametrization=mup", "init=pretrained")
    with pytest.raises(InstantiationException, match="model.parametrization='mup' is not GPT-2's 'sp'") as error:
        instantiate(cfg.module)  # before looking for the weights (the hub: offline here)
    assert isinstance(error.value.__cause__, CheckpointError)


def test_checkpoint_without_the_parametrization_loads_as_sp(compose_train, tmp_path):
    module = tiny_module(compose_train)
    sizes = dict(block_size=256, vocab_size=50257, n_layer=4, n_head=4, n_embd=128, pad_vocab=False)
    old = {"hyper_parameters": {"model": sizes}, "gpt2lab_format": 2,
           "state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()}}  # fmt: skip
    torch.save(old, tmp_path / "old.ckpt")
    assert load_checkpoint(tmp_path / "old.ckpt").config.parametrization == "sp"
    module.on_load_checkpoint(old)  # resumes as the sp run it was
    with pytest.raises(CheckpointError, match="'parametrization': 'sp'.*this run builds.*'parametrization': 'mup'"):
        tiny_module(compose_train, "model.parametrization=mup").on_load_checkpoint(old)


def test_sp_with_a_mup_base_width_still_exports(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=4, n_embd=64, mup_base_width=32)).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(export_hf(model, tmp_path / "out")).eval()
    idx = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-4, rtol=1e-4)


# μP at twice the base width (m = 2): what a resumed run and the sampler must rebuild is not SP
MUP = ["model.parametrization=mup", "model.mup_base_width=64"]


def test_mup_checkpoint_resumes_exactly_samples_as_mup_and_is_refused_by_hf_export(tmp_path, data_dir):
    run_dir = assert_resumes_exactly(MUP, tmp_path, data_dir)
    model = load_model(str(run_dir), None, tmp_path).eval()  # as scripts/sample.py, HellaSwag and eval_lm load it
    assert model.config == instantiate(compose_train_in(tmp_path, data_dir, *SHORT_RUN, *MUP).model)
    assert (model.config.parametrization, model.config.width_mult) == ("mup", 2.0)
    assert model.transformer.h[0].attn.scale == pytest.approx(math.sqrt(64 / 4) / (128 / 4))  # √hs_base / hs
    idx = torch.tensor([[50256, 464, 1110]])
    sp = GPT(GPTConfig(**{**vars(model.config), "parametrization": "sp"})).eval()
    sp.load_state_dict(model.state_dict())
    with torch.no_grad():  # the same weights read as sp give other logits: the sampler runs the μP forward
        assert not torch.allclose(model(idx)[0], sp(idx)[0])
    draws = [generate(model, idx, 12, generator=torch.Generator().manual_seed(1), kv_cache=c) for c in (1, 0)]
    assert torch.equal(draws[0], draws[1])
    assert scalars(run_dir)["lr"][0][1] == pytest.approx(6e-4 / 10)  # the logged lr is the base lr's
    with pytest.raises(CheckpointError, match="cannot export to Hugging Face: model.parametrization='mup' is not"):
        export_hf(load_checkpoint(run_dir / "checkpoints" / "last.ckpt"), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
