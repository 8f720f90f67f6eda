"""scripts/gpu_check.py on a CPU at tiny sizes, the same code path a GPU box runs: each part under its limit, a failing
part recorded without losing the others, the recipe's steps as its TensorBoard logged them; and the 24 GB recipe."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONF_DIR, ROOT, compose_train_in, scalars
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gpt2lab.data.datamodule import micro_batches_per_step
from gpt2lab.gpu_check import StepProfiler, StepRecord, busy_seconds, check, recipe_figures, run_command

# the recipe's code path at tiny sizes, in fp32 (numbers are compared): 2 micro-batches a step, as on a GPU
TINY = [
    "accelerator=cpu", "accelerator.precision=32-true", "model=tiny", "data.batch_size=2", "data.seq_len=32",
    "train.total_batch_size=128", "trainer.max_steps=3",
]  # fmt: skip


def sections(report: str) -> dict[str, str]:
    """The report's `## name` sections, by name."""
    return {s.split("\n", 1)[0]: s.split("\n", 1)[1] for s in report.split("\n## ")[1:]}


def table(text: str) -> list[list[str]]:
    """The rows of the first markdown table in `text`, cells stripped, header and rule left out."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def run_check(out_dir: Path, data_dir: Path, *overrides: str) -> tuple[str, bool]:
    """gpu_check's config composed as scripts/gpu_check.py composes it, checked in this process: the report, and
    whether every part passed."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("gpu_check", overrides=[f"paths.output_dir={out_dir / 'recipe'}", f"paths.data_dir={data_dir}",
                                              *overrides])  # fmt: skip
    report, passed = check(cfg, ROOT, out_dir, list(overrides))
    return report.read_text(), passed


@pytest.fixture(scope="module")
def failing_check(tmp_path_factory, data_dir):
    """A check whose tests part fails (pytest refuses an option) and whose bench runs past its limit (still starting
    up after 1 s); the recipe runs after them, in this process."""
    out_dir = tmp_path_factory.mktemp("check")
    return out_dir, *run_check(out_dir, data_dir, *TINY, "gpu_check.tests.args=[--no-such-option]",
                               "gpu_check.bench.timeout_s=1", "trainer.max_steps=4",
                               "gpu_check.recipe.profile_steps=1")  # fmt: skip


def test_a_failing_and_a_timed_out_part_are_recorded_and_the_recipe_still_runs(failing_check):
    out_dir, report, passed = failing_check
    assert not passed
    assert list(sections(report)) == ["Machine", "Parts", "tests", "bench", "recipe"]
    machine = dict(table(sections(report)["Machine"]))
    assert {"device", "torch", "lightning", "python", "CPU", "gpt2lab"} <= set(machine)
    parts = {row[0]: row for row in table(sections(report)["Parts"])}
    assert list(parts) == ["tests", "bench", "recipe"]
    assert parts["tests"][1] == "failed (exit 4)"  # pytest's usage error, with its message in the part's section
    assert parts["tests"][4].endswith("error: unrecognized arguments: --no-such-option")  # the line that says why
    assert parts["bench"][1] == "timed out" and parts["bench"][4].startswith("killed at its time limit")
    assert float(parts["bench"][2].removesuffix(" s")) < 30  # killed, not waited for
    assert parts["recipe"][1] == "ok"
    assert (out_dir / "tests.log").is_file() and (out_dir / "bench.stderr.log").is_file()


def test_recipe_reports_each_step_as_its_tensorboard_logged_it(failing_check):
    out_dir, report, _ = failing_check
    logged = scalars(out_dir / "recipe")
    rows = table(sections(report)["recipe"])
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    # loss, tokens/s and MFU at the report's precision: 4 decimals, whole tokens, 2 decimals of a percent
    assert [float(r[1]) for r in rows] == pytest.approx([v for _, v in logged["train/loss"]], abs=5.1e-5)
    assert [float(r[3].replace(",", "")) for r in rows] == pytest.approx(
        [v for _, v in logged["perf/tokens_per_sec"]], abs=0.51
    )
    mfu = [v for _, v in logged["perf/mfu"]]
    assert [float(r[4].rstrip("%")) / 100 for r in rows] == pytest.approx(mfu, abs=5.1e-5)
    assert [r[5] for r in rows] == ["–"] * 4  # no CUDA allocator to ask
    summary = {row[0]: row[4] for row in table(sections(report)["Parts"])}["recipe"]
    (_, val_loss), = logged["val/loss"]  # fmt: skip
    assert f"val/loss {val_loss:.4f} after step 4" in summary
    assert f"loss {rows[0][1]} → {rows[3][1]}" in summary
    assert "B=2 × T=32 × 2 micro-batches" in sections(report)["recipe"]


def test_recipe_profiles_the_step_before_its_last_and_leaves_both_out_of_the_medians(failing_check):
    out_dir, report, _ = failing_check
    recipe = sections(report)["recipe"]
    assert "Step 3 under torch.profiler: " in recipe and "no GPU kernels (not CUDA)" in recipe
    trace = json.loads((out_dir / "profile_steps_3-3.json").read_text())["traceEvents"]
    # one optimizer step in the window (torch's optimizers mark each step), its matmuls among the ops
    assert sum(e.get("name", "").startswith("Optimizer.step#AdamW.step") for e in trace) == 1
    assert re.search(r"^\s*aten::(addmm|mm|bmm|matmul)\s", recipe, re.MULTILINE)
    rows = table(recipe)
    summary = {row[0]: row[4] for row in table(sections(report)["Parts"])}["recipe"]
    assert summary.startswith(f"{rows[1][3]} tokens/s")  # the median of step 2 alone: 3 was profiled, 4 does more


def test_a_profile_that_cannot_be_saved_is_reported_and_the_recipe_still_passes(tmp_path, data_dir):
    in_the_way = tmp_path / "profile_steps_2-2.json"  # where the trace goes: a directory that is not empty
    in_the_way.mkdir()
    (in_the_way / "kept").touch()
    overrides = [*TINY, "gpu_check.recipe.profile_steps=1", "gpu_check.skip=[tests,bench]"]
    report, passed = run_check(tmp_path, data_dir, *overrides)
    assert passed
    assert (
        f"Step 2: profiling failed (OSError: torch.profiler wrote no trace at {in_the_way})"
        in sections(report)["recipe"]
    )
    assert [int(r[0]) for r in table(sections(report)["recipe"])] == [1, 2, 3]


def test_gpu_busy_time_is_the_union_of_its_kernels_and_copies():
    events = [  # µs, as a chrome trace writes them: two streams overlapping, a copy, host work that does not count
        {"cat": "kernel", "ts": 0, "dur": 10}, {"cat": "kernel", "ts": 5, "dur": 10},
        {"cat": "kernel", "ts": 20, "dur": 10}, {"cat": "gpu_memcpy", "ts": 29, "dur": 2},
        {"cat": "cpu_op", "ts": 0, "dur": 100}, {"cat": "kernel", "ts": 40}, {"ph": "M", "name": "process_name"},
    ]  # fmt: skip
    assert busy_seconds(events) == pytest.approx((15 + 11) * 1e-6)


def test_recipe_past_its_limit_is_stopped_and_the_steps_it_made_are_reported(tmp_path, data_dir):
    overrides = [*TINY, "trainer.max_steps=1000000", "gpu_check.recipe.timeout_s=5", "gpu_check.skip=[tests,bench]"]
    report, passed = run_check(tmp_path, data_dir, *overrides)
    assert not passed
    recipe = {row[0]: row for row in table(sections(report)["Parts"])}["recipe"]
    assert recipe[1] == "timed out" and recipe[4].endswith("TimeLimitExceeded: ran past its 5 s limit")
    logged = scalars(tmp_path / "recipe")  # Lightning closes the run's loggers when an exception ends it
    rows = table(sections(report)["recipe"])
    assert [int(r[0]) for r in rows] == [s for s, _ in logged.get("train/loss", [])]
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL  # the process is as it was


def test_timed_out_command_is_killed_with_every_process_it_started(tmp_path):
    # a shell that starts a sleeper in the background, as the bench starts its workers, and waits
    out, err = tmp_path / "out", tmp_path / "err"
    start = time.perf_counter()
    status = run_command(["sh", "-c", "sleep 60 & echo $!; wait"], tmp_path, 1, out, err)
    assert status is None and time.perf_counter() - start < 30
    sleeper = Path(f"/proc/{int(out.read_text())}")
    for _ in range(100):  # orphaned by the shell's death, it is reaped by init once killed
        if not sleeper.exists() or sleeper.joinpath("stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the command's background process outlived its time limit")


@pytest.mark.slow
def test_one_command_runs_exactly_the_cuda_tests_and_reports_them(tmp_path, data_dir):
    cmd = [sys.executable, "scripts/gpu_check.py", "gpu_check.skip=[bench,recipe]", f"paths.data_dir={data_dir}",
           f"hydra.run.dir={tmp_path}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert done.stdout == report  # printed as written
    parts = {row[0]: row for row in table(sections(report)["Parts"])}
    assert (parts["bench"][1], parts["recipe"][1]) == ("skipped", "skipped")
    # the tests marked cuda and no others: skipped on a CPU, passed on a GPU
    assert parts["tests"][1] == "ok" and re.match(r"2 (passed|skipped), \d+ deselected", parts["tests"][4])
    assert "tests/test_accelerator.py" in sections(report)["tests"] and "tests/test_monitor.py" in report


def test_24gb_recipe_is_the_124m_recipe_with_the_same_step_in_32_micro_batches_of_16(tmp_path, data_dir):
    recipe, small = (
        compose_train_in(tmp_path, data_dir, f"experiment={name}", resolve=False)
        for name in ("gpt2_124m_fineweb", "gpt2_124m_fineweb_24gb")
    )
    assert small.train.total_batch_size == recipe.train.total_batch_size == 2**19
    assert micro_batches_per_step(small.train.total_batch_size, small.data.batch_size, small.data.seq_len, 1) == 32
    # the same val tokens: the first 1280 windows either way
    assert small.data.val_batches * small.data.batch_size == recipe.data.val_batches * recipe.data.batch_size
    small, recipe = (OmegaConf.to_container(c) for c in (small, recipe))
    for key in ("batch_size", "val_batches"):
        del small["data"][key], recipe["data"][key]
    assert small == recipe  # nothing else differs


def test_recipe_medians_are_over_the_steps_between_the_first_and_the_profiled_ones(tmp_path):
    # steps 1..6, 4 and 5 profiled, 6 the last: only 2 and 3 are steady, unprofiled steps; any of the others in the
    # medians moves them (the first compiles, the profiled ones are slowed, the last validates and saves)
    rates = {1: 10.0, 2: 1000.0, 3: 1200.0, 4: 300.0, 5: 310.0, 6: 320.0}
    steps = [StepRecord(step=s, loss=11.0 - s, time=1024 / r, tokens_per_sec=r, mfu=r / 1e4, peak_memory=None)
             for s, r in rates.items()]  # fmt: skip
    figures = recipe_figures(steps, StepProfiler(first=4, last=5, out_dir=tmp_path))
    assert figures[:3] == ["1,100 tokens/s", "MFU 11.0%", f"step {1000 * (1024 / 1000 + 1024 / 1200) / 2:.1f} ms"]
    assert figures[4] == f"compile + warm-up {1024 / 10 - (1024 / 1000 + 1024 / 1200) / 2:.1f} s"
