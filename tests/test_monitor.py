"""Per-optimizer-step monitoring: loss averaged over micro-batches, gradient norm before clipping, step time,
tokens/s and MFU, read back from real TensorBoard files of a real run."""

from typing import ClassVar

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.throughput import measure_flops
from test_train import scalars
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt2lab.callbacks.monitor import flops_per_token, peak_flops
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.train import train


@pytest.mark.parametrize("seq_len", [64, 256])
def test_flops_per_token_formula_matches_torch_flop_counter(seq_len):
    model = GPT(GPTConfig(block_size=256, vocab_size=4096, n_layer=4, n_head=2, n_embd=128))
    x = torch.randint(0, 4096, (2, seq_len))
    # the math backend spells attention out as matmuls, which the counter sees (fused kernels it does not)
    with sdpa_kernel(SDPBackend.MATH):
        counted = measure_flops(model, lambda: model(x, x)[1], lambda loss: loss)
    # the formula also counts biases and LayerNorm gains as 6 FLOPs each; the counter only matmuls
    assert flops_per_token(model, seq_len) * x.numel() == pytest.approx(counted, rel=0.01)


def test_cpu_peak_is_measured_once_and_plausible():
    peak = peak_flops(torch.device("cpu"), "32-true")
    assert 1e9 < peak < 1e14  # a CPU core does GFLOP/s to a few TFLOP/s
    assert peak_flops(torch.device("cpu"), "32-true") == peak  # cached: measured once per process


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_peak_comes_from_the_datasheet_table():
    peak = peak_flops(torch.device("cuda"), "bf16-mixed")
    name = torch.cuda.get_device_name()
    if any(chip in name for chip in ("A100", "H100", "H200")):
        assert peak >= 312e12  # A100's dense bf16; H100 / H200 more


class MicroBatchLosses(L.Callback):
    """Records the loss each micro-batch's training_step returned, as Lightning hands it to callbacks."""

    seen: ClassVar[list[float]] = []  # class-level: Hydra instantiates the callback inside train()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Lightning hands over the loss it back-propagated: divided by the number of micro-batches
        MicroBatchLosses.seen.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)


@pytest.fixture(scope="module")
def accumulating_run(tmp_path_factory, data_dir):
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir

    run_dir = tmp_path_factory.mktemp("run")
    overrides = [
        f"paths.output_dir={run_dir}", f"paths.data_dir={data_dir}", "model=tiny", "accelerator=cpu",
        "trainer.max_steps=4", "data.batch_size=2", "data.seq_len=64", "train.total_batch_size=384",  # 3 micro-batches
        "trainer.gradient_clip_val=1e-3", "callbacks.speed_monitor.peak_flops=1e10",
        f"+callbacks.micro_batch_losses._target_={__name__}.MicroBatchLosses",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    MicroBatchLosses.seen.clear()
    train(cfg)
    return scalars(run_dir), list(MicroBatchLosses.seen)


@pytest.mark.slow
def test_train_loss_is_the_mean_over_the_micro_batches_of_each_optimizer_step(accumulating_run):
    logged, micro_losses = accumulating_run
    assert len(micro_losses) == 4 * 3
    expected = [sum(micro_losses[i : i + 3]) / 3 for i in range(0, 12, 3)]
    assert [s for s, _ in logged["train/loss"]] == [0, 1, 2, 3]  # one point per optimizer step
    assert [v for _, v in logged["train/loss"]] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_gradient_norm_is_logged_before_clipping(accumulating_run):
    logged, _ = accumulating_run
    norms = [v for _, v in logged["train/grad_norm"]]
    assert len(norms) == 4
    assert all(n > 0.01 for n in norms)  # far above gradient_clip_val=1e-3: measured before the clip


@pytest.mark.slow
def test_step_time_tokens_per_sec_and_mfu_are_logged_per_optimizer_step(accumulating_run):
    logged, _ = accumulating_run
    for tag in ("perf/step_time", "perf/tokens_per_sec", "perf/mfu"):
        assert [s for s, _ in logged[tag]] == [0, 1, 2, 3], tag
    step_time = [v for _, v in logged["perf/step_time"]]
    tokens_per_sec = [v for _, v in logged["perf/tokens_per_sec"]]
    assert all(t > 0 for t in step_time)
    assert tokens_per_sec == pytest.approx([384 / t for t in step_time], rel=1e-5)  # 3 × 2 × 64 tokens a step
    tiny = GPT(GPTConfig(block_size=256, vocab_size=50257, n_layer=4, n_head=4, n_embd=128))
    mfu = [flops_per_token(tiny, 64) * r / 1e10 for r in tokens_per_sec]  # the configured peak_flops=1e10
    assert [v for _, v in logged["perf/mfu"]] == pytest.approx(mfu, rel=1e-5)
