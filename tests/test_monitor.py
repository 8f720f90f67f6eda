"""Per-optimizer-step monitoring: loss averaged over micro-batches, gradient norm before clipping, step time,
tokens/s and MFU, read back from real TensorBoard files of a real run."""

import time
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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_peak_comes_from_the_datasheet_table():
    peak = peak_flops(torch.device("cuda"), "bf16-mixed")
    name = torch.cuda.get_device_name()
    if any(chip in name for chip in ("A100", "H100", "H200")):
        assert peak >= 312e12  # A100's dense bf16; H100 / H200 more


class Probe(L.Callback):
    """Records, for the tests, what the model and the optimizer see: each micro-batch's loss (a forward hook on
    the GPT), the gradients' norm right before the update, and the wall time of each step's end; then sleeps
    there, as slow end-of-step work (samples, HellaSwag) would."""

    micro_losses: ClassVar[list[float]] = []  # class-level: Hydra instantiates the callback inside train()
    norms_at_update: ClassVar[list[float]] = []
    step_ends: ClassVar[list[float]] = []
    SLEEP = 0.3  # s

    def on_train_start(self, trainer, pl_module):
        def record(module, inputs, output):
            if torch.is_grad_enabled():  # training forwards, not validation
                Probe.micro_losses.append(float(output[1].detach()))

        pl_module.model.register_forward_hook(record)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        Probe.norms_at_update.append(float(torch.nn.utils.get_total_norm(grads)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.SLEEP)
        Probe.step_ends.append(time.time())


@pytest.fixture(scope="module")
def accumulating_run(tmp_path_factory, data_dir):
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir

    run_dir = tmp_path_factory.mktemp("run")
    overrides = [
        f"paths.output_dir={run_dir}", f"paths.data_dir={data_dir}", "model=tiny", "accelerator=cpu",
        "trainer.max_steps=4", "data.batch_size=2", "data.seq_len=64", "train.total_batch_size=384",  # 3 micro-batches
        "train.grad_clip=1e-3", "callbacks.speed_monitor.peak_flops=1e10", "~callbacks.text_samples",
        f"+callbacks.probe._target_={__name__}.Probe",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    for recorded in (Probe.micro_losses, Probe.norms_at_update, Probe.step_ends):
        recorded.clear()
    train(cfg)
    return scalars(run_dir), Probe


@pytest.mark.slow
def test_train_loss_is_the_mean_over_the_micro_batches_of_each_optimizer_step(accumulating_run):
    logged, probe = accumulating_run
    micro_losses = probe.micro_losses
    assert len(micro_losses) == 4 * 3
    expected = [sum(micro_losses[i : i + 3]) / 3 for i in range(0, 12, 3)]
    assert [s for s, _ in logged["train/loss"]] == [1, 2, 3, 4]  # one point per optimizer step
    assert [v for _, v in logged["train/loss"]] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_gradients_are_clipped_before_the_update_and_their_norm_logged_before_clipping(accumulating_run):
    logged, probe = accumulating_run
    norms = [v for _, v in logged["train/grad_norm"]]
    assert len(norms) == len(probe.norms_at_update) == 4
    assert all(n > 0.01 for n in norms)  # far above train.grad_clip=1e-3: measured before the clip
    assert all(n <= 1e-3 * 1.0001 for n in probe.norms_at_update)  # what the optimizer gets: clipped


@pytest.mark.slow
def test_step_time_tokens_per_sec_and_mfu_are_logged_per_optimizer_step(accumulating_run):
    logged, probe = accumulating_run
    for tag in ("perf/step_time", "perf/tokens_per_sec", "perf/mfu"):
        assert [s for s, _ in logged[tag]] == [1, 2, 3, 4], tag
    step_time = [v for _, v in logged["perf/step_time"]]
    tokens_per_sec = [v for _, v in logged["perf/tokens_per_sec"]]
    assert all(t > 0 for t in step_time)
    assert tokens_per_sec == pytest.approx([384 / t for t in step_time], rel=1e-5)  # 3 × 2 × 64 tokens a step
    tiny = GPT(GPTConfig(block_size=256, vocab_size=50257, n_layer=4, n_head=4, n_embd=128))
    mfu = [flops_per_token(tiny, 64) * r / 1e10 for r in tokens_per_sec]  # the configured peak_flops=1e10
    assert [v for _, v in logged["perf/mfu"]] == pytest.approx(mfu, rel=1e-5)
    # the step's own time: the probe's sleep at each step's end (as samples or HellaSwag) is not in it
    assert all(later - earlier > Probe.SLEEP for earlier, later in zip(probe.step_ends, probe.step_ends[1:]))
    assert all(t < Probe.SLEEP for t in step_time[2:]), step_time  # (the first two steps also warm up)
