"""Comparisons a researcher can trust: train.lr_scale moves every learning rate of a run, experiment=lr_sensitivity
sweeps each design option over a log-spaced lr grid × seeds, and a real multirun's summaries (the sweep's groups, the
ablation table at the default and at each option's best lr, the lr sweep) report what scipy and the definitions give
on the runs' own final val/loss, read back here from their TensorBoard events."""

import csv
import itertools
import math
import runpy
import sys
from pathlib import Path
from statistics import fmean

import lightning as L
import optuna
import pytest
import torch
import yaml
from conftest import CONF_DIR, ROOT, InjectGradient, read_summary, train_script
from hydra.utils import instantiate
from optuna.distributions import CategoricalDistribution, FloatDistribution
from scipy import stats as scipy_stats

from gpt2lab.ablation import ablation_table
from gpt2lab.lr_sweep import lr_sweep_table
from gpt2lab.search import write_results
from gpt2lab.stats import describe
from gpt2lab.sweep import read_events, run_dirs, scalar_series

OPTIONS = sorted(p.stem for p in (CONF_DIR / "ablation").glob("*.yaml"))


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_lr_scale_multiplies_every_learning_rate_of_the_run_and_the_logged_one(compose_train, optim):
    def lrs(scale: float) -> list[list[float]]:
        cfg = compose_train("model=tiny", "accelerator=cpu", f"optim={optim}", f"train.lr_scale={scale}")
        module = instantiate(cfg.module)
        module.trainer = L.Trainer(max_steps=100, accelerator="cpu", logger=False, enable_checkpointing=False)
        configs = module.configure_optimizers()
        schedules = [c["lr_scheduler"]["scheduler"] for c in (configs if isinstance(configs, list) else [configs])]
        for _ in range(10):  # to the end of the warmup (scheduler.warmup_steps=10): the peak lrs
            for schedule in schedules:
                schedule.optimizer.step()
                schedule.step()
        return [group["lr"] for s in schedules for group in s.optimizer.param_groups]

    peak = {"adamw": [6e-4, 6e-4], "muon": [6e-4, 6e-4, 0.02]}[optim]  # AdamW's 2 groups, then Muon's
    assert lrs(1.0) == pytest.approx(peak)
    assert lrs(4.0) == pytest.approx([4 * lr for lr in peak])


def test_lr_sensitivity_sweeps_every_design_option_over_a_log_spaced_grid_of_30x_or_more(compose_train):
    cfg = compose_train("experiment=lr_sensitivity", return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    scales = sorted(float(s) for s in params["train.lr_scale"].split(","))
    assert len(scales) >= 6 and scales[-1] / scales[0] >= 30 and scales[0] < 1 < scales[-1]
    ratios = [b / a for a, b in itertools.pairwise(scales)]
    assert ratios == pytest.approx([ratios[0]] * len(ratios))  # log-spaced
    assert sorted(params.ablation.split(",")) == OPTIONS and len(params.seed.split(",")) >= 3
    assert {c._target_ for c in cfg.hydra.callbacks.values()} >= {"gpt2lab.ablation.SummarizeAblation",
                                                                   "gpt2lab.lr_sweep.SummarizeLrSweep"}  # fmt: skip


class DivergeWhen(InjectGradient):
    """The run whose `run` values equal `when` diverges: a NaN in one gradient at optimizer step 2."""

    def __init__(self, when: list, run: list):
        super().__init__(at_step=2 if list(when) == list(run) else 0)


SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def lr_sweep_dir(tmp_path_factory, data_dir) -> Path:
    """experiment=lr_sensitivity cut to 2 options × 2 lrs × 3 seeds of 2 tiny steps (12 runs); every rope run at
    lr × 2 diverges (a NaN gradient at its last step)."""
    sweep_dir = tmp_path_factory.mktemp("lr_sweep")
    run = "[${hydra:runtime.choices.ablation},${train.lr_scale}]"
    diverge = f"+callbacks.fault={{_target_:test_lr_sweep.DivergeWhen,when:[rope,2.0],run:{run}}}"
    train_script("experiment=lr_sensitivity", "ablation=baseline,rope", f"seed={','.join(map(str, SEEDS))}",
                 "train.lr_scale=1,2", "accelerator=cpu", "trainer.max_steps=2", "train.val_every_n_steps=1",
                 "data.seq_len=32", "data.batch_size=2", "data.val_batches=1", "~callbacks.text_samples", diverge,
                 f"hydra.sweep.dir={sweep_dir}", data_dir=data_dir, returncode=1)  # fmt: skip
    return sweep_dir


def finals(sweep_dir: Path, option: str, scale: int) -> list[float]:
    """The runs' last val/loss, read here from their own events, seed by seed."""
    runs = [sweep_dir / f"ablation={option},seed={seed},train.lr_scale={scale}" for seed in SEEDS]
    return [scalar_series(read_events(run), "val/loss")[-1][1] for run in runs]


def welch_p(a: list[float], b: list[float]) -> float:
    return scipy_stats.ttest_ind(a, b, equal_var=False).pvalue


@pytest.mark.slow
def test_sweep_summary_gives_each_config_its_ci_over_seeds_and_welchs_p_against_the_first(lr_sweep_dir):
    assert len(run_dirs(lr_sweep_dir)) == 12 and [r["status"] for r in read_summary(lr_sweep_dir)].count("stopped") == 3
    with (lr_sweep_dir / "summary_groups.csv").open() as f:
        groups = {g["group"]: g for g in csv.DictReader(f)}
    reference = finals(lr_sweep_dir, "baseline", 1)
    assert next(iter(groups)) == "ablation=baseline,train.lr_scale=1"  # the first job's: each key's first value
    # two groups are tested against the reference (rope × 2 has no completed run): Holm's m = 2, by hand
    p = {o: welch_p(finals(lr_sweep_dir, *o), reference) for o in (("baseline", 2), ("rope", 1))}
    low, high = sorted(p.values())
    holm = {o: min(1, 2 * low) if value == low else max(min(1, 2 * low), high) for o, value in p.items()}
    for option, scale in (("baseline", 1), ("baseline", 2), ("rope", 1)):
        group, values = groups[f"ablation={option},train.lr_scale={scale}"], finals(lr_sweep_dir, option, scale)
        low, high = scipy_stats.t.interval(0.95, 2, loc=fmean(values), scale=scipy_stats.sem(values))
        assert (int(group["n"]), int(group["runs"])) == (3, 3)
        assert float(group["mean"]) == pytest.approx(fmean(values), rel=1e-12)
        assert float(group["ci95"]) == pytest.approx((high - low) / 2, rel=1e-9)
        if (option, scale) != ("baseline", 1):
            assert float(group["p"]) == pytest.approx(welch_p(values, reference), rel=1e-9)
            assert float(group["delta"]) == pytest.approx(fmean(values) - fmean(reference), rel=1e-9)
            assert float(group["p_holm"]) == pytest.approx(holm[option, scale], rel=1e-9)
            assert group["significant"] == str(holm[option, scale] < 0.05)
    assert groups["ablation=rope,train.lr_scale=2"]["n"] == "0"  # all three diverged: no completed run to compare
    assert groups["ablation=baseline,train.lr_scale=1"]["p"] == ""  # the reference: no test against itself
    table = (lr_sweep_dir / "summary.md").read_text()
    assert "| ablation=baseline,train.lr_scale=1 | 3 of 3 |" in table
    assert next(line for line in table.splitlines() if "| ablation=baseline,train.lr_scale=1 |" in line).endswith(
        "| – | – | – |"
    )
    rope = groups["ablation=rope,train.lr_scale=1"]
    assert (
        f"| ablation=rope,train.lr_scale=1 | 3 of 3 | {float(rope['mean']):.4f} ± {float(rope['ci95']):.4f} |" in table
    )


@pytest.mark.slow
def test_ablation_table_compares_options_at_the_default_lr_and_at_each_ones_best(lr_sweep_dir):
    rope_ckpt = torch.load(lr_sweep_dir / "ablation=rope,seed=1,train.lr_scale=1/checkpoints/last.ckpt",
                           weights_only=False)  # fmt: skip
    assert rope_ckpt["hyper_parameters"]["model"]["position"] == "rope"  # the option reached the model
    base = {scale: finals(lr_sweep_dir, "baseline", scale) for scale in (1, 2)}
    rope = finals(lr_sweep_dir, "rope", 1)
    rows = {r.option: r for r in ablation_table(lr_sweep_dir, alpha=0.05)}
    assert next(iter(rows)) == "baseline"
    at_default = rows["rope"]
    assert (at_default.n, at_default.val_loss) == (3, pytest.approx(fmean(rope), rel=1e-12))
    assert at_default.ci95 == pytest.approx(describe(rope).ci, rel=1e-12)
    assert at_default.delta == pytest.approx(fmean(rope) - fmean(base[1]), rel=1e-9)
    assert at_default.p == pytest.approx(welch_p(rope, base[1]), rel=1e-9)
    # at each one's best lr: rope's diverged at × 2, so its best is × 1; the baseline's, the lower of its means
    best = min((1, 2), key=lambda scale: fmean(base[scale]))
    assert (rows["baseline"].best_lr, rows["rope"].best_lr) == (best, 1)
    assert rows["rope"].best_lrs == "optim.lr=0.0006"
    assert rows["rope"].best_delta == pytest.approx(fmean(rope) - fmean(base[best]), rel=1e-9)
    assert rows["rope"].best_p == pytest.approx(welch_p(rope, base[best]), rel=1e-9)
    # one option against the baseline: Holm's m = 1 leaves each p as it is; the baseline is not tested against itself
    assert (at_default.p_holm, rows["rope"].best_p_holm) == (at_default.p, rows["rope"].best_p)
    assert at_default.significant == (at_default.p < 0.05)
    assert (rows["baseline"].p, rows["baseline"].p_holm, rows["baseline"].best_p) == (None, None, None)
    table = (lr_sweep_dir / "ablation.md").read_text()  # also written by the experiment's own Hydra callback
    assert (
        f"{at_default.delta:+.4f} ± {at_default.delta_ci95:.4f} | {at_default.p:.2g} | {at_default.p_holm:.2g} |"
        in table
    )
    assert (lr_sweep_dir / "ablation.png").stat().st_size > 10_000


@pytest.mark.slow
def test_lr_sweep_reports_each_options_best_lr_and_wortsmans_sensitivity(lr_sweep_dir):
    groups = {g.group: g for g in lr_sweep_table(lr_sweep_dir)}
    init_loss = math.log(50257)  # ℓ₀: a uniform guess over GPT-2's vocabulary
    base = {scale: fmean(finals(lr_sweep_dir, "baseline", scale)) for scale in (1, 2)}
    rope = fmean(finals(lr_sweep_dir, "rope", 1))
    assert list(groups) == ["ablation=baseline", "ablation=rope"]
    # the mean over the grid of min(ℓ(η), ℓ₀) − ℓ*: rope's diverged cell counts as ℓ₀
    assert groups["ablation=rope"].sensitivity == pytest.approx((init_loss - rope) / 2, rel=1e-9)
    assert groups["ablation=baseline"].sensitivity == pytest.approx(abs(base[1] - base[2]) / 2, rel=1e-9)
    assert groups["ablation=baseline"].best.lr == min(base, key=base.get)
    assert [(c.lr, c.diverged) for c in groups["ablation=rope"].cells] == [(1, 0), (2, 3)]
    table = (lr_sweep_dir / "lr_sensitivity.md").read_text()
    assert f"{groups['ablation=rope'].sensitivity:.4f}" in table and "(3 of 3 diverged)" in table
    assert (lr_sweep_dir / "lr_sensitivity.png").stat().st_size > 10_000


def test_search_results_group_trials_by_their_params_without_the_seed(tmp_path):
    study = optuna.create_study()
    space = {"optim.lr": FloatDistribution(1e-4, 1e-2, log=True), "seed": CategoricalDistribution([1, 2, 3])}
    for lr, seed, value in [(1e-3, 1, 6.1), (1e-3, 2, 6.3), (1e-3, 3, 6.2), (3e-3, 1, 6.0), (3e-3, 2, 6.6)]:
        study.add_trial(optuna.trial.create_trial(params={"optim.lr": lr, "seed": seed}, distributions=space,
                                                  value=value))  # fmt: skip
    write_results(study, tmp_path / "results.yaml")
    results = yaml.safe_load((tmp_path / "results.yaml").read_text())
    assert results["best_params"] == {"optim.lr": 3e-3, "seed": 1}  # one lucky seed
    first, second = results["groups"]  # by mean: 1e-3 is the better config over its seeds
    assert first["params"] == {"optim.lr": 1e-3} and (first["n"], first["mean"]) == (3, pytest.approx(6.2))
    assert first["sd"] == pytest.approx(0.1) and first["ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3))
    assert second["params"] == {"optim.lr": 3e-3} and (second["n"], second["mean"]) == (2, pytest.approx(6.3))


@pytest.mark.slow
def test_summarize_script_writes_and_prints_the_lr_sweep_and_the_ablation_at_a_given_alpha(
    lr_sweep_dir, monkeypatch, capsys
):
    for name in ("lr_sensitivity.md", "ablation.md"):
        (lr_sweep_dir / name).unlink()
    argv = ["summarize.py", str(lr_sweep_dir), "--lr-sweep", "--ablation", "ablation", "--alpha", "0.01",
            "--best-lr-from", str(lr_sweep_dir)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "scripts" / "summarize.py"), run_name="__main__")
    out = capsys.readouterr().out
    for name in ("summary.md", "lr_sensitivity.md", "ablation.md"):
        assert (lr_sweep_dir / name).read_text() in out
    assert "| Holm p < 0.01 |" in (lr_sweep_dir / "ablation.md").read_text().splitlines()[0]
