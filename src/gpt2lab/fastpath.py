"""The speed levers that are not Trainer arguments: which CPUs get bf16 autocast by default, glibc's
allocator settings, and the peak FLOP/s of a device that MFU divides by."""

import ctypes
import logging
import platform
import time
from functools import cache

import torch

log = logging.getLogger(__name__)

# glibc's <malloc.h> parameter numbers for mallopt, by the names accelerator.malloc uses
MALLOPT_PARAMS = {"trim_threshold": -1, "mmap_max": -4, "arena_max": -8}


def cpu_has_native_bf16() -> bool:
    """x86 CPUs with AVX512-BF16 or AMX multiply bf16 in hardware; on others PyTorch emulates it, and
    autocast to bf16 is slower than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cpu_default_precision() -> str:
    """The Trainer precision for CPU runs (resolver `gpt2lab.cpu_precision`)."""
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def cpu_default_attention(precision: str) -> str:
    """The attention for CPU runs at `precision` (resolver `gpt2lab.cpu_attention`): in bf16, PyTorch's CPU
    flash kernel is slower than softmax(q·kᵀ)·v in plain ops (2.7× at T=256, its backward above all); in
    fp32 it is faster (README, Performance)."""
    return "eager" if str(precision).startswith("bf16") else "sdpa"


def tune_malloc(**settings: int) -> bool:
    """Set glibc's allocator parameters for this process (as GLIBC_TUNABLES would at exec time).

    By default glibc serves each large block (activations, gradients) with its own mmap and gives it back
    to the OS on free, so every training step pays page faults and zeroing again for the same sizes.
    mmap_max=0 serves them from the heap; a high trim_threshold keeps freed heap memory for reuse;
    arena_max=1 makes every thread allocate from that one heap (a thread's own arena ignores the first
    two and maps and unmaps as before). The price: the process keeps its peak memory. Returns False (and
    changes nothing) where libc is not glibc.
    """
    for key, value in settings.items():
        if key not in MALLOPT_PARAMS:
            raise ValueError(f"accelerator.malloc.{key}: unknown; the settings are {', '.join(MALLOPT_PARAMS)}")
        if not (isinstance(value, int) and 0 <= value < 2**31):  # mallopt takes a C int
            raise ValueError(
                f"accelerator.malloc.{key}={value!r}: must be an integer in [0, 2^31), e.g. {{mmap_max: 0, "
                "trim_threshold: 2147483647, arena_max: 1}; or accelerator.malloc=null for glibc's defaults"
            )
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.info("malloc settings skipped: libc is not glibc (%s)", platform.libc_ver()[0] or platform.system())
        return False
    libc = ctypes.CDLL(None)
    for key, value in settings.items():
        if not libc.mallopt(MALLOPT_PARAMS[key], value):
            raise OSError(f"glibc refused mallopt {key}={value}")
    log.info("glibc malloc: %s", ", ".join(f"{k}={v}" for k, v in settings.items()))
    return True


def set_up_process(matmul_precision: str | None, malloc: dict | None) -> None:
    """The accelerator settings that are per process, not Trainer arguments: TF32 matmuls and glibc's allocator
    (null: leave each as it is). Every entry point that runs a model calls it once, first."""
    if matmul_precision:
        torch.set_float32_matmul_precision(matmul_precision)
    if malloc:
        tune_malloc(**malloc)


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
