"""Bad input, faults and interruptions: each provoked for real, with the message asserted and nothing lost."""

import math
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CONF_DIR, ROOT, inject_gradient
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt2lab.checkpoint import AtomicCheckpointIO
from gpt2lab.errors import CheckpointError
from gpt2lab.train import RunStopped, train

FAST = ["model=tiny", "accelerator=cpu", "data.seq_len=32", "data.val_batches=1"]  # steps of a few ms


def train_steps(run_dir: Path, tag: str = "train/loss") -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def compose_run(run_dir: Path, data_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            "train", overrides=[f"paths.output_dir={run_dir}", f"paths.data_dir={data_dir}", *FAST, *overrides]
        )


NAN_AT_4 = inject_gradient(4)


@pytest.mark.slow
def test_nonfinite_gradient_stops_the_run_keeping_the_last_good_weights(tmp_path, data_dir):
    with pytest.raises(
        RunStopped, match=r"stopped at step 4: non-finite gradient norm \(loss [\d.]+, grad norm nan, lr [\d.e-]+\)"
    ):
        train(compose_run(tmp_path / "bad", data_dir, "trainer.max_steps=10", NAN_AT_4))
    train(compose_run(tmp_path / "good", data_dir, "trainer.max_steps=3"))  # the same run, stopped before the fault
    bad, good = load(tmp_path / "bad/checkpoints/last.ckpt"), load(tmp_path / "good/checkpoints/last.ckpt")
    for name, weight in good["state_dict"].items():
        assert torch.equal(bad["state_dict"][name], weight), name
    # resuming that checkpoint with another model size names both
    with pytest.raises(CheckpointError, match="'n_layer': 4.*this run builds.*'n_layer': 2"):
        train(compose_run(tmp_path / "other", data_dir, "trainer.max_steps=6", "model.n_layer=2",
                          f"ckpt_path={tmp_path / 'bad/checkpoints/last.ckpt'}"))  # fmt: skip


@pytest.mark.slow
def test_nonfinite_gradient_is_skipped_under_the_skip_policy(tmp_path, data_dir):
    val_loss = train(compose_run(tmp_path, data_dir, "trainer.max_steps=6", "train.on_nonfinite=skip", NAN_AT_4))
    grad_norm = dict(train_steps(tmp_path, "train/grad_norm"))
    assert [s for s, v in grad_norm.items() if math.isnan(v)] == [4]  # NaN at 4 only
    weights = load(tmp_path / "checkpoints/last.ckpt")["state_dict"]
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not math.isnan(val_loss) and val_loss < 11


def start_training(cwd: Path, data_dir: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "scripts/train.py"), f"paths.data_dir={data_dir}", *FAST, *overrides]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc: subprocess.Popen, step: int, timeout: float = 180) -> tuple[list[str], threading.Thread]:
    """Read the output until the progress bar shows `step` finished batches; the list keeps filling until the
    process ends (join the thread returned to have all of it)."""
    seen, done = [], threading.Event()

    def read():
        for chunk in iter(lambda: proc.stdout.read(256), ""):
            seen.append(chunk)
            if any(int(n) >= step for n in re.findall(r"\| *(\d+)/\d+ \[", "".join(seen)[-2000:])):
                done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert done.wait(timeout), "".join(seen)[-3000:]
    return seen, reader


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_checkpoint_after_the_current_step_and_says_how_to_resume(tmp_path, data_dir, sig):
    proc = start_training(
        tmp_path, data_dir, "trainer.max_steps=100000", "train.total_batch_size=256", "hydra.run.dir=run"
    )
    seen, reader = wait_for_step(proc, 3)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    reader.join(timeout=60)  # the output to its end
    err = "".join(seen)
    assert proc.returncode != 0
    assert f"interrupted by {sig.name} after step" in err and "Resume with: python scripts/train.py" in err
    run_dir = tmp_path / "run"
    assert f"ckpt_path=last hydra.run.dir={run_dir}" in err
    step = load(run_dir / "checkpoints/last.ckpt")["global_step"]
    assert 3 <= step < 100000
    assert [s for s, _ in train_steps(run_dir)] == list(range(1, step + 1))  # every finished step is kept

    resumed = start_training(tmp_path, data_dir, f"trainer.max_steps={step + 2}", "train.total_batch_size=256",
                             "ckpt_path=last", f"hydra.run.dir={run_dir}")  # fmt: skip
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert [s for s, _ in train_steps(run_dir)] == list(range(1, step + 3))


@pytest.mark.slow
def test_runs_started_at_once_get_their_own_dirs(tmp_path, data_dir):
    procs = [start_training(tmp_path, data_dir, "trainer.max_steps=1", f"seed={seed}") for seed in (1, 2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    runs = sorted((tmp_path / "outputs/runs").iterdir())
    assert len(runs) == 2
    assert sorted(int(re.search(r"seed: (\d+)", (r / ".hydra/config.yaml").read_text())[1]) for r in runs) == [1, 2]


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")  # a write that dies half way


def test_interrupted_checkpoint_write_leaves_the_previous_checkpoint_whole(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000), "x": Unpicklable()}, path)
    assert load(path)["step"] == 1 and torch.equal(load(path)["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class KeepFinalWeights(L.Callback):
    final: dict = {}

    def on_train_end(self, trainer, pl_module):
        KeepFinalWeights.final = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_last_checkpoint_holds_the_final_step_when_it_is_not_a_multiple_of_the_period(tmp_path, data_dir):
    keep = f"+callbacks.keep={{_target_:{__name__}.KeepFinalWeights}}"
    train(compose_run(tmp_path, data_dir, "trainer.max_steps=7", "callbacks.model_checkpoint.every_n_train_steps=5",
                      "~callbacks.text_samples", keep))  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step000005.ckpt"]
    last, periodic = load(tmp_path / "checkpoints/last.ckpt"), load(tmp_path / "checkpoints/step000005.ckpt")
    assert last["global_step"] == 7 and periodic["global_step"] == 5
    assert last["state_dict"].keys() == KeepFinalWeights.final.keys()
    for name, weight in KeepFinalWeights.final.items():
        assert torch.equal(last["state_dict"][name], weight), name


def test_the_trainer_writes_checkpoints_atomically(compose_train):
    trainer = instantiate(compose_train("accelerator=cpu").trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


@pytest.mark.parametrize("override", ["train.on_nonfinite=maybe", "train.val_every_n_steps=often"])
def test_bad_values_of_the_train_node_are_refused_at_compose_time(compose_train, override):
    with pytest.raises(ConfigCompositionException, match=re.escape(override)):
        compose_train(override)


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_steps=abc", "config error: trainer.max_steps='abc': expected an integer"),
        ("ckpt_path=missing.ckpt", "config error: ckpt_path=missing.ckpt: no checkpoint at missing.ckpt"),
    ],
)
def test_config_error_is_one_line_without_traceback(tmp_path, data_dir, override, message):
    proc = start_training(tmp_path, data_dir, override)
    err, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "outputs/runs").exists() or not list((tmp_path / "outputs/runs").glob("*/checkpoints"))


@pytest.mark.slow
def test_fp16_overflow_steps_are_skipped_by_the_scaler_not_stopped_as_faults(tmp_path, data_dir):
    # fp16 with a gradient scaler, as on a V100 or T4; here on the CPU (Lightning only builds it for CUDA)
    fp16 = ("trainer.plugins=[{_target_:lightning.pytorch.plugins.MixedPrecision,precision:16-mixed,device:cpu,"
            "scaler:{_target_:torch.amp.GradScaler,device:cpu}}]")  # fmt: skip
    inf_at_2 = inject_gradient(2, "inf")
    train(compose_run(tmp_path, data_dir, fp16, "trainer.precision=null", "accelerator.attention=eager",
                      "trainer.max_steps=4", "~callbacks.text_samples", inf_at_2))  # fmt: skip
    grad_norm = dict(train_steps(tmp_path, "train/grad_norm"))
    assert list(grad_norm) == [1, 2, 3, 4] and grad_norm[2] == float("inf")
    assert grad_norm[1] < 100  # unscaled: the true norm (~5), not the scaled one (× 2^16)
    assert all(0 < grad_norm[s] < float("inf") for s in (1, 3, 4))  # clipping and the norm saw unscaled gradients
    ckpt = load(tmp_path / "checkpoints/last.ckpt")
    assert ckpt["global_step"] == 4
    assert ckpt["MixedPrecision"]["scale"] == 2.0**16 / 2  # the scaler halved its scale once, at the overflow
    adam_steps = {int(state["step"]) for state in ckpt["optimizer_states"][0]["state"].values()}
    assert adam_steps == {3}  # 4 steps, the overflow one skipped
    assert all(torch.isfinite(w).all() for w in ckpt["state_dict"].values())


def test_fp16_is_refused_off_cuda(compose_train):
    from gpt2lab.config import check_config
    from gpt2lab.errors import ConfigError

    with pytest.raises(ConfigError, match="accelerator.precision=16-mixed on cpu: .*use bf16-mixed or 32-true"):
        check_config(compose_train("accelerator=cpu", "accelerator.precision=16-mixed"))
