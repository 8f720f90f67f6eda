"""The device a run uses and what `auto` means there: each accelerator setting left at `auto` in
conf/accelerator/ takes the device's default from DEFAULTS below, worked out once, in Python, when an entry
point starts (not while Hydra composes); any setting can still be set on the command line. Then the settings
that are per process, not Trainer arguments: TF32 matmuls and glibc's allocator."""

import ctypes
import logging
import platform

import torch
from omegaconf import DictConfig

from gpt2lab.errors import ConfigError

log = logging.getLogger(__name__)

AUTO = "auto"

# glibc's <malloc.h> parameter numbers for mallopt, by the names accelerator.malloc uses
MALLOPT_PARAMS = {"trim_threshold": -1, "mmap_max": -4, "arena_max": -8}

# Keep freed memory instead of returning it to the OS every step, in every thread (README, Performance)
KEEP_FREED_MEMORY = {"mmap_max": 0, "trim_threshold": 2**31 - 1, "arena_max": 1}


def detect_device() -> str:
    """cuda if available, else mps, else cpu: build-nanogpt's detection order."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_native_bf16() -> bool:
    """x86 CPUs with AVX512-BF16 or AMX multiply bf16 in hardware; on others PyTorch emulates it, and
    autocast to bf16 is slower than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def device_defaults(name: str, precision: str | None = None) -> dict:
    """What `auto` means for each accelerator setting on device `name`. The CPU's attention depends on the
    precision the run ends up with (`precision`, when it was set rather than left to the default)."""
    if name == "cuda":  # bf16 autocast, TF32 matmuls, compiled
        return {"precision": "bf16-mixed", "compile": True, "attention": "sdpa", "matmul_precision": "high",
                "malloc": None}  # fmt: skip
    if name == "mps":
        return {"precision": "32-true", "compile": False, "attention": "sdpa", "matmul_precision": None, "malloc": None}
    # cpu: bf16 autocast only where the CPU multiplies bf16 natively (elsewhere it is emulated, slower); in bf16
    # PyTorch's CPU flash kernel (its backward above all) is slower than softmax(q·kᵀ)·v in plain ops, in fp32
    # it is the faster (README, Performance)
    precision = precision or ("bf16-mixed" if cpu_has_native_bf16() else "32-true")
    attention = "eager" if str(precision).startswith("bf16") else "sdpa"
    return {"precision": precision, "compile": False, "attention": attention, "matmul_precision": None,
            "malloc": KEEP_FREED_MEMORY}  # fmt: skip


def resolve_accelerator(accelerator: DictConfig) -> None:
    """Replace every `auto` of an accelerator config (conf/accelerator/) with the device's default, in place;
    the settings given stay as they are. Called once by each entry point, before anything reads them."""
    if accelerator.name == AUTO:
        accelerator.name = detect_device()
    if accelerator.name not in ("cuda", "mps", "cpu"):
        raise ConfigError(f"accelerator.name={accelerator.name!r}: must be auto, cuda, mps or cpu")
    given_precision = None if accelerator.precision == AUTO else accelerator.precision
    for key, value in device_defaults(accelerator.name, given_precision).items():
        if accelerator.get(key) == AUTO:
            accelerator[key] = value


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
