import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial

import lightning as L
import torch
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from gpt2lab import checkpoint as ckpt_format
from gpt2lab.errors import CheckpointError, ConfigError
from gpt2lab.metrics import VAL_LOSS, unseen_token_mask, validation_metrics
from gpt2lab.model import GPT, GPTConfig

HIDDEN_LAYERS = "transformer.h."  # the blocks' parameters: optim=muon takes their matrices
STABILITY = "stability/"  # the instruments' tags (train.monitor_every_n_steps), grouped so in TensorBoard


def layer_of(name: str) -> str:
    """The layer a parameter of GPT belongs to, for the per-layer instruments: `layer_<i>` for block i's
    (transformer.h.<i>.*), else its module: wte (tied, also the output layer), wpe, ln_f, lm_head (untied)."""
    if name.startswith(HIDDEN_LAYERS):
        return f"layer_{name.split('.')[2]}"
    return name.removeprefix("transformer.").split(".")[0]


def rms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The root mean square of all the tensors' entries together, as one float32 0-d tensor."""
    # sums of squares, not torch's norm: on CPU that accumulates in float32 and is off by 0.2% over an embedding's
    # 6.4M entries, where sum's cascade is good to 1e-8
    squares = torch.stack([t.float().square().sum() for t in tensors]).sum()
    return (squares / sum(t.numel() for t in tensors)).sqrt()


def is_due(step: int, last: bool, every_n_steps: int | None) -> bool:
    """Whether work done every `every_n_steps` optimizer steps is due after optimizer step `step` (1, 2, ...): at
    each multiple and at the run's last step (build-nanogpt: `step % every == 0 or last_step`); None: at the last
    step only. The one rule of all such work (StepReport.due)."""
    return last or (every_n_steps is not None and step % every_n_steps == 0)


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


def adamw_groups(config: GPTConfig, named: list[tuple[str, torch.nn.Parameter]], lr: float) -> list[dict]:
    """AdamW's parameter groups for GPT's parameters `named` at the base learning rate lr (optim.lr). Group 0 is
    at lr: the `lr` logged is its own. A group's "lr" is its initial lr, which the schedule scales (LambdaLR)."""
    # any parameter that is 2D is weight decayed (matmul weights, embeddings); biases and
    # LayerNorm gains are not (build-nanogpt)
    groups = [
        {"params": [p for _, p in named if p.dim() >= 2]},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    if config.parametrization == "mup":
        # variant parametrization=mup: the blocks' matrices at lr × 1/m, m = n_embd / mup_base_width (μP for Adam:
        # an update of ~lr per entry moves W·x ∝ fan_in, as the inputs it meets are correlated with it); embeddings,
        # the readout, biases and norm gains at lr. Weight decay stays AdamW's lr·wd, of each group's own lr
        hidden = {name for name, p in named if p.dim() == 2 and name.startswith(HIDDEN_LAYERS)}
        groups[0]["params"] = [p for name, p in named if p.dim() >= 2 and name not in hidden]
        groups.append({"params": [p for name, p in named if name in hidden], "lr": lr / config.width_mult})
    return groups


@dataclass
class StepReport:
    """What one optimizer step did, from its owner (GPTModule.training_step): callbacks read it as
    `outputs["report"]` in on_train_batch_end, and nothing recomputes it."""

    step: int  # optimizer steps done, this one included: the x of every scalar it logs (1, 2, ...)
    loss: float  # mean over the step's micro-batches and ranks: the global batch's loss
    grad_norm: float  # of the all-reduced gradients, before clipping
    lr: float
    tokens: int  # trained on in this step, all ranks
    time: float  # seconds from the start of the step to its update done: no validation, sampling or eval
    applied: bool  # False: the update was withheld (non-finite gradients, or an fp16 overflow)
    last: bool  # the run's last step (trainer.max_steps reached)
    fault: str | None = None  # why it was withheld, when that is a fault to act on (never an fp16 overflow)
    val_loss: float | None = None  # of the weights after this step, when validation was due (else None)
    z_loss: float | None = None  # train.z_loss's auxiliary term, mean over the step (not in `loss`); None: off
    # at a monitored step (train.monitor_every_n_steps), the stability instruments by tag, `stability/...`
    stability: dict[str, float] | None = None

    def due(self, every_n_steps: int | None) -> bool:
        """Whether work done every `every_n_steps` optimizer steps (validate, sample, evaluate, save, monitor) is due
        after this step (is_due): the one rule every such callback follows."""
        return is_due(self.step, self.last, every_n_steps)


class GPTModule(L.LightningModule):
    """Trains a GPT: one batch is the micro-batches of one optimizer step, and training_step owns that step
    from the first forward to the update (gradient accumulation, clipping, the non-finite check, the LR
    schedule), validates when it is due, and reports it all in a StepReport."""

    def __init__(
        self,
        config: GPTConfig,
        init_weights: Callable[[GPT], None],
        optimizer: Callable[..., Optimizer],
        lr_schedule: Callable[..., float],
        lr_scale: float,
        grad_clip: float | None,
        val_every_n_steps: int,
        z_loss: float,
        monitor_every_n_steps: int | None,
        compile: bool = False,
        attention: str = "sdpa",
    ):
        super().__init__()
        # the architecture goes into every checkpoint, so sampling and export rebuild the model alone
        self.save_hyperparameters({"model": asdict(config)})
        self.automatic_optimization = False  # Lightning counts micro-batches; the step is ours
        self.model = GPT(config, attention)
        init_weights(self.model)
        self.make_optimizer, self.lr_schedule, self.compile_model = optimizer, lr_schedule, compile
        self.lr_scale, self.grad_clip, self.val_every_n_steps = lr_scale, grad_clip, val_every_n_steps
        self.z_loss, self.monitor_every_n_steps = z_loss, monitor_every_n_steps
        self.register_buffer("unseen_tokens", None, persistent=False)  # set in setup from the data
        self.val_loss: float | None = None  # of the last validation; saved in checkpoints

    def setup(self, stage: str) -> None:
        # the model stays unaware of data: the DataModule says which ids training never shows (when
        # prepare counted them); padded vocabulary rows are never shown either
        counts = getattr(self.trainer.datamodule, "train_token_counts", lambda: None)()
        if counts is not None:
            self.unseen_tokens = unseen_token_mask(counts, self.model.config.padded_vocab_size).to(self.device)

    def configure_model(self) -> None:
        if self.compile_model:
            # in place, so parameter names (and checkpoints) keep no `_orig_mod.` prefix
            self.model.compile()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # DDP readies its gradient all-reduce in the forward that enters training_step; with several
        # micro-batches it should run once, in the last one's backward (manual_backward readies it there)
        self._ddp_sync(len(batch[0]) == 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict:
        start = time.perf_counter()
        xs, ys = batch  # (A, B, T) each: the A micro-batches of this optimizer step
        optimizers, schedules = self.optimizers(), self.lr_schedulers()
        if not isinstance(optimizers, list):  # optim=adamw: one optimizer; optim=muon: AdamW, then Muon
            optimizers, schedules = [optimizers], [schedules]
        lr = optimizers[0].param_groups[0]["lr"]  # AdamW's (optim=muon: Muon's follows the same schedule)
        step = self.global_step + 1  # this one, as its report will count it
        # the stability instruments: every train.monitor_every_n_steps and at the last step (null: never)
        every = self.monitor_every_n_steps
        monitor = every is not None and is_due(step, step >= self.trainer.max_steps, every)
        loss_sum = torch.zeros((), device=self.device)
        z_sum = torch.zeros((), device=self.device) if self.z_loss else None
        output_logits = []  # at a monitored step: each micro-batch's (largest output logit, mean log Z)
        with self.model.recording_attention_logits() if monitor else nullcontext() as attention_logit_max:
            for i, (x, y) in enumerate(zip(xs, ys)):
                self._ddp_sync(i == len(xs) - 1)
                logits, loss, z_term, log_z = self.losses(x, y)
                objective = loss if z_term is None else loss + z_term
                self.manual_backward(objective / len(xs))  # the mean over micro-batches, as one big batch gives
                loss_sum += loss.detach()
                if z_term is not None:
                    z_sum += z_term.detach()
                if monitor:
                    output_logits.append(self.output_logit_stats(logits, log_z))
            attention_logits = attention_logit_max() if monitor else None
        step_loss = self.trainer.strategy.reduce(loss_sum / len(xs), reduce_op="mean")  # over ranks
        if z_sum is not None:
            z_sum = self.trainer.strategy.reduce(z_sum / len(xs), reduce_op="mean")
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # fp16 only
        if scaler is not None:
            scaler.unscale_(optimizers[0].optimizer)  # the true gradients, to measure and clip (fp16: AdamW alone)
        params = [p for p in self.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        finite = torch.isfinite(grad_norm) & torch.isfinite(step_loss)
        if monitor:  # before clipping, and the weights before the update, to measure it after
            instruments = self.forward_instruments(attention_logits, output_logits) | self.grad_rms()
            weights_before = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        if self.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, grad_norm)
        if all(optimizer.optimizer.defaults.get("fused") for optimizer in optimizers):
            # a NaN/inf step is withheld on the device, with no host sync: the fused AdamW skips every update
            # (and its step count) when found_inf is 1, as for fp16 overflows, where the scaler sets it instead
            for optimizer in optimizers:
                optimizer.optimizer.found_inf = (~finite).float()
        elif not finite:  # others (Muon): a host sync; without gradients AdamW and Muon leave every parameter as is
            self.model.zero_grad(set_to_none=True)
        optimizers[0].step()  # Lightning counts each step of its optimizer wrapper as an optimizer step (global_step)
        for optimizer in optimizers[1:]:  # so optim=muon's Muon steps unwrapped: one step counted, not two
            optimizer.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        for schedule in schedules:
            schedule.step()
        scalars = {"loss": step_loss, "grad_norm": grad_norm.float()}
        if z_sum is not None:
            scalars["z_loss"] = z_sum
        if monitor:
            scalars |= instruments | self.update_ratios(weights_before)
        values = dict(zip(scalars, torch.stack(list(scalars.values())).tolist()))  # the step's one sync
        step_loss, grad_norm = values.pop("loss"), values.pop("grad_norm")
        report = StepReport(
            step=self.global_step, loss=step_loss, grad_norm=grad_norm, lr=lr,
            tokens=xs.numel() * self.trainer.world_size, time=time.perf_counter() - start,
            applied=math.isfinite(step_loss) and math.isfinite(grad_norm),
            last=self.global_step >= self.trainer.max_steps, z_loss=values.pop("z_loss", None),
            stability=values if monitor else None,
        )  # fmt: skip
        if not report.applied and (scaler is None or not math.isfinite(step_loss)):
            report.fault = f"non-finite {'loss' if not math.isfinite(step_loss) else 'gradient norm'}"
        if report.due(self.val_every_n_steps):
            report.val_loss = self.validate()[VAL_LOSS]
        # every scalar of this step at x = report.step (Lightning's `step` key), whichever hook logs it
        self.log("step", float(report.step))
        self.log("train/loss", step_loss, prog_bar=True)  # the cross-entropy alone, with or without z-loss
        self.log("train/grad_norm", grad_norm)
        self.log("lr", lr)
        if report.z_loss is not None:
            self.log("train/z_loss", report.z_loss)
        if report.stability is not None:
            self.log_sparse(report.stability)
        return {"report": report}

    def losses(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One micro-batch forward: its logits, its cross-entropy, train.z_loss's term and the log-normalizers it
        is made of, log Z = logsumexp(logits) per position (None, None when train.z_loss is 0)."""
        if not self.z_loss:
            logits, loss = self.model(x, y)  # the cross-entropy exactly as without z-loss
            return logits, loss, None, None
        logits, _ = self.model(x)
        logits_2d, targets = logits.view(-1, logits.size(-1)), y.reshape(-1, 1)  # (B·T, V), (B·T, 1)
        # a position's cross-entropy is log Z − its target's logit: log Z from it, without a second logsumexp
        losses = F.cross_entropy(logits_2d, targets.squeeze(1), reduction="none")  # (B·T,), float32 under autocast
        log_z = losses + logits_2d.gather(1, targets).squeeze(1).float()
        # PaLM (Chowdhery et al. 2022, section 5): z·log²Z drives log Z to 0, so that the logits cannot drift
        # together, which the softmax alone never sees; logged apart (train/z_loss), so that train/loss stays CE
        return logits, losses.mean(), self.z_loss * log_z.square().mean(), log_z

    @torch.no_grad()
    def output_logit_stats(self, logits: torch.Tensor, log_z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch's largest output logit and its mean log-normalizer log Z (from train.z_loss's when it has
        one: otherwise one logsumexp over the logits, at monitored steps only)."""
        if log_z is None:
            log_z = logits.float().logsumexp(-1)  # (B, T)
        return logits.amax().float(), log_z.mean()

    def forward_instruments(
        self, attention_logits: torch.Tensor, output_logits: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The forward's instruments over the step's micro-batches and ranks: each layer's largest attention logit,
        the largest output logit and the mean log Z (the micro-batches are of equal size)."""
        logits_max, log_z_mean = (torch.stack(values) for values in zip(*output_logits))
        largest = self.trainer.strategy.reduce(torch.cat([attention_logits, logits_max.amax()[None]]), reduce_op="max")
        layers = {f"{STABILITY}attn_logit_max/layer_{i}": value for i, value in enumerate(largest[:-1])}
        log_z = self.trainer.strategy.reduce(log_z_mean.mean(), reduce_op="mean")
        return layers | {f"{STABILITY}logits_max": largest[-1], f"{STABILITY}log_z_mean": log_z}

    def parameters_by_layer(self) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
        layers = {}
        for name, p in self.model.named_parameters():  # a tied parameter once, under its first name (wte)
            layers.setdefault(layer_of(name), []).append((name, p))
        return layers

    @torch.no_grad()
    def grad_rms(self) -> dict[str, torch.Tensor]:
        """Each layer's gradient RMS, over all its parameters' entries (all-reduced, unclipped)."""
        return {
            f"{STABILITY}grad_rms/{layer}": rms([p.grad for _, p in named if p.grad is not None])
            for layer, named in self.parameters_by_layer().items()
        }

    @torch.no_grad()
    def update_ratios(self, weights_before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each layer's update-to-weight RMS ratio, rms(W_after − W_before) / rms(W_before): the update as applied,
        after the optimizer's own scaling, weight decay and clipping (optim=muon's too)."""
        ratios = {}
        for layer, named in self.parameters_by_layer().items():
            before = [weights_before[name] for name, _ in named]
            updates = [p - w for (_, p), w in zip(named, before)]
            ratios[f"{STABILITY}update_ratio/{layer}"] = rms(updates) / rms(before)
        return ratios

    def _ddp_sync(self, enabled: bool) -> None:
        if isinstance(self.trainer.strategy.model, DistributedDataParallel):
            self.trainer.strategy.model.require_backward_grad_sync = enabled  # as its no_sync() does

    def validate(self) -> dict[str, float]:
        """val/loss (and the unused-token metrics) of the current weights, logged at this step and returned: the
        mean over the same first val batches every time, and over ranks (each holds its own slice of each batch)."""
        self.model.eval()
        # the ranks' sums are added before dividing, so the logged split of val/loss adds up exactly
        reduce_sums = partial(self.trainer.strategy.reduce, reduce_op="sum")
        metrics = validation_metrics(self.model, self.trainer.datamodule.val_loader(), self.unseen_tokens, reduce_sums)
        self.model.train()
        values = dict(zip(metrics, torch.stack(list(metrics.values())).tolist()))
        self.log_sparse(values, prog_bar=(VAL_LOSS,))
        self.val_loss = values[VAL_LOSS]
        return values

    def log_sparse(self, metrics: dict[str, float], prog_bar: tuple[str, ...] = ()) -> None:
        """Scalars measured at some steps only (validation, HellaSwag): to the loggers at this step alone
        (self.log would log the last value again at every later step), and to the progress bar and
        trainer.callback_metrics."""
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in prog_bar, logger=False)
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def configure_optimizers(self):
        make_adamw, make_muon = self.make_optimizer, self.make_optimizer.keywords.get("muon")
        if make_muon:
            # optim=muon nests Muon's partial in AdamW's config as optim.muon (conf/optim/muon.yaml), so that
            # optim.lr and the other optim.* keys are AdamW's under either choice
            keywords = {k: v for k, v in self.make_optimizer.keywords.items() if k != "muon"}
            make_adamw = partial(self.make_optimizer.func, *self.make_optimizer.args, **keywords)
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        # Muon: the hidden layers' matrices (the blocks' attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj weights);
        # embeddings, the output layer, biases and norm gains stay with AdamW (Jordan et al. 2024, modded-nanogpt)
        hidden = {name for name, p in named if make_muon and p.dim() == 2 and name.startswith(HIDDEN_LAYERS)}
        groups = adamw_groups(self.model.config, [(name, p) for name, p in named if name not in hidden],
                              make_adamw.keywords["lr"])  # fmt: skip
        # the fused kernel does the update of all parameters in one launch; cuda, cpu and mps have it
        optimizers = [make_adamw(groups, fused=self.device.type in ("cuda", "cpu", "mps"))]
        if make_muon:
            if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
                # Lightning's scaler would unscale and update once per optimizer: Muon's gradients twice
                raise ConfigError("optim=muon with fp16 (16-mixed) is not supported: use bf16-mixed or 32-true")
            optimizers.append(make_muon([p for name, p in named if name in hidden]))
        schedule = partial(self.lr_schedule, max_steps=self.trainer.max_steps)  # one schedule for both
        lr_lambda = lambda step: self.lr_scale * schedule(step)  # train.lr_scale: every group's lr × it, logged so
        configs = [
            {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, lr_lambda), "interval": "step"}}
            for optimizer in optimizers
        ]
        return configs[0] if len(configs) == 1 else configs

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[ckpt_format.FORMAT_KEY] = ckpt_format.FORMAT
        checkpoint[ckpt_format.VAL_LOSS_KEY] = self.val_loss  # a finished run's result, without running it again

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        version = checkpoint.get(ckpt_format.FORMAT_KEY)
        if version != ckpt_format.FORMAT:
            why = {
                None: "not written by gpt2lab",
                1: "written by an older gpt2lab, whose train batches were micro-batches: its weights still load for "
                "sampling, HellaSwag and export, but no run can resume from it",
            }
            raise CheckpointError(
                f"checkpoint has gpt2lab_format {version}, this gpt2lab resumes format {ckpt_format.FORMAT} only: "
                + why.get(version, "written by a newer gpt2lab; upgrade it")
            )
        found = checkpoint.get("hyper_parameters", {}).get("model")
        expected = self.hparams["model"]
        if isinstance(found, dict):  # a switch added since the checkpoint was written: it had the default
            found = asdict(GPTConfig(**found))  # as load_checkpoint rebuilds it
        if found != expected:
            raise CheckpointError(
                f"checkpoint is of another model: it holds {found}, this run builds {expected}; "
                "pick the model=... (and model.* overrides) the checkpoint was trained with"
            )
