"""Hugging Face interop against transformers itself: import, export, fine-tuning init, and bad input."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt2lab import tokenizer
from gpt2lab.checkpoint import load_checkpoint
from gpt2lab.errors import CheckpointError
from gpt2lab.hf import export_hf, load_pretrained
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.sample import generate
from gpt2lab.train import train

transformers = pytest.importorskip("transformers")  # a dev dependency: installed by `.[dev]`

TINY_HF = dict(vocab_size=101, n_positions=32, n_embd=64, n_layer=2, n_head=4)
TINY_MODEL_HF = dict(vocab_size=50257, n_positions=256, n_embd=128, n_layer=4, n_head=4)  # conf/model/tiny.yaml


def hf_model(seed: int = 0, **config) -> "transformers.GPT2LMHeadModel":
    """A randomly initialized transformers GPT-2 (dropout off: eval and train mode agree)."""
    torch.manual_seed(seed)
    eot = tokenizer.EOT_ID if config["vocab_size"] > tokenizer.EOT_ID else 0
    hf_config = transformers.GPT2Config(**config, bos_token_id=eot, eos_token_id=eot, resid_pdrop=0.0,
                                        embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return transformers.GPT2LMHeadModel(hf_config).eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny GPT-2 written by save_pretrained, as from the hub."""
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf_model(**TINY_HF).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_tiny_dir(tmp_path_factory):
    """A random GPT-2 of model=tiny's size (GPT-2's vocabulary), to fine-tune."""
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    # wide init: its loss is far from the ln(50257) of a fresh model=tiny, so a run that starts from it shows
    hf_model(seed=1, **TINY_MODEL_HF, initializer_range=0.3).save_pretrained(path)
    return path


def hf_logits(path_or_model, idx: torch.Tensor) -> torch.Tensor:
    model = path_or_model
    if not isinstance(model, torch.nn.Module):
        model = transformers.GPT2LMHeadModel.from_pretrained(path_or_model).eval()
    with torch.no_grad():
        return model(idx).logits


def our_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(idx)[0]


def test_round_trip_hf_to_ours_to_hf_keeps_the_logits(hf_dir, tmp_path):
    idx = torch.randint(0, TINY_HF["vocab_size"], (2, TINY_HF["n_positions"]))
    expected = hf_logits(hf_dir, idx)
    ours = load_pretrained(hf_dir)
    assert ours.config == GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=4, n_embd=64)
    assert (our_logits(ours, idx) - expected).abs().max().item() <= 1e-4
    exported = export_hf(ours, tmp_path / "export")
    assert (hf_logits(exported, idx) - expected).abs().max().item() <= 1e-4


def test_export_trims_the_padded_vocabulary(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=4, n_embd=64, pad_vocab=True))
    assert ours.lm_head.weight.shape[0] == 128
    export_hf(ours, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["vocab_size"] == 101
    idx = torch.randint(0, 101, (2, 20))
    exported = hf_logits(tmp_path / "export", idx)
    assert exported.shape == (2, 20, 101)
    assert (exported - our_logits(ours, idx)[..., :101]).abs().max().item() <= 1e-4


def test_exported_model_generates_what_ours_generates(hf_dir, tmp_path):
    """transformers' own greedy generate (its own key/value cache) against ours, on the exported weights."""
    ours = load_pretrained(hf_dir).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(export_hf(ours, tmp_path / "export")).eval()
    prompt = torch.randint(0, 101, (2, 6))
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                           pad_token_id=0)  # fmt: skip
    assert torch.equal(generate(ours, prompt, 20, temperature=0.0), expected)


def test_sample_script_with_hf_samples_from_a_save_pretrained_dir(hf_dir, tmp_path):
    cmd = [sys.executable, "scripts/sample.py", f"hf={hf_dir}", "prompt=a", "num_samples=2", "max_new_tokens=5",
           "device=cpu", f"hydra.run.dir={tmp_path / 'sample'}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    texts = done.stdout[done.stdout.index("--- sample 0") :].split("--- sample ")[1:]
    assert len(texts) == 2 and all(t.split("\n", 1)[1].startswith("a") and len(t) > len("0\na\n") for t in texts)


def test_directory_that_is_not_a_gpt2_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"empty is not a GPT-2 checkpoint: it has no config.json"):
        load_pretrained((tmp_path / "empty").mkdir() or tmp_path / "empty")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match=r"config.json has model_type='bert', expected 'gpt2'"):
        load_pretrained(bert)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"no_weights is not a GPT-2 checkpoint: it has a config.json but no"):
        load_pretrained(no_weights)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(CheckpointError, match=r"unknown model 'gpt3': not a directory, nor one of .* gpt2, gpt2-"):
        load_pretrained("gpt3")


def test_gpt2_variant_we_do_not_implement_is_a_clear_error(tmp_path):
    hf = hf_model(**{**TINY_HF, "activation_function": "relu"})
    hf.save_pretrained(tmp_path / "relu")
    with pytest.raises(CheckpointError, match=r"GPT-2 variant with activation_function='relu'"):
        load_pretrained(tmp_path / "relu")


def test_init_pretrained_builds_the_module_with_the_hf_weights(compose_train, hf_tiny_dir):
    cfg = compose_train("model=tiny", "init=pretrained", f"init.name={hf_tiny_dir}")
    module = instantiate(cfg.module)
    idx = torch.randint(0, 50257, (1, 64))
    expected = hf_logits(hf_tiny_dir, idx)
    assert (our_logits(module.model, idx) - expected).abs().max().item() <= 1e-4


def test_init_pretrained_fills_padded_vocabulary_rows_with_the_mean_embedding(compose_train, hf_tiny_dir):
    cfg = compose_train("model=tiny", "model.pad_vocab=true", "init=pretrained", f"init.name={hf_tiny_dir}")
    model = instantiate(cfg.module).model
    hf_wte = transformers.GPT2LMHeadModel.from_pretrained(hf_tiny_dir).transformer.wte.weight
    wte = model.transformer.wte.weight
    assert wte.shape == (50304, 128)
    assert torch.equal(wte[:50257], hf_wte)
    torch.testing.assert_close(wte[50257:], hf_wte.mean(dim=0).expand(47, -1))


def test_init_pretrained_of_another_size_names_expected_and_found(compose_train, hf_dir):
    cfg = compose_train("model=tiny", "init=pretrained", f"init.name={hf_dir}")
    with pytest.raises(InstantiationException) as error:  # Hydra's wrapper around our CheckpointError
        instantiate(cfg.module)
    assert isinstance(error.value.__cause__, CheckpointError)
    message = str(error.value)
    assert "holds a model of another size than this run builds" in message
    assert "n_embd=64 (model.n_embd=128)" in message and "block_size=32 (model.block_size=256)" in message
    assert "transformer.wte.weight: expected (50257, 128), found (101, 64)" in message
    assert "Use the model=... it was trained with" in message


@pytest.mark.slow
def test_fine_tuning_starts_from_the_pretrained_weights(compose_train, hf_tiny_dir):
    """A real run with init=pretrained: its first train/loss is the HF model's loss on the first batch."""
    cfg = compose_train(
        "model=tiny",
        "accelerator=cpu",
        "init=pretrained",
        f"init.name={hf_tiny_dir}",
        "trainer.max_steps=2",
        "data.seq_len=64",
        "train.val_every_n_steps=2",
        "~callbacks.text_samples",
        "accelerator.precision=32-true",
    )  # fmt: skip  (as the fp32 reference below)
    train(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    (x,), (y,) = next(iter(datamodule.train_dataloader()))  # the first step: one micro-batch
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_tiny_dir).eval()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
    events = EventAccumulator(str(cfg.paths.output_dir + "/tb"))
    events.Reload()
    first_loss = events.Scalars("train/loss")[0].value
    assert abs(expected - math.log(50257)) > 1  # not what a fresh model would give
    assert first_loss == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_export_script_writes_what_transformers_loads(compose_train, tmp_path):
    """scripts/export_hf.py on a checkpoint of a real tiny run: transformers' logits are ours."""
    cfg = compose_train("model=tiny", "accelerator=cpu", "trainer.max_steps=1", "data.seq_len=64",
                        "train.val_every_n_steps=1", "~callbacks.text_samples")  # fmt: skip
    train(cfg)
    run_dir = cfg.paths.output_dir
    cmd = [sys.executable, "scripts/export_hf.py", f"ckpt={run_dir}", f"out={tmp_path / 'exported'}",
           f"hydra.run.dir={tmp_path / 'export_log'}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    idx = torch.randint(0, 50257, (2, 64))
    ours = load_checkpoint(f"{run_dir}/checkpoints/last.ckpt")
    assert (hf_logits(tmp_path / "exported", idx) - our_logits(ours, idx)).abs().max().item() <= 1e-4
