"""Text samples during training, in TensorBoard's text tab and the log: how the model writes, next to its loss."""

import logging
import textwrap

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from gpt2lab.sample import sample

log = logging.getLogger(__name__)


class TextSamples(L.Callback):
    """Every `every_n_steps` optimizer steps and at the last, `num_samples` continuations of `prompt`, logged under
    the TensorBoard text tag `samples` and to the console log.

    Sampling draws from a generator of its own, seeded with `seed` every time: the training RNG stream,
    and so the run's losses, are exactly those of a run without this callback, and the samples at two
    steps differ only by the weights.
    """

    def __init__(
        self,
        every_n_steps: int,
        prompt: str,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        seed: int,
    ):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"callbacks.text_samples.every_n_steps={every_n_steps}: must be >= 1")
        self.every_n_steps, self.prompt, self.seed = every_n_steps, prompt, seed
        self.sampling = {"num_samples": num_samples, "max_new_tokens": max_new_tokens, "temperature": temperature,
                         "top_k": top_k}  # fmt: skip

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        report = outputs["report"]  # one batch is one optimizer step
        if report.due(self.every_n_steps) and trainer.is_global_zero:
            self.log_samples(trainer, pl_module, report.step)

    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        was_training = pl_module.training
        pl_module.eval()
        try:
            # eager: a compiled model would recompile for every cache length; autocast as in training
            with torch.compiler.set_stance("force_eager"), trainer.precision_plugin.forward_context():
                texts = sample(pl_module.model, self.prompt, seed=self.seed, **self.sampling)
        finally:
            pl_module.train(was_training)
        log.info("samples at step %d:\n%s", step, "\n---\n".join(texts))
        # TensorBoard renders text as markdown: an indented block keeps the samples' line breaks
        markdown = "\n\n".join(f"**sample {i}**\n\n{textwrap.indent(t, '    ')}" for i, t in enumerate(texts))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", markdown, global_step=step)
