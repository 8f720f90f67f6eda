import math
from collections.abc import Callable
from dataclasses import asdict
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from gpt2lab.model import GPT, GPTConfig

CHECKPOINT_FORMAT = 1  # bump when what a checkpoint holds changes; see on_load_checkpoint


@torch.no_grad()
def unused_token_metrics(
    logits: torch.Tensor, targets: torch.Tensor, unseen: torch.Tensor, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """How much of the loss is owed to token ids the training split never holds (`unseen`, a bool per
    logit column): the mean probability the model puts on them, and the cross-entropy with their logits
    masked out (−inf), over the positions whose target does occur in training (another would cost ∞).
    Rows go `chunk` at a time, so the float32 copies stay small beside a large batch's logits."""
    logits, targets = logits.flatten(0, -2), targets.flatten()  # (B·T, V), (B·T,)
    mass, loss_sum, seen_targets = logits.new_zeros((), dtype=torch.float32), 0.0, 0
    for rows, ys in zip(logits.split(chunk), targets.split(chunk)):
        rows = rows.float()
        log_z = rows.logsumexp(-1)  # (N,)
        seen_rows = rows.masked_fill(unseen, float("-inf"))
        log_z_seen = seen_rows.logsumexp(-1)  # (N,) the normalizer over seen ids alone
        mass = mass + (1 - (log_z_seen - log_z).exp()).sum()
        ignore = unseen[ys]
        loss_sum = loss_sum + F.cross_entropy(seen_rows, ys.masked_fill(ignore, -100), reduction="sum")
        seen_targets += int((~ignore).sum())
    return mass / len(targets), loss_sum / max(seen_targets, 1)


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
        attention: str = "sdpa",
    ):
        super().__init__()
        # the architecture goes into every checkpoint, so sampling and export rebuild the model alone
        self.save_hyperparameters({"model": asdict(config)})
        self.model = GPT(config, attention)
        init_weights(self.model)
        self.make_optimizer, self.lr_schedule, self.compile_model = optimizer, lr_schedule, compile
        self.step_losses: list[torch.Tensor] = []  # of the micro-batches of the current optimizer step
        self.nonfinite: dict | None = None  # a step whose update was withheld; SafeStop reads it
        self.register_buffer("unseen_tokens", None, persistent=False)  # set in setup from the data

    def setup(self, stage: str) -> None:
        # the model stays unaware of data: the DataModule says which ids training never shows (when
        # prepare counted them); padded vocabulary rows are never shown either
        counts = getattr(self.trainer.datamodule, "train_token_counts", lambda: None)()
        if counts is not None:
            unseen = torch.ones(self.model.config.padded_vocab_size, dtype=torch.bool, device=self.device)
            unseen[: len(counts)] = torch.from_numpy(counts == 0)
            self.unseen_tokens = unseen

    def configure_model(self) -> None:
        if self.compile_model:
            # in place, so parameter names (and checkpoints) keep no `_orig_mod.` prefix
            self.model.compile()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self.model(x, y)
        self.step_losses.append(loss.detach())  # logged once per optimizer step, in on_before_optimizer_step
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        self._last_loss = loss.detach()
        return loss

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        # Lightning calls this after backward (and AMP unscaling), before gradient clipping
        # an optimizer step's loss is the mean over its micro-batches (gradient accumulation)
        # and over ranks (one all-reduce of a scalar): the global batch's loss, as build-nanogpt logs it
        self.log("train/loss", torch.stack(self.step_losses).mean(), prog_bar=True, sync_dist=True)
        self.step_losses.clear()
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        grad_norm = self._grad_norm = torch.nn.utils.get_total_norm(grads)  # reused by the clipping
        self.log("train/grad_norm", grad_norm)
        if not torch.isfinite(grad_norm):
            # a NaN/inf loss gives NaN gradients too. Dropping the gradients makes AdamW skip every
            # parameter, so the weights stay those of the last good step (the same on every rank: the
            # norm is of the all-reduced gradients)
            optimizer.zero_grad(set_to_none=True)
            self.nonfinite = {
                "step": self.global_step,
                "what": f"non-finite gradient norm {grad_norm.item()}",
                "loss": self._last_loss.item(),
                "lr": optimizer.param_groups[0]["lr"],
            }

    def configure_gradient_clipping(self, optimizer: Optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning's AMP plugin refuses to clip for a fused optimizer, which unscales fp16 gradients
        # inside step(); bf16 has no gradient scaler, so here the gradients are the true ones
        if gradient_clip_val and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            assert gradient_clip_algorithm in (None, "norm"), gradient_clip_algorithm
            torch.nn.utils.clip_grads_with_norm_(self.parameters(), gradient_clip_val, self._grad_norm)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits, loss = self.model(x, y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)  # mean over batches and ranks
        if self.unseen_tokens is not None:
            # val/loss − val/loss_seen_vocab: the part of the loss still owed to never-seen tokens
            unused_mass, loss_seen_vocab = unused_token_metrics(logits, y, self.unseen_tokens)
            self.log("val/unused_token_mass", unused_mass, sync_dist=True)
            self.log("val/loss_seen_vocab", loss_seen_vocab, sync_dist=True)

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
        version = checkpoint.get("gpt2lab_format")
        if version is None or version > CHECKPOINT_FORMAT:
            raise ValueError(
                f"checkpoint has gpt2lab_format {version}, this gpt2lab reads format <= {CHECKPOINT_FORMAT}: "
                + ("not written by gpt2lab" if version is None else "written by a newer gpt2lab; upgrade it")
            )
        found = checkpoint.get("hyper_parameters", {}).get("model")
        expected = self.hparams["model"]
        if found != expected:
            raise ValueError(
                f"checkpoint is of another model: it holds {found}, this run builds {expected}; "
                "pick the model=... (and model.* overrides) the checkpoint was trained with"
            )
