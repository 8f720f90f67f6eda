"""experiment=design_ablations: each option of conf/ablation/ swaps one of GPT-2's design choices and nothing
else, and the ablation table compares the options with the baseline over seeds, from the runs' own events."""

import subprocess
import sys
from pathlib import Path
from statistics import mean

import pytest
import torch
from conftest import CONF_DIR, ROOT, compose_train_in
from omegaconf import OmegaConf

from gpt2lab.ablation import ablation_table
from gpt2lab.errors import DataError
from gpt2lab.sweep import flat, read_events, scalar_series

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
    assert sorted(params.ablation.split(",")) == OPTIONS and len(params.seed.split(",")) >= 2


@pytest.mark.slow
def test_ablation_table_compares_each_option_with_the_baseline_over_seeds(tmp_path, data_dir):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "scripts/train.py", "experiment=design_ablations", "ablation=baseline,rope", "seed=1,2",
           "trainer.max_steps=2", "train.val_every_n_steps=2", "data.seq_len=32", "data.batch_size=2",
           "data.val_batches=2", "~callbacks.text_samples", f"paths.data_dir={data_dir}",
           f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    final = {  # each run's last val/loss, read here from its own events
        run.name: scalar_series(read_events(run), "val/loss")[-1][1] for run in sweep_dir.glob("ablation=*")
    }
    assert sorted(final) == ["ablation=baseline,seed=1", "ablation=baseline,seed=2", "ablation=rope,seed=1",
                             "ablation=rope,seed=2"]  # fmt: skip
    rope_ckpt = torch.load(sweep_dir / "ablation=rope,seed=1/checkpoints/last.ckpt", weights_only=False)
    assert rope_ckpt["hyper_parameters"]["model"]["position"] == "rope"  # the option reached the model
    assert not any("wpe" in k for k in rope_ckpt["state_dict"])

    base = [final[f"ablation=baseline,seed={s}"] for s in (1, 2)]
    rope = [final[f"ablation=rope,seed={s}"] for s in (1, 2)]
    assert base[0] != base[1]  # the seeds differ
    rows = {r.option: r for r in ablation_table(sweep_dir)}  # as summarize.py --ablation ablation writes it
    assert list(rows) == ["baseline", "rope"] or list(rows)[0] == "baseline"
    assert rows["rope"].val_loss == pytest.approx(mean(rope)) and rows["rope"].seeds == 2
    assert rows["rope"].delta == pytest.approx(mean(rope) - mean(base))
    spreads = (max(rope) - min(rope)) / 2 + (max(base) - min(base)) / 2
    assert rows["rope"].spread + rows["baseline"].spread == pytest.approx(spreads)
    assert rows["rope"].exceeds_spread == (abs(mean(rope) - mean(base)) > spreads)
    table = (sweep_dir / "ablation.md").read_text()  # also written by the experiment's own Hydra callback
    assert f"{mean(rope) - mean(base):+.4f}" in table and (sweep_dir / "ablation.png").stat().st_size > 10_000

    with pytest.raises(DataError, match="no finished run with ablation=gpt3"):
        ablation_table(sweep_dir, baseline="gpt3")


def test_a_sweep_without_the_group_is_refused_naming_the_baseline(tmp_path):
    with pytest.raises(DataError, match=r"no finished run with ablation=baseline \(found none\)"):
        ablation_table(Path(tmp_path))
