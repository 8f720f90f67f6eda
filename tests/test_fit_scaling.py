"""Scaling-law fits: a synthetic sweep with a known law E + A·N^(−α) and Gaussian seed noise is recovered within the
bootstrap CIs, the hold-out check accepts the law's own largest size and rejects one moved off it, N is Kaplan's
non-embedding count, and a real multirun is read back into (N, seed, final val/loss)."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from conftest import ROOT, compose_train_in
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

from gpt2lab.errors import DataError
from gpt2lab.model import GPTConfig
from gpt2lab.scaling import Law, RunPoint, fit_scaling, non_embedding_params, read_sweep, summary
from gpt2lab.sweep import write_run_status

TRUE = Law(E=1.8, A=40.0, alpha=0.3)  # Chinchilla-like: α ≈ 0.3, the reducible part 1.6 → 0.3 over the sweep
SIGMA = 0.01  # seed noise of a final val/loss
WIDTHS = (32, 64, 128, 256, 384, 512)  # of model=tiny (4 layers): N = 5.1e4 … 1.3e7


def kaplan_n(d: int, n_layer: int = 4) -> int:
    """Non-embedding parameters of a GPT-2 block stack, counted by hand: c_attn 3d² + 3d, attn.c_proj d² + d,
    c_fc 4d² + 4d, mlp.c_proj 4d² + d, two LayerNorms 4d; then ln_f 2d."""
    return n_layer * (12 * d * d + 13 * d) + 2 * d


def synthetic_points(widths=WIDTHS, seeds=4, law=TRUE, sigma=SIGMA, data_seed=0, tokens=None) -> list[RunPoint]:
    rng = np.random.default_rng(data_seed)
    return [
        RunPoint(
            run=f"d{d}-s{s}",
            seed=s,
            n_params=kaplan_n(d),
            tokens=tokens,
            val_loss=float(law(kaplan_n(d)) + sigma * rng.standard_normal()),
        )
        for d in widths
        for s in range(seeds)
    ]


@pytest.mark.parametrize(
    "switches, n",
    [
        ({}, kaplan_n(48, 3)),
        ({"tie_embeddings": False}, kaplan_n(48, 3)),  # the untied lm_head is an embedding too
        ({"position": "rope"}, kaplan_n(48, 3)),  # no wpe, and Rotary's tables are buffers
        ({"norm_placement": "post"}, kaplan_n(48, 3) - 2 * 48),  # no ln_f
    ],
)
def test_non_embedding_params_are_the_blocks_and_final_norm_of_any_variant(switches, n):
    config = GPTConfig(block_size=64, vocab_size=50257, n_layer=3, n_head=4, n_embd=48, **switches)
    assert non_embedding_params(config) == n


def test_fit_recovers_a_known_law_within_narrow_cis():
    fit = fit_scaling(synthetic_points(), n_boot=500, seed=0)
    for name in ("E", "A", "alpha"):
        true, (low, high) = getattr(TRUE, name), fit.ci[name]
        assert low <= true <= high, (name, fit.ci[name])
        assert low <= getattr(fit.law, name) <= high
        assert true * 0.5 < low and high < true * 1.5, (name, fit.ci[name])  # informative, not just wide
    assert fit.failed_fits == 0


def test_bootstrap_resamples_only_seed_noise_within_each_size():
    """Sizes whose seeds all reach the same loss, off the law by a fixed amount each: resampling a size's own seeds
    changes nothing, so the CIs shrink to the point (resampling across sizes would reweight them and move the fit).
    The CIs are of seed noise alone; that the law's form is wrong does not widen them."""
    offsets = {d: 0.05 * (-1) ** i for i, d in enumerate(WIDTHS)}
    points = [RunPoint(**{**vars(p), "val_loss": TRUE(p.n_params) + offsets[d]})
              for p, d in zip(synthetic_points(), [d for d in WIDTHS for _ in range(4)])]  # fmt: skip
    fit = fit_scaling(points, n_boot=50, seed=0)
    assert fit.law.alpha != pytest.approx(TRUE.alpha, rel=1e-3)  # the offsets moved the fit off the law
    for name in ("E", "A", "alpha"):  # each refit ends where the fit did, up to curve_fit's tolerance
        assert fit.ci[name] == pytest.approx([getattr(fit.law, name)] * 2, rel=1e-5), name


def test_holdout_interval_holds_the_largest_size_and_rejects_one_moved_off_the_law():
    points = synthetic_points()
    holdout = fit_scaling(points, n_boot=500, seed=0).holdout
    largest = [p.val_loss for p in points if p.n_params == kaplan_n(WIDTHS[-1])]
    assert holdout.x == kaplan_n(WIDTHS[-1]) and holdout.seeds == len(largest)
    assert holdout.measured == pytest.approx(np.mean(largest))
    assert holdout.interval[0] < holdout.measured < holdout.interval[1] and holdout.inside
    assert holdout.interval[0] < TRUE(holdout.x) < holdout.interval[1]
    assert holdout.law.alpha != fit_scaling(points, n_boot=10).law.alpha  # fitted without the largest size

    # 0.1 below the law at the largest size: the loss a broken extrapolation would promise
    moved = [p if p.n_params != holdout.x else RunPoint(**{**vars(p), "val_loss": p.val_loss - 0.1}) for p in points]
    off = fit_scaling(moved, n_boot=500, seed=0).holdout
    assert off.predicted == pytest.approx(holdout.predicted)  # the largest size took no part in its own prediction
    assert not off.inside and off.measured < off.interval[0]


def test_prediction_interval_widens_with_the_seed_noise_of_fewer_held_out_seeds():
    """The interval is for the mean of the held-out size's m seeds: with 2 seeds its noise is twice that of 8."""
    fitted = [p for p in synthetic_points() if p.n_params != kaplan_n(WIDTHS[-1])]
    largest = synthetic_points(widths=WIDTHS[-1:], seeds=8, data_seed=1)
    two, eight = (fit_scaling(fitted + largest[:m], n_boot=500, seed=0).holdout for m in (2, 8))
    assert (two.seeds, eight.seeds) == (2, 8) and two.predicted == eight.predicted  # the same fit of the others
    width = {m: h.interval[1] - h.interval[0] for m, h in ((2, two), (8, eight))}
    assert width[2] > 1.3 * width[8], width  # 1.46 here; the fit's own spread is alike for both


def test_compute_law_of_a_fixed_token_budget_is_the_params_law_rescaled():
    """At one D for every run, L(C) with C = 6·N·D is L(N) with A·(6D)^α: the same E and α."""
    tokens = 102_400
    points = synthetic_points(tokens=tokens)
    by_n, by_c = fit_scaling(points, n_boot=20), fit_scaling(points, scale="compute", n_boot=20)
    assert by_c.law.E == pytest.approx(by_n.law.E, rel=1e-4)
    assert by_c.law.alpha == pytest.approx(by_n.law.alpha, rel=1e-4)
    assert by_c.law.A == pytest.approx(by_n.law.A * (6 * tokens) ** by_n.law.alpha, rel=1e-3)


def test_holdout_rejects_and_warns_of_runs_too_short_for_a_power_law():
    """Real final losses of 60-step runs (experiment=scaling_sweep at n_embd 16…64, 2 seeds, 4 × 32 tokens a step):
    barely trained, the loss falls faster the larger the model, no law of the form E + A·N^(−α) with E ≥ 0."""
    losses = {16: (10.4737, 10.4571), 24: (10.2876, 10.3197), 32: (10.1134, 10.1356), 48: (9.7959, 9.7698),
              64: (9.3806, 9.4068)}  # fmt: skip
    points = [
        RunPoint(f"d{d}-s{s}", s, kaplan_n(d), 7680, loss) for d, pair in losses.items() for s, loss in enumerate(pair)
    ]
    fit = fit_scaling(points, n_boot=200)
    assert not fit.holdout.inside and fit.holdout.measured < fit.holdout.interval[0]
    assert fit.warnings == ["E is at its bound 0: the loss does not level off within the sweep (yet)"]
    assert "warning: E is at its bound 0" in summary(fit) and "OUTSIDE" in summary(fit)


def test_a_nearly_flat_sweep_converges_to_an_unidentified_exponent_and_a_holdout_inside_its_interval():
    """Real final losses of experiment=scaling_sweep (μP, widths 32…128, 3 seeds, 200 steps of 8 × 64 tokens):
    16× N buys 0.09 nats. The fit must still converge (curve_fit's default 300 evaluations did not) and say, by a
    wide CI of α, that the exponent is not identified."""
    losses = {32: (6.4505, 6.5110, 6.4834), 48: (6.4366, 6.4332, 6.4544), 64: (6.4393, 6.4794, 6.4429),
              96: (6.3996, 6.3876, 6.3963), 128: (6.3851, 6.3921, 6.4040)}  # fmt: skip
    points = [
        RunPoint(f"d{d}-s{s}", s, kaplan_n(d), 102_400, loss)
        for d, seeds in losses.items()
        for s, loss in enumerate(seeds)
    ]
    fit = fit_scaling(points, n_boot=200)
    low, high = fit.ci["alpha"]
    assert 0 < fit.law.alpha < 0.05 and high / low > 10  # a small exponent, known to no better than a decade
    assert fit.holdout.inside and fit.holdout.interval[0] < fit.holdout.measured < fit.holdout.interval[1]


def test_fit_refuses_too_few_sizes_a_lone_seed_and_mixed_settings():
    with pytest.raises(DataError, match="2 model sizes .*needs at least 3"):
        fit_scaling(synthetic_points(widths=(32, 64)), n_boot=10)
    lone = synthetic_points(widths=(32, 64, 128), seeds=2)[:-1]
    with pytest.raises(DataError, match="has 1 completed run \\(d128-s0\\).*at least 2 seeds per size"):
        fit_scaling(lone, n_boot=10)
    mixed = [RunPoint(**{**vars(p), "setting": f"optim.lr={p.seed}e-3"}) for p in synthetic_points(seeds=2)]
    with pytest.raises(DataError, match="differ in more than their seed \\(optim.lr=0e-3 \\| optim.lr=1e-3\\)"):
        fit_scaling(mixed, n_boot=10)


def write_sweep(sweep_dir: Path, points: list[RunPoint], widths: list[int], data_dir: Path) -> None:
    """A sweep dir as a multirun over model.n_embd and seed leaves it, each run's final val/loss given: Hydra's
    config and overrides (the real composed config), status.json, and TensorBoard events of val/loss."""
    cfg = compose_train_in(sweep_dir, data_dir, "model=tiny", return_hydra_config=True, resolve=False)
    for num, (point, width) in enumerate(zip(points, widths)):
        run_dir = sweep_dir / point.run
        (run_dir / ".hydra").mkdir(parents=True)
        cfg.model.n_embd, cfg.seed, cfg.hydra.job.num = width, point.seed, num
        OmegaConf.save({k: v for k, v in cfg.items() if k != "hydra"}, run_dir / ".hydra" / "config.yaml")
        OmegaConf.save({"hydra": cfg.hydra}, run_dir / ".hydra" / "hydra.yaml")
        OmegaConf.save(
            ["model=tiny", f"model.n_embd={width}", f"seed={point.seed}"], run_dir / ".hydra" / "overrides.yaml"
        )
        with SummaryWriter(run_dir / "tensorboard") as writer:
            for step, loss in ((100, point.val_loss + 0.5), (200, point.val_loss)):  # the last one counts
                writer.add_scalar("val/loss", loss, step)
            if point.tokens is not None:
                writer.add_scalar("final/tokens_seen", point.tokens, 200)
        write_run_status(run_dir, "completed")


def test_fit_script_writes_fit_json_and_plot_and_names_the_runs_left_out(tmp_path, data_dir, monkeypatch, capsys):
    widths = [d for d in WIDTHS[:5] for _ in range(3)]
    points = synthetic_points(widths=WIDTHS[:5], seeds=3, tokens=102_400)
    write_sweep(tmp_path, points, widths, data_dir)
    write_run_status(tmp_path / points[-1].run, "failed", "ConfigError: bad value")  # a run the sweep lost
    monkeypatch.setattr(sys, "argv", ["fit_scaling.py", str(tmp_path), "--resamples", "300"])
    runpy.run_path(str(ROOT / "scripts" / "fit_scaling.py"), run_name="__main__")

    record = json.loads((tmp_path / "fit.json").read_text())
    assert [r["run"] for r in record["runs"]] == [p.run for p in points[:-1]]
    assert [(r["N"], r["seed"]) for r in record["runs"]] == [(p.n_params, p.seed) for p in points[:-1]]
    assert [r["val_loss"] for r in record["runs"]] == pytest.approx([p.val_loss for p in points[:-1]], rel=1e-6)
    assert record["left_out"] == [{"run": points[-1].run, "why": "failed: ConfigError: bad value"}]
    for name in ("E", "A", "alpha"):
        assert record["ci95"][name][0] <= getattr(TRUE, name) <= record["ci95"][name][1], name
    holdout = record["holdout"]
    assert holdout["x"] == kaplan_n(WIDTHS[4]) and holdout["seeds"] == 2 and holdout["inside"] is True
    assert "m seeds" in holdout["interval_covers"]
    assert matplotlib.image.imread(tmp_path / "fit.png").shape[:2] == (540, 840)  # 7 × 4.5 inches at 120 dpi
    out = capsys.readouterr().out
    assert "hold-out: fitted without N = 7.1e+06" in out and "inside" in out
    assert f"left out: {points[-1].run} (failed: ConfigError: bad value)" in out


def test_fit_script_fails_in_one_line_without_completed_runs(tmp_path, data_dir, monkeypatch):
    points = synthetic_points(widths=(32, 64, 128), seeds=1)
    write_sweep(tmp_path, points, [32, 64, 128], data_dir)
    for point in points:
        write_run_status(tmp_path / point.run, "stopped", "at step 3: non-finite loss")
    monkeypatch.setattr(sys, "argv", ["fit_scaling.py", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "scripts" / "fit_scaling.py"), run_name="__main__")
    message = str(exit_.value)
    assert message.startswith("error: no completed runs under") and "\n" not in message
    assert "d32-s0: stopped: at step 3: non-finite loss" in message


@pytest.mark.slow  # a real multirun of 4 runs: ~10 s of CPU, more on a busy machine
def test_read_sweep_of_a_real_multirun_gives_each_runs_n_seed_and_final_loss(tmp_path, data_dir, monkeypatch):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "scripts/train.py", "-m", "model=tiny", "model.n_embd=32,64", "seed=1,2",
           "accelerator=cpu", "trainer.max_steps=2", "data.seq_len=32", "data.batch_size=2", "data.val_batches=1",
           "~callbacks.text_samples", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    write_run_status(sweep_dir / "model.n_embd=64,seed=2", "failed", "RuntimeError: out of memory")

    points, left_out = read_sweep(sweep_dir)
    assert [(p.run, p.n_params, p.seed, p.tokens) for p in points] == [
        ("model.n_embd=32,seed=1", kaplan_n(32), 1, 2 * 2 * 32),  # steps × batch × seq_len
        ("model.n_embd=32,seed=2", kaplan_n(32), 2, 2 * 2 * 32),
        ("model.n_embd=64,seed=1", kaplan_n(64), 1, 2 * 2 * 32),
    ]
    assert left_out == [("model.n_embd=64,seed=2", "failed: RuntimeError: out of memory")]
    for point in points:  # the loss each run reported at its end, in its own log
        logged = (sweep_dir / point.run / "train.log").read_text().split("final val/loss ")[1].split(";")[0]
        assert point.val_loss == pytest.approx(float(logged), abs=1e-4)
    assert points[0].val_loss != points[1].val_loss  # the seeds differ
    assert {p.setting for p in points} == {
        f"model=tiny,model.n_embd={d},accelerator=cpu,trainer.max_steps=2,data.seq_len=32,data.batch_size=2,"
        f"data.val_batches=1,~callbacks.text_samples=null,paths.data_dir={data_dir}"
        for d in (32, 64)
    }

    monkeypatch.setattr(sys, "argv", ["fit_scaling.py", str(sweep_dir)])
    with pytest.raises(SystemExit, match="^error: 2 model sizes \\(N = 5.09e\\+04, 2e\\+05\\): .*at least 3"):
        runpy.run_path(str(ROOT / "scripts" / "fit_scaling.py"), run_name="__main__")
