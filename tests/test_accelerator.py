"""The accelerator: per-device defaults, CPU bf16 only where native (and then the loss curve of fp32),
glibc's allocator setting, and torch.compile leaving checkpoints as an uncompiled GPT's."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CPU_NATIVE_BF16, CPU_PRECISION, compose_train_in, scalars

from gpt2lab.accelerator import cpu_has_native_bf16, resolve_accelerator, tune_malloc
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.train import train

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(), reason="x86 Linux")
def test_cpu_bf16_is_the_default_exactly_where_the_cpu_has_bf16_instructions(compose_train):
    assert cpu_has_native_bf16() == CPU_NATIVE_BF16
    cfg = compose_train("accelerator=cpu")
    resolve_accelerator(cfg.accelerator)
    assert cfg.accelerator.precision == CPU_PRECISION
    assert cfg.accelerator.compile is False and cfg.accelerator.malloc.mmap_max == 0


@pytest.mark.slow
@pytest.mark.skipif(not CPU_NATIVE_BF16, reason="bf16 is the cpu default only on CPUs with AVX512-BF16 / AMX")
def test_default_cpu_bf16_follows_the_fp32_loss_curve(tmp_path, data_dir):
    """Where bf16 autocast is the CPU default, it must train like fp32: the same loss, step for step."""
    losses = {}
    for precision in ("bf16-mixed", "32-true"):
        run_dir = tmp_path / precision
        overrides = ["model=tiny", "accelerator=cpu", f"accelerator.precision={precision}", "trainer.max_steps=20",
                     "~callbacks.text_samples"]  # fmt: skip
        train(compose_train_in(run_dir, data_dir, *overrides))
        losses[precision] = [v for _, v in scalars(run_dir)["train/loss"]]
    bf16, fp32 = losses["bf16-mixed"], losses["32-true"]
    assert len(bf16) == len(fp32) == 20 and fp32[-1] < fp32[0] - 1  # it learned
    # measured on a 2-core AVX512-BF16 EPYC: at most 3e-4 apart over 30 steps (rounding bf16 matmuls
    # shifts each loss by ~1e-4); a precision bug (fp16 overflow, unscaled logits) moves it by >1e-2
    assert bf16 == pytest.approx(fp32, abs=2e-3)


def test_cuda_preset_is_bf16_tf32_compiled(compose_train):
    cfg = compose_train("accelerator=cuda")
    resolve_accelerator(cfg.accelerator)
    assert (cfg.accelerator.precision, cfg.accelerator.compile, cfg.accelerator.matmul_precision) == (
        "bf16-mixed", True, "high",
    )  # fmt: skip
    assert cfg.accelerator.malloc is None


def rss_after_freeing(malloc: str, in_thread: bool = False) -> tuple[int, int]:
    """In a fresh process: resident bytes while holding a 256 MB tensor, and after freeing it (allocated and
    freed in the main thread, or in another one)."""
    code = f"""
import threading, torch, resource
from gpt2lab.accelerator import tune_malloc
{malloc}
def rss(): return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
def measure():
    x = torch.ones(64 * 2**20)  # 256 MB
    held = rss()
    del x
    print(held, rss())
if {in_thread}:
    thread = threading.Thread(target=measure)
    thread.start()
    thread.join()
else:
    measure()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    held, freed = map(int, done.stdout.split())
    return held, freed


@needs_glibc
def test_tuned_malloc_keeps_freed_memory_for_reuse_where_glibc_gives_it_back():
    held, freed = rss_after_freeing("")
    assert freed < held - 200 * 2**20  # glibc's default: a large block is its own mmap, unmapped on free
    held, freed = rss_after_freeing("tune_malloc(mmap_max=0, trim_threshold=2**31 - 1)")
    assert freed > held - 10 * 2**20  # kept in the heap, ready for the next step's same-sized block


@needs_glibc
def test_tuned_malloc_holds_in_other_threads_too():
    """A thread allocates from an arena of its own, where mmap_max and trim_threshold do not apply;
    arena_max=1 puts every thread on the heap they govern."""
    held, freed = rss_after_freeing("tune_malloc(mmap_max=0, trim_threshold=2**31 - 1)", in_thread=True)
    assert freed < held - 200 * 2**20  # the thread's arena gave the block back to the OS
    held, freed = rss_after_freeing("tune_malloc(mmap_max=0, trim_threshold=2**31 - 1, arena_max=1)", in_thread=True)
    assert freed > held - 10 * 2**20


def test_bad_malloc_setting_names_the_key_and_the_fix():
    with pytest.raises(ValueError, match=r"accelerator.malloc.trim_threshold=4294967295: must be an integer"):
        tune_malloc(mmap_max=0, trim_threshold=4294967295)
    with pytest.raises(ValueError, match=r"accelerator.malloc.mmap_threshold: unknown; the settings are trim_thr"):
        tune_malloc(mmap_threshold=0)


@pytest.mark.slow
def test_compiled_module_checkpoints_clean_keys_that_load_into_an_uncompiled_gpt(tmp_path, compose_train):
    cfg = compose_train(
        "model=tiny", "model.n_layer=1", "accelerator=cpu", "accelerator.compile=true", "trainer.max_steps=2",
        "data.batch_size=2", "data.seq_len=32",
    )  # fmt: skip
    train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not [k for k in ckpt["state_dict"] if "_orig_mod" in k]
    model = GPT(GPTConfig(**ckpt["hyper_parameters"]["model"]))
    state_dict = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state_dict, strict=True)  # every key present, none extra
    assert torch.equal(model.lm_head.weight, ckpt["state_dict"]["model.lm_head.weight"])


@pytest.mark.cuda
@needs_cuda
@pytest.mark.slow
def test_cuda_fast_path_trains_compiled_in_bf16_and_checkpoints_clean_keys(compose_train):
    cfg = compose_train("model=tiny", "accelerator=cuda", "accelerator.devices=1", "trainer.max_steps=3")
    train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 and not [k for k in ckpt["state_dict"] if "_orig_mod" in k]
    assert torch.get_float32_matmul_precision() == "high"


@pytest.mark.slow
def test_bench_times_every_candidate_and_prints_the_ratios(tmp_path):
    cmd = [  # a data dir of its own: the bench prepares the data first, as on a fresh machine
        sys.executable, "scripts/bench.py", "model=tiny", "model.n_layer=1", "data.batch_size=2", "data.seq_len=32",
        "bench.rounds=2", "bench.steps=1", "bench.warmup_steps=1", "train.monitor_every_n_steps=2",
        f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    labels = ("(a) Lightning step", "(b) plain PyTorch loop", "(c) HF GPT2LMHeadModel", "(c0) HF as shipped", "(d) Li",
              "(e) Lightning step + instruments")  # fmt: skip
    for label in labels:
        row = next(line for line in lines if line.startswith(label))
        tokens_per_sec, step_ms, mfu = row.split()[-3:]
        assert float(tokens_per_sec.replace(",", "")) > 0 and float(step_ms) > 0 and 0 < float(mfu.rstrip("%")) <= 100
    ratios = next(line for line in lines if line.startswith("(a)/(b)"))
    assert [part.split("=")[0].strip() for part in ratios.split("   ")] == ["(a)/(b)", "(a)/(c)", "(d)/(c0)", "(e)/(a)"]
    assert any(line.startswith("stability instruments every 2 steps: ") for line in lines)
