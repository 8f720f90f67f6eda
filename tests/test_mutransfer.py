"""μTransfer's summary (gpt2lab.mutransfer): per parametrization and width the best lr of the grid, how far it moves
across widths, and the table and plot a real experiment=mu_transfer multirun writes when it ends."""

import itertools
import math
from pathlib import Path

import pytest
from conftest import TINY_RUN, train_script
from omegaconf import OmegaConf

from gpt2lab.mutransfer import transfers
from gpt2lab.stats import describe
from gpt2lab.sweep import RunResult, read_events, run_dirs, run_results, scalar_series

GRID = [3e-4, 6e-4, 1.2e-3, 2.4e-3, 4.8e-3, 9.6e-3]


def test_transfer_finds_each_widths_best_lr_and_how_many_grid_steps_it_moves(compose_train):
    """Losses made by hand, a parabola in log2(lr) around a chosen best per width: under sp the best falls a grid
    step per doubling of width (shift 2, drift −2), under mup it moves once (shift 1); one diverged run counts as the
    initial loss ln(V) and never wins."""
    best_at = {("sp", 32): 4, ("sp", 64): 3, ("sp", 128): 2, ("mup", 32): 2, ("mup", 64): 2, ("mup", 128): 3}
    results = []
    for (parametrization, width), best in best_at.items():
        config = compose_train("model=tiny", f"model.parametrization={parametrization}", f"model.n_embd={width}")
        for i, lr in enumerate(GRID):
            for seed in (1, 2):
                run = config.copy()
                run.optim.lr, run.seed = lr, seed
                diverged = parametrization == "mup" and width == 32 and i == 5 and seed == 2
                loss = None if diverged else 5 + 0.1 * (i - best) ** 2 + 0.01 * seed
                results.append(RunResult(Path(f"{parametrization}-{width}-{i}-{seed}"), "", {}, run, loss, diverged))

    sp, mup = transfers(results)  # sp first, whatever the order of the runs
    assert (sp.parametrization, mup.parametrization) == ("sp", "mup")
    assert sp.widths == mup.widths == [32, 64, 128] and sp.grid == GRID
    assert [g.best.lr for g in sp.groups] == [GRID[4], GRID[3], GRID[2]]
    assert [g.best.lr for g in mup.groups] == [GRID[2], GRID[2], GRID[3]]
    assert (sp.shift, sp.drift, mup.shift, mup.drift) == (2, -2.0, 1, 1.0)
    assert sp.on_edge == mup.on_edge == []
    best = sp.groups[0].best.loss  # the two seeds' losses at width 32's best lr
    assert (best.n, best.mean) == (2, pytest.approx(5.015)) and best.ci == describe([5.01, 5.02]).ci
    cell = mup.groups[0].cells[5]
    assert cell.diverged == 1 and cell.losses[1] == pytest.approx(math.log(50257))


@pytest.mark.slow
def test_mu_transfer_multirun_writes_the_table_and_plot_from_its_runs_own_losses(tmp_path, data_dir):
    """experiment=mu_transfer cut to 2 widths × 2 lrs × 1 seed of 2 tiny steps, under sp and mup (8 runs): its
    callback's table names each (parametrization, width)'s best lr, the one whose run ended lowest in TensorBoard."""
    sweep_dir = tmp_path / "mu_transfer"
    train_script("experiment=mu_transfer", "model.n_embd=32,64", "optim.lr=1e-3,4e-3", "seed=1", *TINY_RUN,
                 f"hydra.sweep.dir={sweep_dir}", data_dir=data_dir)  # fmt: skip
    assert len(run_dirs(sweep_dir)) == 8 == len(run_results(sweep_dir))
    final = {}
    for run in run_dirs(sweep_dir):
        config = OmegaConf.load(run / ".hydra" / "config.yaml")
        key = (config.model.parametrization, config.model.n_embd, config.optim.lr)
        final[key] = scalar_series(read_events(run), "val/loss")[-1][1]  # (step, value, wall time)
    table = (sweep_dir / "mu_transfer.md").read_text()
    for parametrization in ("sp", "mup"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {parametrization} |"))
        for width in (32, 64):
            lr = min((1e-3, 4e-3), key=lambda lr: final[parametrization, width, lr])
            assert f"{lr:g} ({final[parametrization, width, lr]:.4f})" in row
    assert (sweep_dir / "mu_transfer.png").stat().st_size > 10_000
    assert (sweep_dir / "lr_sensitivity.md").exists()  # each (parametrization, width) as an lr sweep too
    assert len((sweep_dir / "mu_transfer.csv").read_text().splitlines()) == 1 + 8
    assert set(itertools.product(("sp", "mup"), (32, 64), (1e-3, 4e-3))) == set(final)
