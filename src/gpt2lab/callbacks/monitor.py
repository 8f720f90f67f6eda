"""Speed per optimizer step: step time, tokens/s and model FLOPs utilization, in TensorBoard and on the
progress bar."""

import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops

PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                    "16-true": torch.float16}  # fmt: skip

MEASURED = ("cpu", "mps")  # devices with no datasheet figure: their peak is measured
# the best FLOP/s seen on each (device type, dtype) of MEASURED, over this process's runs
_measured_peaks: dict[tuple[str, torch.dtype], float] = {}


def time_matmul(device_type: str, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` n×n matmuls on this device at `dtype`."""
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


def measured_peak_flops(device_type: str, dtype: torch.dtype, seen: float = 0.0) -> float:
    """The ceiling a CPU (or MPS) reaches in practice, where no datasheet figure applies: the best FLOP/s this
    process has seen the device reach at `dtype`. That is a large matmul timed the first time it is asked for; and
    whenever a model is `seen` to run faster than that (the timing then ran beside other work on a shared machine,
    which would put MFU above 1), the matmul timed again and the peak raised to the larger of the two: the device
    has shown it does at least that much. So MFU never exceeds 1, and the peak recovers when the machine is quiet."""
    key = (device_type, dtype)
    if key not in _measured_peaks:
        _measured_peaks[key] = time_matmul(device_type, dtype)
    if seen > _measured_peaks[key]:
        _measured_peaks[key] = max(seen, time_matmul(device_type, dtype, repeats=3))
    return _measured_peaks[key]


# Dense bf16/fp16 tensor-core peaks (FLOP/s) of the GPUs this project is run on, from NVIDIA's datasheets, the first
# matching name fragment winning. Lightning's table (get_available_flops, used for every other GPU) misses the name
# torch gives the H200 ("NVIDIA H200": its keys are "h200 sxm1"/"h200 nvl1"), lists the H200's and H100 NVL's peaks
# with 2:4 sparsity (twice the dense figure), and the RTX 4090's without tensor cores (82.6e12).
GPU_BF16_PEAKS = (
    ("h200 nvl", 835e12),  # H200 NVL datasheet: 1,671 TFLOPS with sparsity
    ("h200", 989e12),  # H200 SXM: 1,979 with sparsity
    ("h100 nvl", 835e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("b200", 2.25e15),
    ("a100", 312e12),
    ("rtx 4090", 165.2e12),  # Ada whitepaper: FP16/BF16 tensor, FP32 accumulate, dense
)


def gpu_bf16_peak(name: str) -> float | None:
    """The dense bf16 peak of the GPU torch names `name` (torch.cuda.get_device_name), if GPU_BF16_PEAKS lists it."""
    return next((peak for fragment, peak in GPU_BF16_PEAKS if fragment in name.lower()), None)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a Trainer precision multiplies in."""
    return PRECISION_DTYPES.get(str(precision), torch.float32)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak FLOP/s at the run's compute dtype: a dense datasheet figure for GPUs (GPU_BF16_PEAKS at bf16
    and fp16, else Lightning's table: L4, A10G, V100, ...), a measured large matmul for CPU and MPS
    (measured_peak_flops); None for a GPU neither table lists."""
    dtype = compute_dtype(precision)
    if device.type in MEASURED:
        return measured_peak_flops(device.type, dtype)
    if dtype in (torch.bfloat16, torch.float16) and (peak := gpu_bf16_peak(torch.cuda.get_device_name(device))):
        return peak
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
        self.measured = False  # the peak is measured_peak_flops', raised when the model outruns it
        self.flops_per_token: dict[int, int] = {}  # by sequence length

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_flops is None:
            self.peak_flops = peak_flops(pl_module.device, trainer.precision)
            self.measured = pl_module.device.type in MEASURED

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        report = outputs["report"]
        tokens_per_sec = report.tokens / report.time
        seq_len = batch[0].size(-1)
        if seq_len not in self.flops_per_token:
            self.flops_per_token[seq_len] = pl_module.model.flops_per_token(seq_len)
        pl_module.log("perf/step_time", report.time)
        pl_module.log("perf/tokens_per_sec", tokens_per_sec, prog_bar=True)
        if not self.peak_flops:
            return  # a GPU missing from the datasheet table: no MFU
        flops_per_sec = self.flops_per_token[seq_len] * tokens_per_sec / trainer.world_size  # of one device
        if self.measured:
            self.peak_flops = measured_peak_flops(
                pl_module.device.type, compute_dtype(trainer.precision), flops_per_sec
            )
        pl_module.log("perf/mfu", flops_per_sec / self.peak_flops, prog_bar=True)
