"""Per-optimizer-step monitoring: loss averaged over micro-batches, gradient norm before clipping, step time,
tokens/s and MFU, read back from real TensorBoard files of a real run."""

import time
from typing import ClassVar

import lightning as L
import pytest
import torch
from conftest import scalars
from lightning.fabric.utilities.throughput import measure_flops
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt2lab.callbacks import monitor
from gpt2lab.callbacks.monitor import peak_flops
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
    assert model.flops_per_token(seq_len) * x.numel() == pytest.approx(counted, rel=0.01)


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
        assert 312e12 <= peak <= 989e12, (name, peak)  # dense: A100's to H100 SXM's / H200's


@pytest.mark.parametrize(
    ("name", "peak"),
    [("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA H100 80GB HBM3", 989e12),
     ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
     ("NVIDIA GeForce RTX 4090", 165.2e12), ("Tesla T4", None)],
)  # fmt: skip
def test_gpu_bf16_peaks_are_the_dense_datasheet_figures_for_the_names_torch_reports(name, peak):
    """torch names the H200 "NVIDIA H200", which Lightning's table misses; its H200 figure is with sparsity."""
    assert monitor.gpu_bf16_peak(name) == peak


class Probe(L.Callback):
    """Records, for the tests, what the model and the optimizer see: each micro-batch's loss (a forward hook on
    the GPT), the gradients' norm right before the update, and when each train batch (one optimizer step) starts
    and ends; then sleeps at its end, as slow end-of-step work (samples, HellaSwag) would."""

    micro_losses: ClassVar[list[float]] = []  # class-level: Hydra instantiates the callback inside train()
    norms_at_update: ClassVar[list[float]] = []
    batch_starts: ClassVar[list[float]] = []
    batch_ends: ClassVar[list[float]] = []
    SLEEP = 0.3  # s

    def on_train_start(self, trainer, pl_module):
        def record(module, inputs, output):
            if torch.is_grad_enabled():  # training forwards, not validation
                Probe.micro_losses.append(float(output[1].detach()))

        pl_module.model.register_forward_hook(record)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        Probe.norms_at_update.append(float(torch.nn.utils.get_total_norm(grads)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        Probe.batch_starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        Probe.batch_ends.append(time.perf_counter())
        time.sleep(self.SLEEP)


@pytest.fixture(scope="module")
def accumulating_run(tmp_path_factory, data_dir):
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir

    run_dir = tmp_path_factory.mktemp("run")
    overrides = [
        f"paths.output_dir={run_dir}", f"paths.data_dir={data_dir}", "model=tiny", "accelerator=cpu",
        "accelerator.precision=32-true",
        "trainer.max_steps=4", "data.batch_size=2", "data.seq_len=64", "train.total_batch_size=384",  # 3 micro-batches
        "train.grad_clip=1e-3", "callbacks.speed_monitor.peak_flops=1e10", "~callbacks.text_samples",
        f"+callbacks.probe._target_={__name__}.Probe",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    for recorded in (Probe.micro_losses, Probe.norms_at_update, Probe.batch_starts, Probe.batch_ends):
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
    mfu = [tiny.flops_per_token(64) * r / 1e10 for r in tokens_per_sec]  # the configured peak_flops=1e10
    assert [v for _, v in logged["perf/mfu"]] == pytest.approx(mfu, rel=1e-5)
    # the step's own time: it lies inside its train batch (from the batch's start to its end, where the callbacks
    # run), so the probe's sleep after each step's end (as samples or HellaSwag) is never in it, however busy the
    # machine; the sleep is in the interval between one step's end and the next one's start
    windows = [end - start for start, end in zip(probe.batch_starts, probe.batch_ends)]
    assert len(windows) == 4 and all(0 < t <= window for t, window in zip(step_time, windows)), (step_time, windows)
    assert all(start - end >= Probe.SLEEP for end, start in zip(probe.batch_ends, probe.batch_starts[1:]))


def test_mfu_stays_at_most_1_when_the_cpu_peak_was_timed_on_a_busy_machine(tmp_path, data_dir, monkeypatch):
    # as if the start-up matmul had run beside other work: a peak far below what the model itself then reaches
    monkeypatch.setattr(monitor, "_measured_peaks", {("cpu", torch.float32): 1e6})
    from conftest import compose_train_in

    overrides = ["model=tiny", "model.n_layer=1", "accelerator=cpu", "accelerator.precision=32-true",
                 "trainer.max_steps=3", "data.batch_size=2", "data.seq_len=32", "data.val_batches=1",
                 "~callbacks.text_samples"]  # fmt: skip
    train(compose_train_in(tmp_path, data_dir, *overrides))
    logged = scalars(tmp_path)
    mfu, tokens_per_sec = [v for _, v in logged["perf/mfu"]], [v for _, v in logged["perf/tokens_per_sec"]]
    assert len(mfu) == 3 and all(0 < m <= 1 for m in mfu), mfu
    # the device showed it does at least what the model did: the process's peak was raised to that
    model = GPT(GPTConfig(block_size=256, vocab_size=50257, n_layer=1, n_head=4, n_embd=128))
    assert monitor._measured_peaks[("cpu", torch.float32)] >= model.flops_per_token(32) * max(tokens_per_sec)
