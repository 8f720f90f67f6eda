"""Checkpoints, written and read in one place: the atomic write Lightning uses, and the model of a training
checkpoint (or of Hugging Face weights) for sampling, evaluation and export."""

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from gpt2lab.errors import CheckpointError, ConfigError
from gpt2lab.model import GPT, GPTConfig

log = logging.getLogger(__name__)

# what gpt2lab adds to Lightning's checkpoint (GPTModule.on_save_checkpoint)
FORMAT_KEY = "gpt2lab_format"
FORMAT = 2  # bump when what a checkpoint holds changes; see GPTModule.on_load_checkpoint. 2: a train batch is a step
VAL_LOSS_KEY = "gpt2lab_val_loss"  # the val/loss of the last validation before the checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, then renames it into place: a run killed
    mid-write leaves the previous checkpoint (e.g. last.ckpt) whole. (Lightning's own write goes
    through a temp file in the system temp dir, which is not a rename when that is another disk.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def resolve_checkpoint(ckpt: str | os.PathLike, runs_dir: str | os.PathLike) -> Path:
    """The .ckpt file that ckpt names: a file; a run dir (its checkpoints/last.ckpt); or `last`, the
    newest run under runs_dir that has one."""
    if str(ckpt) == "last":
        found = list(Path(runs_dir).glob("*/checkpoints/last.ckpt"))
        if not found:
            raise CheckpointError(
                f"ckpt=last: no run under {runs_dir} has checkpoints/last.ckpt; train one, or pass "
                "ckpt=<run dir or .ckpt file> (or runs_dir=...)"
            )
        return max(found, key=lambda p: p.stat().st_mtime)
    path = Path(ckpt)
    for candidate in (path, path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"ckpt={ckpt}: no checkpoint there (looked for the file, <dir>/checkpoints/last.ckpt and <dir>/last.ckpt); "
        "pass a .ckpt file, a run dir, or ckpt=last"
    )


def shape_mismatches(model: GPT, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """'name: expected (..), found (..)' for every tensor of state_dict whose shape is not the model's."""
    expected = model.state_dict()
    return [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(v.shape)}"
        for k, v in state_dict.items()
        if k in expected and expected[k].shape != v.shape
    ]


def load_weights(model: GPT, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy state_dict into model, or fail naming the tensors that are missing, extra or of another shape."""
    mismatches = shape_mismatches(model, state_dict)
    if mismatches:
        raise CheckpointError(
            f"{source} holds a model of another size: {'; '.join(mismatches[:3])}"
            f"{f' (and {len(mismatches) - 3} more)' if len(mismatches) > 3 else ''}"
        )
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source} is not a GPT-2 state dict: missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_checkpoint(path: str | os.PathLike) -> GPT:
    """The GPT of a training checkpoint, rebuilt from the config GPTModule saves in it
    (hyper_parameters.model); its weights are state_dict's `model.*` entries."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data: no code runs
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a training checkpoint: torch.load failed ({type(e).__name__}: {e})"
        ) from e
    config = ckpt.get("hyper_parameters", {}).get("model") if isinstance(ckpt, dict) else None
    if config is None or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not a gpt2lab training checkpoint: it lacks hyper_parameters.model (the GPTConfig "
            "GPTModule saves) or state_dict; for Hugging Face weights pass hf=... instead"
        )
    model = GPT(GPTConfig(**config))
    state_dict = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    load_weights(model, state_dict, str(path))
    return model


def progress(path: str | os.PathLike) -> tuple[int, float | None]:
    """A training checkpoint's optimizer steps done and the val/loss of its last validation (None if it has none),
    read without loading its tensors into memory."""
    ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return ckpt["global_step"], ckpt.get(VAL_LOSS_KEY)


def load_model(ckpt: str | os.PathLike | None, hf: str | os.PathLike | None, runs_dir: str | os.PathLike) -> GPT:
    """The model that ckpt (a training checkpoint, see resolve_checkpoint) or hf (Hugging Face GPT-2 weights:
    a hub name or a save_pretrained dir) names: exactly one of them. On the CPU, in train mode."""
    if (ckpt is None) == (hf is None):
        raise ConfigError(
            f"pass exactly one of ckpt=<run dir | .ckpt file | last> or hf=<gpt2... | save_pretrained dir> "
            f"(got ckpt={ckpt}, hf={hf})"
        )
    if hf is not None:
        from gpt2lab.hf import load_pretrained  # transformers' side: only when asked for

        return load_pretrained(hf)
    path = resolve_checkpoint(ckpt, runs_dir)
    log.info("loading %s", path)
    return load_checkpoint(path)
