"""Errors a user causes and can fix (a config value, a data dir, a download, a checkpoint): every script prints
their message as one line and exits non-zero; anything else is a bug and keeps its traceback."""

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A problem the user can fix; the message names the value, the file and the fix."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key and the fix."""


class DataError(UserError, ValueError):
    """Data that cannot be read or prepared: a missing or corrupt shard, a failed download, a bad source file."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, not gpt2lab's, of another format or of another model size."""


def user_error_message(error: BaseException) -> str | None:
    """The one line a script prints for `error` when a UserError caused it; None for anything else (a bug)."""
    cause = error
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__  # Hydra's instantiate wraps what a constructor raises
    if cause is None:
        return None
    kind = "config error" if isinstance(cause, ConfigError) else "error"
    return f"{kind}: {cause}"


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """For scripts' main(): a UserError ends the process with its message on one line and exit status 1."""
    try:
        yield
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            raise  # a bug: its traceback
        raise SystemExit(message) from None


class RunStopped(SystemExit):
    """Training ended early (a signal, a non-finite step) after saving a checkpoint: exits non-zero, printing
    `message` (why, the checkpoint, how to resume). `reason` is why on one line ("at step 4: non-finite gradient
    norm (...)", "interrupted by SIGINT after step 7"): what a sweep records, as data rather than text parsed back."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class RunTerminated(RunStopped):
    """Stopped by SIGTERM (a cluster pre-empting the job, `kill`): the process is asked to end, so a multirun ends
    here too, rather than starting its next run (a Ctrl-C, SIGINT, stops the run under way only)."""


class RunRequeued(RunStopped):
    """Stopped for SLURM to requeue the job (SIGUSR1 before its time limit): the same job starts again and resumes
    from last.ckpt, so a sweep must not count this run as ended (its launcher waits for the requeued job)."""
