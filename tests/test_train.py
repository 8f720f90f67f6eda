"""End-to-end runs of the real entry points on CPU: a Trainer, Hydra, TensorBoard files, checkpoints."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import scalars

from gpt2lab.train import train

GOLDEN = Path(__file__).parent / "golden" / "tiny_train_loss.json"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir

    run_dir = tmp_path_factory.mktemp("run")
    # pinned: the golden curve is compared number for number, so the device and precision are the same on any host
    overrides = [f"paths.output_dir={run_dir}", f"paths.data_dir={data_dir}", "model=tiny", "trainer.max_steps=30",
                 "accelerator=cpu", "accelerator.precision=32-true"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return run_dir, train(cfg)


@pytest.mark.slow
def test_tiny_run_learns_and_logs_every_step_to_tensorboard(tiny_run):
    run_dir, val_loss = tiny_run
    logged = scalars(run_dir)
    loss = logged["train/loss"]
    # every scalar at the optimizer steps done when it was measured: 1..30, validation every 25 and at the end
    assert [s for s, _ in loss] == list(range(1, 31))
    assert [s for s, _ in logged["lr"]] == list(range(1, 31))
    assert abs(loss[0][1] - math.log(50257)) < 0.3
    assert sum(v for _, v in loss[-5:]) / 5 < loss[0][1] - 1.5
    assert [s for s, _ in logged["val/loss"]] == [25, 30]
    assert val_loss == pytest.approx(logged["val/loss"][-1][1]) and val_loss < loss[0][1] - 1.5
    # the final values at the last step (not at 0, where Lightning's log_hyperparams puts them); no flat epoch chart
    assert logged["final/val_loss"] == [(30, pytest.approx(val_loss))]
    assert logged["final/tokens_seen"] == [(30, 30 * 4 * 256)] and "epoch" not in logged


@pytest.mark.slow
def test_tiny_run_matches_the_golden_loss_curve(tiny_run):
    """Guards the model, init, data order and optimizer against silent change. After an intended change,
    regenerate with GPT2LAB_UPDATE_GOLDEN=1 and say why in the commit."""
    run_dir, _ = tiny_run
    losses = [v for _, v in scalars(run_dir)["train/loss"][:20]]
    if os.environ.get("GPT2LAB_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"model": "tiny", "seed": 1337, "train_loss": losses}, indent=1) + "\n")
        pytest.skip(f"wrote {GOLDEN}: run again without GPT2LAB_UPDATE_GOLDEN to check against it")
    golden = json.loads(GOLDEN.read_text())["train_loss"]
    assert losses == pytest.approx(golden, abs=2e-3)


@pytest.mark.slow
def test_tiny_run_leaves_config_and_a_loadable_checkpoint(tiny_run):
    run_dir, _ = tiny_run
    resolved = (run_dir / "resolved_config.yaml").read_text()
    assert "name: cpu" in resolved and "precision: 32-true" in resolved
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 30 and ckpt["gpt2lab_format"] == 2
    assert ckpt["hyper_parameters"]["model"]["n_layer"] == 4
    assert ckpt["state_dict"]["model.transformer.wte.weight"].shape == (50257, 128)
    assert "model.lm_head.weight" in ckpt["state_dict"]
