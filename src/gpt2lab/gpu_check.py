"""Checking a GPU box in one command (scripts/gpu_check.py, conf/gpu_check.yaml, docs/gpu_check.md): the CUDA-only
tests, the bench and the first steps of the 124M recipe, each under a time limit of its own; a part that fails or
runs out of time is recorded and the next one runs. One markdown report, gpu_check.md, is rewritten after each part,
so that a check killed from outside still leaves what it measured."""

import contextlib
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, open_dict
from torch.profiler import ProfilerActivity, profile

from gpt2lab.errors import user_error_message
from gpt2lab.train import train

REPORT = "gpu_check.md"
# the order the parts run in: the two subprocesses first, each with the whole GPU to itself; the recipe, which runs
# in this process, last, so that a crash of the CUDA context there cannot take the others with it
PARTS = ("tests", "bench", "recipe")
ERROR = re.compile(r"(error|exception)\w*: ", re.IGNORECASE)
OUTPUT_LINES = 60  # of a part's output in the report; the whole output is in <part>.log beside it


class TimeLimitExceeded(Exception):
    pass


@dataclass
class Part:
    """What one part of the check did, as the report shows it."""

    name: str
    limit_s: float
    status: str = "not run yet"  # then running; at its end ok, failed (…), timed out; or skipped
    seconds: float | None = None
    summary: str = ""  # one line for the table of parts
    details: str = ""  # markdown for the part's own section

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped")


@dataclass
class StepRecord:
    step: int
    loss: float
    time: float  # s, the step's own (StepReport.time)
    tokens_per_sec: float | None  # as logged by the speed monitor (perf/tokens_per_sec)
    mfu: float | None  # perf/mfu; None where the device's peak FLOP/s is unknown
    peak_memory: int | None  # bytes: torch.cuda.max_memory_allocated so far (None off CUDA)


class StepRecorder(L.Callback):
    """Records each optimizer step of a run: from its StepReport and what the speed monitor logged for it (so it
    must come after the monitor: train()'s extra callbacks do), and the CUDA allocator's peak so far."""

    def __init__(self):
        self.steps: list[StepRecord] = []
        self.shape = ""  # the run's model and batch, for the report

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        data, model = trainer.datamodule, pl_module.model
        self.shape = (
            f"{model.config.n_layer} layers × {model.config.n_embd} ({model.num_params() / 1e6:.1f}M parameters), "
            f"B={data.batch_size} × T={data.seq_len} × {data.micro_batches} micro-batches × {trainer.world_size} "
            f"device(s) = {data.tokens_per_step:,} tokens a step on {pl_module.device}"
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        report, logged = outputs["report"], trainer.callback_metrics  # one batch is one optimizer step
        cuda = pl_module.device.type == "cuda"
        self.steps.append(StepRecord(
            step=report.step, loss=report.loss, time=report.time,
            tokens_per_sec=float(logged["perf/tokens_per_sec"]) if "perf/tokens_per_sec" in logged else None,
            mfu=float(logged["perf/mfu"]) if "perf/mfu" in logged else None,
            peak_memory=torch.cuda.max_memory_allocated(pl_module.device) if cuda else None,
        ))  # fmt: skip


class StepProfiler(L.Callback):
    """torch.profiler over the optimizer steps `first`..`last` of a run (late ones: compiled and warmed up):
    its chrome trace, the ops that took the most of the device's time (the CPU's off CUDA), and how busy the GPU
    was, the union of its kernels' and copies' intervals over the steps' wall time: below 100%, it waited for the
    host (launch overhead, a host sync, the data), the first thing to look at for MFU."""

    def __init__(self, first: int, last: int, out_dir: Path, rows: int = 15):
        self.first, self.last, self.out_dir, self.rows = first, last, out_dir, rows
        self.profiler: profile | None = None
        self.trace: Path | None = None
        self.table = ""
        self.started = 0.0  # perf_counter() at the first profiled step's start
        self.wall_s = self.busy_s = None  # busy_s stays None without CUDA kernels
        self.error: str | None = None  # why profiling failed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if trainer.global_step + 1 != self.first:  # the optimizer step about to run
            return
        cuda = pl_module.device.type == "cuda"
        with self.recording_failure():
            self.profiler = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])])
            if cuda:
                torch.cuda.synchronize(pl_module.device)  # the window holds these steps' kernels and no earlier ones
            self.profiler.start()
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.profiler is None or outputs["report"].step != self.last:
            return
        cuda = pl_module.device.type == "cuda"
        with self.recording_failure():
            if cuda:
                torch.cuda.synchronize(pl_module.device)
            self.wall_s = time.perf_counter() - self.started
            self.profiler.stop()
            trace = self.out_dir / f"profile_steps_{self.first}-{self.last}.json"
            self.profiler.export_chrome_trace(str(trace))
            if not trace.is_file():  # torch logs a failed write and goes on
                raise OSError(f"torch.profiler wrote no trace at {trace}")
            sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
            self.table = self.profiler.key_averages().table(sort_by=sort_by, row_limit=self.rows)
            if cuda:
                self.busy_s = busy_seconds(json.loads(trace.read_text())["traceEvents"])
            self.trace = trace
        self.profiler = None

    @contextlib.contextmanager
    def recording_failure(self) -> Iterator[None]:
        """A profiler that cannot start or save (no CUPTI on the box, a full disk) is reported; the run goes on."""
        try:
            yield
        except Exception as e:  # noqa: BLE001  the recipe's own figures do not depend on the profile
            self.error = f"{type(e).__name__}: {e}"
            if self.profiler is not None:
                with contextlib.suppress(Exception):
                    self.profiler.stop()
            self.profiler = None

    @property
    def steps(self) -> str:
        return f"Step {self.last}" if self.first == self.last else f"Steps {self.first}–{self.last}"

    def markdown(self) -> str:
        if self.error is not None:
            return f"{self.steps}: profiling failed ({self.error}); the figures above do not depend on it."
        if self.trace is None:
            return f"{self.steps}: not profiled, the run did not reach step {self.last}."
        busy = (
            f"the GPU was busy {self.busy_s / self.wall_s:.1%} of {1000 * self.wall_s:.1f} ms of wall time "
            f"({1000 * self.busy_s:.1f} ms of kernels and copies)"
            if self.busy_s is not None
            else f"{1000 * self.wall_s:.1f} ms of wall time, no GPU kernels (not CUDA)"
        )
        return (
            f"{self.steps} under torch.profiler: {busy}. Trace (chrome://tracing, Perfetto): "
            f"{self.trace.name}. The ops with the most time of their own:\n\n{fenced(self.table.strip())}"
        )


GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # the trace's categories of what occupies the GPU


def busy_seconds(events: list[dict]) -> float:
    """The time covered by at least one GPU kernel, copy or memset in a chrome trace's events (µs timestamps):
    the union of their intervals, so that kernels overlapping on two streams count once."""
    intervals = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_WORK and "dur" in e)
    total, end = 0.0, float("-inf")
    for start, stop in intervals:
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e6


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeLimitExceeded in the main thread once `seconds` have passed (SIGALRM): at the next Python line it
    runs, i.e. once a kernel or a host sync under way returns."""

    def expire(signum, frame):
        raise TimeLimitExceeded(f"ran past its {seconds:g} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_command(cmd: list[str], cwd: Path, timeout_s: float, stdout: Path, stderr: Path) -> int | None:
    """Run `cmd` with its output in these files; its exit status, or None when it ran past `timeout_s`. Whatever
    it started (the bench's workers, compile workers) is killed when it ends, so that nothing keeps the GPU."""
    with stdout.open("w") as out, stderr.open("w") as err:
        # a Hydra error with its exception and traceback, as any other error
        env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
        process = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        finally:
            with contextlib.suppress(ProcessLookupError):  # its process group: the command and all it started
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def tail(text: str, lines: int = OUTPUT_LINES) -> str:
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join(kept)


def fenced(text: str) -> str:
    return f"```text\n{text}\n```\n"


def last_line(text: str) -> str:
    """The last line that says something (pytest's === around its summary left out)."""
    lines = [line.strip("= ") for line in text.splitlines() if line.strip("= ")]
    return lines[-1] if lines else ""


def error_line(text: str) -> str:
    """The last line that names an error: Python's `SomeError: ...` (a traceback's source lines are indented, this
    is not), a script's `config error: ...`, pytest's `error: ...`; else the last line."""
    named = [line for line in text.splitlines() if ERROR.search(line) and not line[:1].isspace()]
    return named[-1] if named else last_line(text)


def run_subprocess_part(part: Part, cmd: list[str], root: Path, out_dir: Path) -> None:
    """A part that is a command: its status from the exit status, its stdout in the report (the tail of its stderr
    too when it failed), and as its summary the last line of its output, or the error it ended with."""
    shown = shlex.join(["python", *cmd[1:]])
    stdout, stderr = out_dir / f"{part.name}.log", out_dir / f"{part.name}.stderr.log"
    start = time.perf_counter()
    status = run_command(cmd, root, part.limit_s, stdout, stderr)
    part.seconds = time.perf_counter() - start
    output, errors = stdout.read_text(errors="replace"), stderr.read_text(errors="replace")
    if status == 0:
        part.status, part.summary = "ok", last_line(output)
    elif status is None:
        last = last_line(output) or last_line(errors) or "(none)"
        part.status, part.summary = "timed out", f"killed at its time limit; its last output: {last}"
    else:
        # the error it ended with (pytest reports failures on stdout)
        part.status, part.summary = f"failed (exit {status})", error_line(f"{errors}\n{output}")
    part.details = f"`{shown}` (in {root}; output in {stdout.name}, {stderr.name})\n\n"
    if output.strip():
        part.details += fenced(tail(output))
    if status != 0 and errors.strip():
        part.details += f"\nThe end of its stderr:\n\n{fenced(tail(errors, OUTPUT_LINES // 2))}"


def tests_command(cfg: DictConfig) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *cfg.gpu_check.tests.args]


def bench_command(cfg: DictConfig, root: Path, out_dir: Path) -> list[str]:
    overrides = [
        *cfg.gpu_check.bench.args,
        f"paths.data_dir={Path(cfg.paths.data_dir).resolve()}",  # the data the recipe's runs use
        f"hydra.run.dir={out_dir / 'bench'}",
    ]
    if peak := cfg.callbacks.speed_monitor.peak_flops:  # given for a GPU Lightning's table lacks: for both parts
        overrides.append(f"bench.peak_flops={peak}")
    return [sys.executable, str(root / "scripts" / "bench.py"), *overrides]


def run_recipe(part: Part, cfg: DictConfig, out_dir: Path) -> None:
    """train(cfg) in this process with a StepRecorder and a StepProfiler of its last steps; the steps recorded are
    reported even when it fails."""
    with open_dict(cfg):
        for name in cfg.gpu_check.recipe.without_callbacks:
            cfg.callbacks.pop(name, None)
    recorder = StepRecorder()
    # the steps just before the last, which also validates, samples, monitors and saves: steady, compiled steps
    last = max(1, cfg.trainer.max_steps - 1)
    profiler = StepProfiler(max(1, last - cfg.gpu_check.recipe.profile_steps + 1), last, out_dir)
    start = time.perf_counter()
    error = None
    try:
        with time_limit(part.limit_s):
            val_loss = train(cfg, callbacks=[recorder, profiler])
    # any failure is this part's result, recorded, and the check goes on; SystemExit: RunStopped, a run that stopped
    # itself (a non-finite loss)
    except (Exception, SystemExit) as e:  # noqa: BLE001
        error = e
    part.seconds = time.perf_counter() - start
    steps = recorder.steps
    if error is None:
        part.status, outcome = "ok", f"val/loss {val_loss:.4f} after step {steps[-1].step}"
    else:
        part.status = "timed out" if isinstance(error, TimeLimitExceeded) else "failed"
        outcome = user_error_message(error) or f"{type(error).__name__}: {error}".strip()
    part.summary = "; ".join([*recipe_figures(steps, profiler), outcome])
    acc = cfg.accelerator  # as train() resolved it
    part.details = (
        f"{recorder.shape or 'Training did not start'}; precision {acc.precision}, compile {acc.compile}, "
        f"attention {acc.attention}. Run dir {cfg.paths.output_dir}\n\n{step_table(steps)}\n\n{profiler.markdown()}"
    )
    if error is not None and not isinstance(error, TimeLimitExceeded):
        lines = "".join(traceback.format_exception(error))
        part.details += f"\nIt failed:\n\n{fenced(tail(lines, OUTPUT_LINES // 2))}"


def recipe_figures(steps: list[StepRecord], profiler: StepProfiler) -> list[str]:
    """Medians over the steps after the first (which compiles and warms up) and before the profiled ones (slowed by
    the profiler; the last step after them does more), the first step's extra time, and how busy the GPU was in the
    profiled steps."""
    later = [s for s in steps[1:] if s.step < profiler.first] or steps[1:]  # a run too short to leave any out
    if not later:
        return [f"{len(steps)} step(s) recorded"]

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    step_time, rate = median(s.time for s in later), median(s.tokens_per_sec for s in later)
    mfu = median(s.mfu for s in later)
    peak = max((s.peak_memory for s in steps if s.peak_memory is not None), default=None)
    return [
        f"{rate:,.0f} tokens/s" if rate is not None else "tokens/s n/a",
        f"MFU {mfu:.1%}" if mfu is not None else "MFU n/a (peak FLOP/s unknown)",
        f"step {1000 * step_time:.1f} ms",
        f"peak memory {peak / 2**30:.2f} GiB" if peak is not None else "peak memory n/a (not CUDA)",
        f"compile + warm-up {steps[0].time - step_time:.1f} s",
        f"loss {steps[0].loss:.4f} → {steps[-1].loss:.4f}",
        *([f"GPU busy {profiler.busy_s / profiler.wall_s:.1%} (profiled)"] if profiler.busy_s is not None else []),
    ]


def step_table(steps: list[StepRecord]) -> str:
    def cell(value, spec: str, scale: float = 1.0) -> str:
        return "–" if value is None else format(value * scale, spec)

    rows = ["| step | loss | step time (ms) | tokens/s | MFU | peak memory (GiB) |", "|" + " --- |" * 6]
    for s in steps:
        rows.append(
            f"| {s.step} | {s.loss:.4f} | {1000 * s.time:.1f} | {cell(s.tokens_per_sec, ',.0f')} | "
            f"{cell(s.mfu, '.2%')} | {cell(s.peak_memory, '.2f', 2**-30)} |"
        )
    return "\n".join(rows)


def command_output(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")  # Linux; platform.processor() there says only x86_64
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(root: Path) -> list[tuple[str, str]]:
    """What the figures were measured on and with."""
    rows = []
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} × {torch.cuda.device_count()}, {props.total_memory / 2**30:.1f} GiB"
        driver = command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"])
        rows += [
            ("device", f"{device}, compute capability {props.major}.{props.minor}"),
            ("driver", driver or "n/a (no nvidia-smi)"),
            ("torch", f"{torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"),
        ]
    else:
        rows += [("device", "no CUDA GPU"), ("torch", torch.__version__)]
    commit = command_output(["git", "rev-parse", "--short", "HEAD"], root)
    changed = command_output(["git", "status", "--porcelain", "--untracked-files=no"], root)
    rows += [
        ("lightning", L.__version__),
        ("python", platform.python_version()),
        ("CPU", f"{cpu_name()}, {os.cpu_count()} cores"),
        ("gpt2lab", f"commit {commit}{' with local changes' if changed else ''}" if commit else "n/a (no git)"),
    ]
    return rows


def render(title: str, parts: dict[str, Part], environment: list[tuple[str, str]]) -> str:
    lines = [
        "# GPU check", "", title, "",
        "## Machine", "", "| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in environment), "",
        "## Parts", "", "| part | status | time | limit | summary |", "| --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for p in parts.values():
        seconds = "–" if p.seconds is None else f"{p.seconds:.0f} s"
        summary = p.summary.replace("|", r"\|")  # a table cell
        lines.append(f"| {p.name} | {p.status} | {seconds} | {p.limit_s:g} s | {summary} |")
    for p in parts.values():
        lines += ["", f"## {p.name}", "", p.details or p.status]
    return "\n".join(lines) + "\n"


def check(cfg: DictConfig, root: Path, out_dir: Path, overrides: list[str]) -> tuple[Path, bool]:
    """Run the parts of conf/gpu_check.yaml not in gpu_check.skip, writing out_dir/gpu_check.md after each;
    returns the report's path and whether every part that ran passed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report, started = out_dir / REPORT, time.perf_counter()
    command = shlex.join(["python", "scripts/gpu_check.py", *overrides])
    title = f"`{command}` on {datetime.now():%Y-%m-%d %H:%M:%S}, in {out_dir}"
    parts = {name: Part(name, cfg.gpu_check[name].timeout_s) for name in PARTS}
    environment = machine(root)

    def write(state: str) -> None:
        report.write_text(render(f"{title}: {state} after {time.perf_counter() - started:.0f} s", parts, environment))

    state = "interrupted"  # Ctrl-C: the report still says what was done
    try:
        for name, part in parts.items():
            if name in cfg.gpu_check.skip:
                part.status = "skipped"
                continue
            part.status = "running"  # what the report says if the check is killed meanwhile
            write("running")
            if name == "tests":
                run_subprocess_part(part, tests_command(cfg), root, out_dir)
            elif name == "bench":
                run_subprocess_part(part, bench_command(cfg, root, out_dir), root, out_dir)
            else:
                run_recipe(part, cfg, out_dir)
        state = "done"
    finally:
        write(state)
    return report, all(p.ok for p in parts.values())
