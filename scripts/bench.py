"""Training throughput on this device, candidates side by side: `python scripts/bench.py model=tiny` (conf/bench.yaml).

At equal settings (fp32, the same allocator: the device's accelerator.malloc): (a) our Lightning training step
without the stability instruments, (b) a plain PyTorch loop over the same model and optimizer, (c) Hugging Face
GPT2LMHeadModel with the same config and optimizer, (e) our step with the instruments at their cadence
(train.monitor_every_n_steps: (e)/(a) is their cost). Out of the box: (d) our step with the device's fast-path
defaults (conf/accelerator: precision, compile, malloc; the instruments on, as shipped) against (c0) Hugging Face as a
user gets it (fp32, glibc's allocator defaults).
Allocator settings are per process, so (a)-(c) and (e), (c0) and (d) run in three worker processes; the driver
alternates the candidates round by round (only one runs at a time) to cancel drift in a shared machine's speed.
"""

import math
import multiprocessing as mp
import statistics
import threading
import time
from functools import partial

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F

from gpt2lab.accelerator import resolve_accelerator, set_up_process
from gpt2lab.callbacks.monitor import MEASURED, peak_flops
from gpt2lab.config import register_resolvers

LABELS = {  # in the order they take turns: (e) beside (a), the two its ratio compares
    "lightning": "(a) Lightning step, fp32",
    "stability": "(e) Lightning step + instruments, fp32",
    "plain": "(b) plain PyTorch loop, fp32",
    "hf": "(c) HF GPT2LMHeadModel, fp32",
    "hf_stock": "(c0) HF as shipped: fp32, glibc malloc",
    "fastpath": "(d) Lightning step, fast path",
}
LIGHTNING = ("lightning", "fastpath", "stability")  # the candidates that are our step in a Trainer


def batches(datamodule, device: torch.device):
    while True:  # a fresh pass whenever the loader ends
        for xs, ys in datamodule.train_dataloader():  # (A, B, T): the micro-batches of one optimizer step
            for x, y in zip(xs, ys):
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def synchronize(device: torch.device) -> None:
    """Wait for the queued kernels: a GPU step has only been launched when the Python code returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Gate(L.Callback):
    """Holds Lightning's loop at the start of each chunk of steps until the driver asks for `quota` more."""

    def __init__(self):
        self.requests, self.finished = threading.Semaphore(0), threading.Semaphore(0)
        self.quota = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.quota == 0:
            self.finished.release()  # the previous chunk's steps are done (and this batch is loaded)
            self.requests.acquire()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.quota -= 1  # one batch is one optimizer step


class LightningCandidate:
    """Our training step in a real Trainer, at the config's accelerator settings (precision, compile, attention), with
    the stability instruments at the config's cadence or off."""

    def __init__(self, cfg: DictConfig, instruments: bool):
        module = instantiate(  # no validation inside the timed steps
            cfg.module,
            val_every_n_steps=10**9,
            monitor_every_n_steps=cfg.train.monitor_every_n_steps if instruments else None,
        )
        self.gate, self.device = Gate(), torch.device(cfg.accelerator.name)
        trainer = L.Trainer(
            accelerator=cfg.accelerator.name, devices=1, precision=cfg.accelerator.precision, max_steps=10**9,
            max_epochs=-1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[self.gate],
        )  # fmt: skip
        datamodule = instantiate(cfg.data)
        self.error = None
        threading.Thread(target=self._fit, args=(trainer, module, datamodule), daemon=True).start()
        self._wait()  # set up, first batch loaded

    def _fit(self, trainer, module, datamodule):
        try:
            trainer.fit(module, datamodule)
        except Exception as error:
            self.error = error
            self.gate.finished.release()

    def _wait(self):
        self.gate.finished.acquire()
        if self.error is not None:
            raise RuntimeError("the Lightning candidate's training loop failed") from self.error

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        self.gate.quota = steps
        self.gate.requests.release()
        self._wait()
        synchronize(self.device)
        return time.perf_counter() - t0


class LoopCandidate:
    """A plain PyTorch training loop: our GPT (b) or Hugging Face's (c), same optimizer, schedule, clipping."""

    def __init__(self, cfg: DictConfig, hf: bool):
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        self.device = torch.device(cfg.accelerator.name)
        self.batches = batches(datamodule, self.device)
        if hf:
            from transformers import GPT2Config, GPT2LMHeadModel

            c = cfg.model
            self.model = GPT2LMHeadModel(GPT2Config(
                vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # ours has no dropout
            ))  # fmt: skip
            self.forward = lambda x: self.model(input_ids=x).logits
        else:
            self.model = instantiate(cfg.module).model
            self.forward = lambda x: self.model(x)[0]
        self.model.to(self.device)
        params = list(self.model.parameters())
        groups = [
            {"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = instantiate(cfg.optim)(groups, fused=True)
        schedule = partial(instantiate(cfg.scheduler), max_steps=cfg.trainer.max_steps)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.clip = cfg.train.grad_clip
        self.model.train()

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = next(self.batches)
            logits = self.forward(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - t0


def worker(conn, cfg_container: dict, names: list[str]) -> None:
    """One process: its allocator setting first, then its candidates; runs what the driver asks."""
    cfg = OmegaConf.create(cfg_container)
    malloc = cfg.accelerator.malloc
    if "lightning" in names:
        # one heap for all threads: the Lightning candidate trains in a thread of its own, which would
        # otherwise allocate from an arena of its own, unlike (b) and (c) and a real run
        malloc = {**(malloc or {}), "arena_max": 1}
    set_up_process(cfg.accelerator.matmul_precision, malloc)
    L.seed_everything(cfg.seed, verbose=False)
    candidates = {
        name: LightningCandidate(cfg, instruments=name != "lightning")
        if name in LIGHTNING
        else LoopCandidate(cfg, hf=name.startswith("hf"))
        for name in names
    }
    precision = cfg.accelerator.precision
    conn.send((precision, cfg.bench.peak_flops or peak_flops(torch.device(cfg.accelerator.name), precision)))
    while (request := conn.recv()) is not None:
        name, steps = request
        conn.send(candidates[name].run(steps))


def with_accelerator(cfg: DictConfig, **settings) -> dict:
    """The run config with these accelerator settings, the others at the device's defaults (`auto`), resolved."""
    cfg = cfg.copy()
    cfg.accelerator.merge_with(settings)
    resolve_accelerator(cfg.accelerator)
    OmegaConf.resolve(cfg)
    return OmegaConf.to_container(cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    fp32 = dict(precision="32-true", compile=False, matmul_precision=None)
    equal = with_accelerator(cfg, **fp32)
    order = [name for name in LABELS if cfg.bench.candidates is None or name in cfg.bench.candidates]
    groups = {  # the candidates of a worker process, and the config it runs them with
        "equal": (["lightning", "stability", "plain", "hf"], equal),
        "stock": (["hf_stock"], with_accelerator(cfg, **fp32, malloc=None)),
        "fast": (["fastpath"], with_accelerator(cfg)),  # the device's defaults
    }
    resolve_accelerator(cfg.accelerator)  # the device and its defaults, as the driver sees them
    OmegaConf.resolve(cfg)
    instantiate(cfg.data).prepare_data()  # here: the workers are daemons, which may not start tokenizer processes
    ctx = mp.get_context("spawn")
    pipes, peaks, precision_of = {}, {}, {}
    for names, container in groups.values():
        names = [name for name in names if name in order]
        if not names:
            continue
        parent, child = ctx.Pipe()
        ctx.Process(target=worker, args=(child, container, names), daemon=True).start()
        child.close()  # so that a worker that dies (e.g. out of memory) is an EOFError here, not a hang
        pipes.update({name: parent for name in names})
        precision, peak = parent.recv()
        precision_of.update({name: precision for name in names})
        peaks.setdefault(precision, peak)  # one peak per precision: MFUs at a precision compare like the speeds
    B, T = cfg.data.batch_size, cfg.data.seq_len
    tokens_per_step = B * T
    print(
        f"model={cfg.model.n_layer}x{cfg.model.n_embd} B={B} T={T} on {cfg.accelerator.name}; fast path: "
        f"precision {cfg.accelerator.precision}, compile {cfg.accelerator.compile}, attention "
        f"{cfg.accelerator.attention}, malloc {cfg.accelerator.malloc}; equal settings: attention "
        f"{equal['accelerator']['attention']}"
    )
    steps, warmup = dict.fromkeys(order, cfg.bench.steps), dict.fromkeys(order, cfg.bench.warmup_steps)
    if every := cfg.train.monitor_every_n_steps:
        # a round of (a), (d) and (e) is whole cadences, so that each of (d)'s and (e)'s holds as many monitored steps;
        # their warm-up runs past the first (on a GPU: the monitored step's graph compiled)
        for name in LIGHTNING:
            steps[name] = every * math.ceil(cfg.bench.steps / every)
            warmup[name] = max(cfg.bench.warmup_steps, every)
    for name in order:  # warm-up: lazy init, optimizer state, compilation
        pipes[name].send((name, warmup[name]))
        pipes[name].recv()
    rates = {name: [] for name in order}
    for r in range(cfg.bench.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            pipes[name].send((name, steps[name]))
            rates[name].append(steps[name] * tokens_per_step / pipes[name].recv())
        print(f"round {r + 1}/{cfg.bench.rounds}: " + ", ".join(f"{n} {rates[n][-1]:,.0f}" for n in order), flush=True)

    fpt = instantiate(cfg.module).model.flops_per_token(T)
    median = {name: statistics.median(v) for name, v in rates.items()}
    for name in order:  # a measured peak is the best FLOP/s seen (monitor.measured_peak_flops): the model's too
        if cfg.bench.peak_flops is None and cfg.accelerator.name in MEASURED:
            peaks[precision_of[name]] = max(peaks[precision_of[name]], fpt * max(rates[name]))
    print(f"\n{'candidate':40} {'tokens/s':>10} {'step ms':>9} {'MFU':>7}")
    for name in order:
        peak = peaks[precision_of[name]]
        mfu = f"{fpt * median[name] / peak:>7.2%}" if peak else f"{'–':>7}"  # no peak: a GPU no table lists
        print(f"{LABELS[name]:40} {median[name]:>10,.0f} {1000 * tokens_per_step / median[name]:>9.1f} {mfu}")
    print("peak FLOP/s: " + ", ".join(f"{peak or 0:.3g} ({precision})" for precision, peak in peaks.items()))
    # each ratio is taken round by round, of two candidates that ran one after the other, and its median reported:
    # on a shared machine the speed drifts between rounds, and the pairs cancel that drift (the ratio of the two
    # medians, which may come from different rounds, does not)
    pairs = (("lightning", "plain"), ("lightning", "hf"), ("fastpath", "hf_stock"), ("stability", "lightning"))
    ratios = {  # "(a)/(b)": the rounds' ratios
        f"{LABELS[a].split()[0]}/{LABELS[b].split()[0]}": [x / y for x, y in zip(rates[a], rates[b])]
        for a, b in pairs
        if a in rates and b in rates
    }
    print("ratios: the median of the rounds' ratios [their range]")
    print("   ".join(f"{name} = {statistics.median(v):.3f} [{min(v):.3f}–{max(v):.3f}]" for name, v in ratios.items()))
    if "(e)/(a)" in ratios:  # time, where the ratio is of speeds
        cost = [1 / ratio - 1 for ratio in ratios["(e)/(a)"]]
        print(
            f"stability instruments every {cfg.train.monitor_every_n_steps} steps: {statistics.median(cost):+.2%} of "
            f"a step's time [{min(cost):+.2%} to {max(cost):+.2%}]"
        )
    for pipe in set(pipes.values()):
        pipe.send(None)


if __name__ == "__main__":
    register_resolvers()  # before Hydra composes the config
    main()
