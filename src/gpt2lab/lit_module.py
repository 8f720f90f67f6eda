import math
from collections.abc import Callable
from dataclasses import asdict
from functools import partial

import lightning as L
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from gpt2lab.model import GPT, GPTConfig

CHECKPOINT_FORMAT = 1  # bump when what a checkpoint holds changes; see on_load_checkpoint


def warmup_cosine(step: int, *, warmup_steps: int, min_lr_ratio: float, max_steps: int) -> float:
    """LR multiplier at optimizer step `step`: linear warmup to 1, then cosine decay to
    min_lr_ratio at max_steps, flat after (build-nanogpt's get_lr)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr_ratio
    decay_ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 → 0
    return min_lr_ratio + coeff * (1.0 - min_lr_ratio)


class GPTModule(L.LightningModule):
    """Trains a GPT: the loss, its logging, AdamW parameter groups and the per-step LR schedule."""

    def __init__(
        self,
        config: GPTConfig,
        init_weights: Callable[[GPT], None],
        optimizer: Callable[..., Optimizer],
        lr_schedule: Callable[..., float],
        compile: bool = False,
    ):
        super().__init__()
        # the architecture goes into every checkpoint, so sampling and export rebuild the model alone
        self.save_hyperparameters({"model": asdict(config)})
        self.model = GPT(config)
        init_weights(self.model)
        self.make_optimizer, self.lr_schedule, self.compile_model = optimizer, lr_schedule, compile
        self.step_losses: list[torch.Tensor] = []  # of the micro-batches of the current optimizer step

    def configure_model(self) -> None:
        if self.compile_model:
            # in place, so parameter names (and checkpoints) keep no `_orig_mod.` prefix
            self.model.compile()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self.model(x, y)
        self.step_losses.append(loss.detach())  # logged once per optimizer step, in on_before_optimizer_step
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        # Lightning calls this after backward (and AMP unscaling), before gradient clipping
        # an optimizer step's loss is the mean over its micro-batches (gradient accumulation)
        self.log("train/loss", torch.stack(self.step_losses).mean(), prog_bar=True)
        self.step_losses.clear()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        _, loss = self.model(x, y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)  # mean over batches and ranks

    def configure_optimizers(self):
        # any parameter that is 2D is weight decayed (matmul weights, embeddings); biases and
        # LayerNorm gains are not (build-nanogpt)
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # the fused kernel does the update of all parameters in one launch; cuda, cpu and mps have it
        optimizer = self.make_optimizer(groups, fused=self.device.type in ("cuda", "cpu", "mps"))
        schedule = LambdaLR(optimizer, partial(self.lr_schedule, max_steps=self.trainer.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["gpt2lab_format"] = CHECKPOINT_FORMAT

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        found = checkpoint.get("hyper_parameters", {}).get("model")
        expected = self.hparams["model"]
        if found != expected:
            raise ValueError(
                f"checkpoint is of another model: it holds {found}, this run builds {expected}; "
                "pick the model=... (and model.* overrides) the checkpoint was trained with"
            )
