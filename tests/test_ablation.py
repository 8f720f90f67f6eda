"""experiment=design_ablations: each option of conf/ablation/ swaps one of GPT-2's design choices and nothing
else, over 3 seeds. The ablation table's statistics, from a real multirun: test_lr_sweep.py."""

from pathlib import Path

import pytest
from conftest import CONF_DIR, compose_train_in
from omegaconf import OmegaConf

from gpt2lab.ablation import ablation_table
from gpt2lab.errors import DataError
from gpt2lab.sweep import flat

OPTIONS = sorted(p.stem for p in (CONF_DIR / "ablation").glob("*.yaml"))
# what each option must change, against the baseline, in the composed config (and nothing else)
CHANGES = {
    "baseline": {},
    "sinusoidal": {"model.position": "sinusoidal"},
    "rope": {"model.position": "rope"},
    "post_norm": {"model.norm_placement": "post"},
    "rmsnorm": {"model.norm": "rmsnorm"},
    "qk_norm": {"model.qk_norm": True},
    "relu2": {"model.activation": "relu2"},
    "untied": {"model.tie_embeddings": False},
    "unscaled_init": {"init.scale_residual": False},
    "muon": {"optim.muon": "<added>"},
}


def composed(tmp_path, *overrides) -> dict:
    cfg = compose_train_in(tmp_path, tmp_path, "experiment=design_ablations", *overrides)
    del cfg.module  # the LightningModule's arguments: interpolations of model, init, optim, ...
    return flat(OmegaConf.to_container(cfg, resolve=True), prefix="")  # as HParams flattens it


def test_every_option_swaps_one_design_choice_and_the_experiment_sweeps_them_all(tmp_path):
    assert OPTIONS == sorted(CHANGES)
    baseline = composed(tmp_path, "ablation=baseline")
    for option, expected in CHANGES.items():
        config = composed(tmp_path, f"ablation={option}")
        changed = {k: config.get(k) for k in config.keys() | baseline.keys() if config.get(k) != baseline.get(k)}
        if option == "muon":  # optim=muon: AdamW as before, plus the Muon group's settings under optim.muon
            assert changed and all(k.startswith("optim.muon.") for k in changed), changed
        else:
            assert changed == expected, option
    cfg = compose_train_in(tmp_path, tmp_path, "experiment=design_ablations", return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert sorted(params.ablation.split(",")) == OPTIONS and len(params.seed.split(",")) >= 3


def test_a_sweep_without_the_group_is_refused_naming_the_baseline(tmp_path):
    with pytest.raises(DataError, match=r"no run with ablation=baseline \(found none\)"):
        ablation_table(Path(tmp_path))
