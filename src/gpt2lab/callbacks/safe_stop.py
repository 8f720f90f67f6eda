import logging
import signal
import subprocess
import threading

import lightning as L
from lightning.pytorch.callbacks import Callback

from gpt2lab.config import OnNonFinite, slurm_job_id
from gpt2lab.errors import RunRequeued, RunStopped, RunTerminated

log = logging.getLogger(__name__)


class SafeStop(Callback):
    """Ends training cleanly at an optimizer-step boundary, with last.ckpt written at that step, when

    - the process gets SIGINT (Ctrl-C) or SIGTERM (e.g. a cluster's pre-emption): the step under way
      finishes first; a second signal stops at once;
    - under SLURM, SIGUSR1 (`--signal=USR1@<s>` before the time limit): the same, and then the job is requeued
      (`scontrol requeue`); it restarts in the same run dir and resumes from last.ckpt by itself (train.py);
    - a step was withheld as non-finite (its StepReport's fault) and `on_nonfinite` is "stop" (the
      checkpoint then holds the last good weights); with "skip" the run goes on.

    The checkpoint is the Checkpoints callback's (it saves at a step where trainer.should_stop is set). When the
    run ends, a stop raises RunStopped (a non-zero exit) saying why and how to resume.
    """

    def __init__(self, on_nonfinite: OnNonFinite | str):
        self.on_nonfinite = OnNonFinite(on_nonfinite)
        self.reason: str | None = None  # why the run stops, on one line (RunStopped.reason)
        self.headline: str | None = None  # the reason, said for the user, with what to do about it
        self._signal: str | None = None
        self._requeue = False  # SIGUSR1 reached some rank: rank 0 requeues the job
        self._terminate = False  # SIGTERM reached some rank: the process ends, a multirun too
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
        # installed after Lightning's own handlers (set up when fit starts), replacing them: Lightning would stop
        # after the current micro-batch on SIGTERM, and save mid-step on SLURM's SIGUSR1
        signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGUSR1] if slurm_job_id() else [])
        if threading.current_thread() is threading.main_thread():
            self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in signals}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        report = outputs["report"]  # one batch is one optimizer step
        fault = report.fault
        if fault and self.on_nonfinite is OnNonFinite.skip:
            log.warning("skipped optimizer step %d: %s (train.on_nonfinite=skip)", report.step, fault)
            fault = None
        signalled = trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False)
        if signalled and report.last:  # the run is done: nothing to resume, no job to requeue
            log.warning("a signal arrived during the last step: the run completes")
            signalled = False
        if not (fault or signalled):
            return
        trainer.should_stop = True
        if signalled:  # SLURM signals each node's tasks on its own: rank 0 may not have SIGUSR1 (yet)
            self._requeue = trainer.strategy.reduce_boolean_decision(self._signal == "SIGUSR1", all=False)
            self._terminate = trainer.strategy.reduce_boolean_decision(self._signal == "SIGTERM", all=False)
        if fault:
            self.reason = (
                f"at step {report.step}: {fault} (loss {report.loss:.4g}, grad norm {report.grad_norm:.4g}, "
                f"lr {report.lr:.3g})"
            )
            self.headline = (
                f"stopped {self.reason}; the step was not applied and last.ckpt holds the weights before it. Lower "
                "optim.lr or raise scheduler.warmup_steps, or set train.on_nonfinite=skip to step over such batches"
            )
        else:
            self.reason = self.headline = (
                f"interrupted by {self._signal or 'a signal on another rank'} after step {report.step}"
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        if self.reason is None:
            return
        # last.ckpt of this step is written: Checkpoint callbacks ran at its end
        run_dir = trainer.default_root_dir
        if self._requeue and trainer.is_global_zero:
            job = slurm_job_id()
            try:
                done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                problem = done.returncode and (done.stderr.strip() or f"exit status {done.returncode}")
            except OSError as e:  # no scontrol on this node
                problem = str(e)
            if problem:
                log.error("`scontrol requeue %s` failed (%s): resume by hand (below)", job, problem)
                self._requeue = False
            else:
                log.info("requeued SLURM job %s: it resumes from last.ckpt in %s", job, run_dir)
        raise (RunRequeued if self._requeue else RunTerminated if self._terminate else RunStopped)(
            self.reason,
            f"{self.headline}.\nCheckpoint: {run_dir}/checkpoints/last.ckpt\n"
            f"Resume with: python scripts/train.py <the same overrides> ckpt_path=last hydra.run.dir={run_dir}",
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()
