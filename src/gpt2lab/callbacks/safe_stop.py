import logging
import signal
import threading
from enum import Enum
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class OnNonFinite(str, Enum):
    stop = "stop"
    skip = "skip"


class SafeStop(Callback):
    """Ends training cleanly at an optimizer-step boundary, after writing last.ckpt, when

    - the process gets SIGINT (Ctrl-C) or SIGTERM (e.g. a cluster's pre-emption): the step under way
      finishes first; a second signal stops at once;
    - a step had a non-finite loss or gradient norm and `on_nonfinite` is "stop" (the module never
      applies such a step, so the checkpoint holds the last good weights); with "skip" it goes on.

    `reason` says why it stopped (None when it did not); train() turns it into a non-zero exit.
    """

    def __init__(self, on_nonfinite: OnNonFinite | str):
        self.on_nonfinite = OnNonFinite(on_nonfinite)
        self.reason: str | None = None
        self.checkpoint: Path | None = None
        self._signal: str | None = None
        self._previous_handlers: dict = {}

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:  # asked twice: stop now
            self._restore_handlers()
            raise KeyboardInterrupt
        self._signal = signal.Signals(signum).name
        log.warning("received %s: stopping after the current optimizer step (again to stop at once)", self._signal)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step
        # installed after Lightning's own SIGTERM handler (set up when fit starts), replacing it: Lightning
        # would stop after the current micro-batch, which under gradient accumulation is mid-step
        if threading.current_thread() is threading.main_thread():
            self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:
            return  # a micro-batch inside an optimizer step
        self._step = trainer.global_step
        bad = pl_module.nonfinite
        pl_module.nonfinite = None
        if bad and self.on_nonfinite is OnNonFinite.skip:
            log.warning("skipped optimizer step %d: %s (train.on_nonfinite=skip)", bad["step"], bad["what"])
            bad = None
        signalled = trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False)
        if not (bad or signalled):
            return
        self.checkpoint = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        trainer.save_checkpoint(self.checkpoint)
        trainer.should_stop = True
        if bad:
            self.reason = (
                f"stopped at step {bad['step']}: {bad['what']} (loss {bad['loss']:.4g}, lr {bad['lr']:.3g}); the step "
                "was not applied and last.ckpt holds the weights before it. Lower optim.lr or raise "
                "scheduler.warmup_steps, or set train.on_nonfinite=skip to step over such batches"
            )
        else:
            self.reason = f"interrupted by {self._signal or 'a signal on another rank'} after step {trainer.global_step}"

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()
