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
        self.examples = hellaswag.rank_zero_first(self.load_examples, trainer.is_global_zero, trainer.strategy.barrier)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not outputs["report"].due(self.every_n_steps):  # one batch is one optimizer step
            return
        pl_module.eval()
        with trainer.precision_plugin.forward_context():  # the run's autocast
            counts = hellaswag.evaluate(
                pl_module.model, self.examples, trainer.global_rank, trainer.world_size, self.batch_size,
                progress=trainer.is_global_zero,
            )  # fmt: skip
        pl_module.train()
        scores = hellaswag.accuracies(trainer.strategy.reduce(counts, reduce_op="sum"))
        pl_module.log_sparse(
            {f"hellaswag/{k}": scores[k] for k in ("acc_norm", "acc")}, prog_bar=("hellaswag/acc_norm",)
        )
