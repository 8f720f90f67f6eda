"""Sampling: the key/value cache, determinism, prompts, checkpoints, the sample script and the samples callback."""

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CONF_DIR, ROOT, scalars
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt2lab.checkpoint import load_checkpoint, load_model, resolve_checkpoint
from gpt2lab.errors import CheckpointError, ConfigError
from gpt2lab.model import GPT, GPTConfig, KVCache, init_weights
from gpt2lab.sample import encode_prompt, generate, sample
from gpt2lab.train import train

SMALL_VOCAB = dict(block_size=32, vocab_size=101, n_layer=2, n_head=4, n_embd=64)
GPT2_VOCAB = dict(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)  # decodes with GPT-2's BPE


def random_model(**config) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config)).eval()
    init_weights(model, std=0.2, scale_residual=True)  # larger than GPT-2's 0.02: peaked, varied predictions
    return model


def draw(model: GPT, idx: torch.Tensor, n: int, seed: int | None = 0, **kwargs) -> torch.Tensor:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return generate(model, idx, n, generator=generator, **kwargs)


def test_kv_cache_logits_equal_a_full_forward_when_fed_in_chunks():
    model = random_model(**SMALL_VOCAB)
    idx = torch.randint(0, 101, (2, 30))
    cache = KVCache(model.config)
    with torch.no_grad():
        full, _ = model(idx)
        chunks = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in [(0, 7), (7, 8), (8, 20), (20, 30)]]
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (0.8, 5)])
def test_kv_cache_generation_gives_the_same_tokens_as_full_context_runs(temperature, top_k):
    model = random_model(**SMALL_VOCAB)
    prompt = torch.randint(0, 101, (3, 5))
    # 60 new tokens: past block_size=32, where the window slides and the cache is set aside
    cached = draw(model, prompt, 60, temperature=temperature, top_k=top_k, kv_cache=True)
    uncached = draw(model, prompt, 60, temperature=temperature, top_k=top_k, kv_cache=False)
    assert cached.shape == (3, 65)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 5:].tolist())) > 5  # really sampled: not one token repeated


def test_same_seed_gives_the_same_tokens_and_another_seed_others():
    model = random_model(**SMALL_VOCAB)
    prompt = torch.zeros(2, 1, dtype=torch.long)
    assert torch.equal(draw(model, prompt, 20, seed=7), draw(model, prompt, 20, seed=7))
    assert not torch.equal(draw(model, prompt, 20, seed=7), draw(model, prompt, 20, seed=8))


def test_sampling_leaves_the_global_rng_stream_untouched():
    model = random_model(**SMALL_VOCAB)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    draw(model, torch.zeros(2, 1, dtype=torch.long), 10)
    assert torch.equal(torch.rand(3), expected)


def test_top_k_1_is_greedy():
    model = random_model(**SMALL_VOCAB)
    prompt = torch.randint(0, 101, (2, 4))
    assert torch.equal(draw(model, prompt, 15, top_k=1), draw(model, prompt, 15, seed=None, temperature=0.0))


def test_generation_stops_at_the_stop_token_and_pads_finished_rows():
    model = random_model(**SMALL_VOCAB)
    prompt = torch.randint(0, 101, (2, 4))
    free = draw(model, prompt, 20, temperature=0.0)
    stop = free[0, 7].item()  # a token row 0 produces at its 4th step
    stopped = draw(model, prompt, 20, temperature=0.0, stop_token=stop)
    first_stop = [row[4:].tolist().index(stop) + 4 if stop in row[4:] else None for row in stopped]
    assert first_stop[0] <= 7
    for row, at in zip(stopped, first_stop):
        if at is not None:
            assert (row[at:] == stop).all()  # padded from its first stop token on
    assert stopped.size(1) < 24 or first_stop[1] is None


def test_padded_vocabulary_rows_are_never_sampled():
    model = random_model(**{**SMALL_VOCAB, "pad_vocab": True})
    assert model.config.padded_vocab_size == 128
    with torch.no_grad():
        model.lm_head.weight[101:] = 10 * model.lm_head.weight[:101].abs().max()  # make the padding likeliest
    out = draw(model, torch.zeros(4, 1, dtype=torch.long), 30, top_k=None)
    assert out.max().item() < 101


def test_bad_sampling_settings_are_clear_errors():
    model = random_model(**SMALL_VOCAB)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature=-1.0: must be >= 0"):
        draw(model, prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k=0: must be >= 1"):
        draw(model, prompt, 2, top_k=0)


def test_empty_prompt_starts_from_end_of_text():
    assert encode_prompt("", block_size=8) == [50256]
    texts = sample(random_model(**GPT2_VOCAB), "", num_samples=2, max_new_tokens=5, temperature=1.0, top_k=50,
                   seed=0, stop_at_eot=False)  # fmt: skip
    assert len(texts) == 2 and all(texts) and not any("<|endoftext|>" in t for t in texts)


def test_prompt_longer_than_the_context_keeps_its_last_block_size_tokens(caplog):
    prompt = " ".join(f"word{i}" for i in range(200))
    ids = encode_prompt(prompt, block_size=1000)
    assert len(ids) > 64
    with caplog.at_level(logging.WARNING, logger="gpt2lab.sample"):
        kept = encode_prompt(prompt, block_size=64)
    assert kept == ids[-64:]
    assert (
        f"the prompt is {len(ids)} tokens, longer than the context (block_size=64): keeping its last 64" in caplog.text
    )
    # and sampling from it works: the window slides past the context
    texts = sample(random_model(**GPT2_VOCAB), prompt, num_samples=1, max_new_tokens=3, temperature=1.0, top_k=50,
                   seed=0)  # fmt: skip
    assert texts[0].endswith(texts[0][-1]) and "word199" in texts[0]


def test_samples_start_with_the_prompt_and_are_reproducible():
    model = random_model(**GPT2_VOCAB)
    kwargs = dict(num_samples=3, max_new_tokens=10, temperature=1.0, top_k=50)
    a = sample(model, "ROMEO:", seed=1, **kwargs)
    assert all(t.startswith("ROMEO:") for t in a) and len(set(a)) == 3
    assert sample(model, "ROMEO:", seed=1, **kwargs) == a
    assert sample(model, "ROMEO:", seed=2, **kwargs) != a


def test_missing_checkpoint_and_wrong_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"ckpt=.*nowhere: no checkpoint there"):
        resolve_checkpoint(tmp_path / "nowhere", tmp_path)
    with pytest.raises(CheckpointError, match="ckpt=last: no run under .* has checkpoints/last.ckpt"):
        resolve_checkpoint("last", tmp_path)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.ckpt is not a training checkpoint: torch.load failed"):
        load_checkpoint(text)
    weights = tmp_path / "weights.pt"
    torch.save(GPT(GPTConfig(**SMALL_VOCAB)).state_dict(), weights)
    with pytest.raises(CheckpointError, match="weights.pt is not a gpt2lab training checkpoint: it lacks hyper_param"):
        load_checkpoint(weights)
    for ckpt, hf in [(None, None), ("last", "gpt2")]:
        with pytest.raises(ConfigError, match="pass exactly one of ckpt=.* or hf="):
            load_model(ckpt, hf, tmp_path)


def test_sample_script_reports_a_missing_checkpoint_in_one_line(tmp_path):
    cmd = [sys.executable, "scripts/sample.py", f"ckpt={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'log'}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and not done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: ckpt={tmp_path / 'nowhere'}: no checkpoint there")


def test_sample_config_composes_with_its_documented_defaults():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("sample", overrides=["ckpt=last"])
    assert cfg.top_k == 50 and cfg.kv_cache and cfg.stop_at_eot and cfg.ckpt == "last" and cfg.hf is None


# ---------------------------------------------------------------- end to end: a real tiny run and its checkpoint


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class RngProbe(L.Callback):
    """Writes a digest of the global RNG state, and whether the module is in train mode, at the start of
    every training batch to `path`."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with self.path.open("a") as f:
            f.write(f"{hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()} {pl_module.training}\n")


def tiny_train(run_dir: Path, data_dir: Path, *overrides: str) -> Path:
    """A 4-step model=tiny run; rng_states.txt in run_dir holds RngProbe's lines."""
    base = [f"paths.output_dir={run_dir}", f"paths.data_dir={data_dir}", "model=tiny", "accelerator=cpu", "trainer.max_steps=4",
            "data.seq_len=64", "train.val_every_n_steps=4",
            # the speed monitor's first start in a process measures the CPU's FLOP/s on torch.randn matrices
            # (then caches it): that would shift the RNG stream of whichever run of the two comes first
            "~callbacks.speed_monitor",
            f"+callbacks.rng_probe={{_target_:test_sample.RngProbe,path:'{run_dir / 'rng_states.txt'}'}}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*base, *overrides])
    train(cfg)
    return run_dir


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory, data_dir):
    """A tiny 4-step run with text samples every 3 steps (and so at the last); the samples callback's messages."""
    collect = Collect()
    logger = logging.getLogger("gpt2lab.callbacks.samples")
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    try:
        run_dir = tiny_train(
            tmp_path_factory.mktemp("runs") / "sampled", data_dir, "callbacks.text_samples.every_n_steps=3"
        )
    finally:
        logger.removeHandler(collect)
    return run_dir, collect.messages


@pytest.mark.slow
def test_text_samples_reach_tensorboard_and_the_log(sampled_run):
    run_dir, messages = sampled_run
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    assert "samples/text_summary" in events.Tags()["tensors"]
    logged = events.Tensors("samples/text_summary")
    assert [e.step for e in logged] == [3, 4]  # every 3 steps, and at the last
    markdown = logged[0].tensor_proto.string_val[0].decode()
    assert "**sample 0**" in markdown and "**sample 1**" in markdown
    assert [m.split(":")[0] for m in messages] == ["samples at step 3", "samples at step 4"]
    assert len(messages[0]) > len("samples at step 3:\n") + 20  # some text came out


@pytest.mark.slow
def test_text_samples_leave_the_training_losses_bitwise_unchanged(sampled_run, tmp_path, data_dir):
    run_dir, _ = sampled_run
    without = tiny_train(tmp_path / "plain", data_dir, "~callbacks.text_samples")
    with_samples = scalars(run_dir)["train/loss"]
    assert len(with_samples) == 4
    assert with_samples == scalars(without)["train/loss"]  # exact floats
    # sampling draws from its own generator: the global RNG state before every batch is that of the plain run
    states = (run_dir / "rng_states.txt").read_text()
    assert states.count("\n") == 4 and states == (without / "rng_states.txt").read_text()
    assert all(line.endswith(" True") for line in states.splitlines())  # train mode again after sampling


@pytest.mark.slow
def test_sample_script_prints_samples_from_a_trained_checkpoint(sampled_run, tmp_path):
    run_dir, _ = sampled_run
    cmd = [sys.executable, "scripts/sample.py", f"ckpt={run_dir}", "prompt=ROMEO:", "num_samples=2",
           "max_new_tokens=20", "seed=3", f"hydra.run.dir={tmp_path / 'sample'}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout[done.stdout.index("--- sample 0") :]  # after Hydra's log lines
    assert printed.count("--- sample ") == 2 and "\nROMEO:" in printed
    # the same text in-process, from the same seed, without the cache
    model = load_checkpoint(run_dir / "checkpoints" / "last.ckpt").eval()
    texts = sample(model, "ROMEO:", num_samples=2, max_new_tokens=20, temperature=1.0, top_k=50, seed=3, kv_cache=False)
    assert printed == "".join(f"--- sample {i}\n{t}\n" for i, t in enumerate(texts))
    # ckpt=last: the newest run under runs_dir
    assert resolve_checkpoint("last", run_dir.parent) == run_dir / "checkpoints" / "last.ckpt"
