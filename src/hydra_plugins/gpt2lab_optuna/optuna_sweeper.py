"""gpt2lab's Optuna sweeper: `hydra/sweeper=optuna` (conf/hydra/sweeper/optuna.yaml). Hydra finds sweepers only
in the hydra_plugins package and imports every module there when any app starts, so this one holds no more than
the plugin class; the search itself is gpt2lab.search, imported when a search runs."""

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    def __init__(self, **search: Any):  # the keys of conf/hydra/sweeper/optuna.yaml, sampler and pruner built
        from gpt2lab.search import OptunaSearch

        self.search = OptunaSearch(**search)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config  # what validate_batch_is_legal reads
        self.search.setup(hydra_context, task_function, config)

    def sweep(self, arguments: list[str]) -> Any:
        from gpt2lab.errors import exit_on_user_error

        with exit_on_user_error():  # a bad search config: one line, as scripts print it
            return self.search.sweep(arguments, self.validate_batch_is_legal)
