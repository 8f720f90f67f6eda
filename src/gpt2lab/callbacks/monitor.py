"""Speed per optimizer step: step time, tokens/s and model FLOPs utilization, in TensorBoard and on the
progress bar."""

import time
from functools import cache

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops

from gpt2lab.model import GPT

PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                    "16-true": torch.float16}  # fmt: skip


def flops_per_token(model: GPT, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token: 6·N + 12·n_layer·n_embd·T.

    6·N: each of the N non-embedding parameters does a multiply-add (2 FLOPs) per token forward and
    twice that backward (Kaplan et al. 2020); the tied token embedding counts once, as the lm_head
    matmul. 12·n_layer·n_embd·T: attention's q·kᵀ and att·v, 2·2·T·n_embd per token per layer forward,
    ×3 with backward, causal masking not discounted (PaLM, appendix B; nanoGPT's estimate_mfu)."""
    c = model.config
    return 6 * model.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * seq_len


@cache
def measured_peak_flops(device_type: str, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` n×n matmuls on this device at `dtype`: the ceiling a CPU reaches in
    practice, where no datasheet figure applies. Measured once per process."""
    # constant operands: a dense matmul takes as long for any values, and drawing random ones would
    # shift the global RNG stream of the run being measured
    a = torch.full((n, n), 1.0 / n, device=device_type, dtype=dtype)
    b = a.clone()
    best = float("inf")
    for _ in range(repeats):
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak FLOP/s at the run's compute dtype: Lightning's datasheet table for GPUs (A100,
    H100, H200, L4, ...), a measured large matmul for CPU and MPS; None for an unlisted GPU."""
    dtype = PRECISION_DTYPES.get(str(precision), torch.float32)
    if device.type in ("cpu", "mps"):
        return measured_peak_flops(device.type, dtype)
    return get_available_flops(device, dtype)


class SpeedMonitor(L.Callback):
    """Logs per optimizer step `perf/step_time` (s), `perf/tokens_per_sec` (all ranks) and `perf/mfu` (model
    FLOPs per second of one device ÷ its peak), from the step's own report (GPTModule.training_step).

    A step's time runs from the start of its first micro-batch to its update done: validation, text samples,
    HellaSwag and checkpoints after it are not in it, nor is loading its batch (a slice of a memory map). The
    first step includes warm-up and compilation.
    """

    def __init__(self, peak_flops: float | None = None):
        super().__init__()
        self.peak_flops = peak_flops  # FLOP/s of one device; None: from the table, or measured on cpu / mps
        self.flops_per_token: dict[int, int] = {}  # by sequence length

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_flops is None:
            self.peak_flops = peak_flops(pl_module.device, trainer.precision)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        report = outputs["report"]
        tokens_per_sec = report.tokens / report.time
        seq_len = batch[0].size(-1)
        if seq_len not in self.flops_per_token:
            self.flops_per_token[seq_len] = flops_per_token(pl_module.model, seq_len)
        pl_module.log("perf/step_time", report.time)
        pl_module.log("perf/tokens_per_sec", tokens_per_sec, prog_bar=True)
        if self.peak_flops:
            mfu = self.flops_per_token[seq_len] * tokens_per_sec / trainer.world_size / self.peak_flops
            pl_module.log("perf/mfu", mfu, prog_bar=True)
