"""HellaSwag accuracy during training, every `every_n_steps` optimizer steps and at the last step."""

from collections.abc import Callable

import lightning as L

from gpt2lab import hellaswag


class HellaSwagEval(L.Callback):
    """Logs `hellaswag/acc_norm` (average loss of the ending) and `hellaswag/acc` (summed loss). Each rank
    scores every world_size-th example; the counts are summed over ranks."""

    def __init__(self, load_examples: Callable[[], list[dict]], every_n_steps: int, batch_size: int):
        super().__init__()
        self.load_examples, self.every_n_steps, self.batch_size = load_examples, every_n_steps, batch_size

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.load_examples()  # downloads once, on one rank
        trainer.strategy.barrier()
        self.examples = self.load_examples()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_step = trainer.global_step  # 0, or the step a resumed run starts from

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps done
        if step == self.last_step:
            return  # accumulating gradients: not an optimizer step
        self.last_step = step
        if step % self.every_n_steps and step != trainer.max_steps:
            return
        pl_module.eval()
        with trainer.precision_plugin.forward_context():  # the run's autocast
            counts = hellaswag.evaluate(
                pl_module.model, self.examples, trainer.global_rank, trainer.world_size, self.batch_size,
                progress=trainer.is_global_zero,
            )  # fmt: skip
        pl_module.train()
        scores = hellaswag.accuracies(trainer.strategy.reduce(counts, reduce_op="sum"))
        pl_module.log("hellaswag/acc_norm", scores["acc_norm"], prog_bar=True, rank_zero_only=True)
        pl_module.log("hellaswag/acc", scores["acc"], rank_zero_only=True)
