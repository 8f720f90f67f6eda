"""A search whose trials cost milliseconds, to test the sweeper itself: `python tests/search_app.py
hydra.sweep.dir=DIR [hydra.sweeper.KEY=VALUE ...]` runs conf/hparams_search/optuna.yaml's study (the real sweeper,
its SQLite storage, Hydra's launcher) over `x` and `n`, each trial a function of them instead of a training run.
With rendezvous=DIR, each process's first trial waits until `parties` processes have started theirs (a minute at most:
then it fails, and the search ends)."""

import os
import time
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

ConfigStore.instance().store(
    name="search_app",
    node={
        "defaults": [{"hparams_search": "optuna"}, "_self_"],
        "seed": 0,  # the search's, as conf/train.yaml's
        "x": 1.0,
        "n": 0,
        "rendezvous": None,
        "parties": 2,
        "hydra": {
            "sweeper": {
                "study_name": "app",
                "params": {"x": "tag(log, interval(1e-4, 1))", "n": "range(0, 50, step=5)"},  # as lr_optuna's
            }
        },
    },
)
waited = False  # trials run in this process, one after another (Hydra's basic launcher)


@hydra.main(version_base="1.3", config_path="../conf", config_name="search_app")
def main(cfg: DictConfig) -> float:
    global waited
    if cfg.rendezvous and not waited:
        waited = True
        (Path(cfg.rendezvous) / str(os.getpid())).touch()
        deadline = time.monotonic() + 60
        while len(list(Path(cfg.rendezvous).iterdir())) < cfg.parties:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cfg.rendezvous}: {cfg.parties} searches never met")
            time.sleep(0.05)
    return (cfg.x - 0.01) ** 2 + cfg.n / 100  # lowest at x = 0.01, n = 0


if __name__ == "__main__":
    main()
