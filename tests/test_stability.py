"""The stability instruments (train.monitor_every_n_steps) and z-loss (train.z_loss): each checked against a direct
computation on the step's own batch and weights, in real runs of a tiny model."""

import copy
import math
import subprocess
import sys
from collections import Counter

import lightning as L
import pytest
import torch
from conftest import ROOT, compose_train_in, scalars
from hydra.utils import instantiate
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2lab.errors import ConfigError
from gpt2lab.stability import instability_table
from gpt2lab.sweep import read_events, scalar_series
from gpt2lab.train import train

# fp32 on the cpu (numbers are compared); 2 micro-batches a step; clipped far below the gradient norm, so that
# an instrument measured after clipping would show it; a learning rate that moves the weights by a good fraction
# from the first step (AdamW's update does not shrink with clipping); validation and samples out of the way
TINY = ["model=tiny", "model.n_layer=2", "accelerator=cpu", "accelerator.precision=32-true", "data.seq_len=32",
        "data.batch_size=2", "train.total_batch_size=128", "data.val_batches=1", "train.val_every_n_steps=1000",
        "train.grad_clip=1e-3", "optim.lr=1e-2", "scheduler.warmup_steps=1", "~callbacks.text_samples",
        "~callbacks.progress_bar"]  # fmt: skip


def layer_names(model) -> dict[str, str]:
    """Each parameter's layer, as the test reads the convention: block i, else the module (wte, wpe, ln_f, lm_head)."""
    layers = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        layers[name] = f"layer_{parts[2]}" if parts[1] == "h" else parts[1] if parts[0] == "transformer" else parts[0]
    return layers


@torch.no_grad()
def attention_logit_max(attention, x: torch.Tensor) -> torch.Tensor:
    """max of q·kᵀ/√hs over the causal positions, from the attention's input x (B, T, C), in float64."""
    B, T, C = x.shape
    nh = attention.n_head
    q, k, _ = attention.c_attn(x).double().split(C, dim=2)
    q, k = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k))  # (B, nh, T, hs)
    if attention.q_norm is not None:
        q, k = attention.q_norm(q.float()).double(), attention.k_norm(k.float()).double()
    if attention.rotary is not None:
        q, k = attention.rotary(q, 0), attention.rotary(k, 0)
    logits = q @ k.transpose(-2, -1) / math.sqrt(C // nh)  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return logits[..., causal].max()


class DirectComputation(L.Callback):
    """Before each monitored step, its instruments computed directly on a copy of the model and the step's own
    batch (forward, backward, no clipping, in float64 where it matters); after it, the update from the weights
    before and after; each compared with the step's report."""

    def __init__(self):
        self.checked_steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        model = copy.deepcopy(pl_module.model)
        attention_inputs = {i: [] for i in range(len(model.transformer.h))}
        for i, block in enumerate(model.transformer.h):
            block.attn.register_forward_pre_hook(lambda m, args, i=i: attention_inputs[i].append(args[0]))
        xs, ys = batch
        logits_max, log_z = [], []
        for x, y in zip(xs, ys):
            logits, loss = model(x, y)
            (loss / len(xs)).backward()
            logits_max.append(logits.detach().max())
            log_z.append(logits.detach().double().logsumexp(-1).mean())
        layers = layer_names(model)
        grads, weights = {}, {}
        for name, p in model.named_parameters():
            grads.setdefault(layers[name], []).append(p.grad.double().flatten())
            weights.setdefault(layers[name], []).append(p.detach().double().flatten())
        self.expected = {
            f"stability/attn_logit_max/layer_{i}": max(attention_logit_max(block.attn, x) for x in attention_inputs[i])
            for i, block in enumerate(model.transformer.h)
        }
        self.expected["stability/logits_max"] = max(logits_max)
        self.expected["stability/log_z_mean"] = sum(log_z) / len(log_z)
        for layer, g in grads.items():
            self.expected[f"stability/grad_rms/{layer}"] = torch.cat(g).square().mean().sqrt()
        self.weights_before = {layer: torch.cat(w) for layer, w in weights.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        report = outputs["report"]
        if report.stability is None:
            return
        layers = layer_names(pl_module.model)
        after = {}
        for name, p in pl_module.model.named_parameters():
            after.setdefault(layers[name], []).append(p.detach().double().flatten())
        for layer, before in self.weights_before.items():
            update = torch.cat(after[layer]) - before
            self.expected[f"stability/update_ratio/{layer}"] = update.norm() / before.norm()
        expected = {tag: float(value) for tag, value in self.expected.items()}
        assert report.stability.keys() == expected.keys()
        for tag, value in expected.items():
            assert report.stability[tag] == pytest.approx(value, rel=1e-4, abs=1e-6), tag
        self.checked_steps.append(report.step)


@pytest.mark.parametrize(
    "variant",
    [
        [],  # GPT-2: learned positions, tied embeddings, SDPA
        ["model.qk_norm=true", "model.position=rope", "model.tie_embeddings=false", "accelerator.attention=eager"],
        ["optim=muon"],
    ],
    ids=["gpt2", "qk_norm-rope-untied-eager", "muon"],
)
def test_instruments_match_a_direct_computation_on_the_steps_own_batch(compose_train, variant):
    checker = DirectComputation()
    cfg = compose_train(*TINY, "trainer.max_steps=3", "train.monitor_every_n_steps=1", *variant)
    train(cfg, callbacks=[checker])
    assert checker.checked_steps == [1, 2, 3]


def test_tiny_run_logs_the_stability_tags_at_the_due_steps_only(compose_train, tmp_path):
    train(compose_train(*TINY, "trainer.max_steps=5", "train.monitor_every_n_steps=2"))
    logged = scalars(tmp_path / "run")
    stability = {tag: [step for step, _ in points] for tag, points in logged.items() if tag.startswith("stability/")}
    per_layer = {
        f"stability/{what}/layer_{i}" for what in ("attn_logit_max", "grad_rms", "update_ratio") for i in (0, 1)
    }
    modules = {f"stability/{what}/{name}" for what in ("grad_rms", "update_ratio") for name in ("wte", "wpe", "ln_f")}
    assert stability.keys() == per_layer | modules | {"stability/logits_max", "stability/log_z_mean"}
    assert all(steps == [2, 4, 5] for steps in stability.values()), stability  # every 2 steps and at the last
    assert [step for step, _ in logged["train/loss"]] == [1, 2, 3, 4, 5]
    assert "train/z_loss" not in logged  # train.z_loss=0: off


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.name()] += 1
        return func(*args, **(kwargs or {}))


class OpsPerStep(L.Callback):
    """The tensor ops each optimizer step dispatches, by name, from its first forward to its report."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.mode = CountOps().__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.mode.__exit__(None, None, None)
        self.steps.append(self.mode.ops)


def test_instruments_off_compute_nothing_and_leave_the_losses_bitwise_unchanged(tmp_path, data_dir):
    runs = {}
    for name, every in (("off", "null"), ("every_2", "2")):
        ops = OpsPerStep()
        cfg = compose_train_in(tmp_path / name, data_dir, *TINY, "trainer.max_steps=4",
                               f"train.monitor_every_n_steps={every}")  # fmt: skip
        train(cfg, callbacks=[ops])
        runs[name] = scalars(tmp_path / name), ops.steps
    (off, off_ops), (every_2, every_2_ops) = runs["off"], runs["every_2"]
    assert not [tag for tag in off if tag.startswith("stability/")]
    # the steps it does not monitor (1, 3) run exactly the ops of a run without instruments, and none of the
    # instruments' own (the maxima, log Z); the steps it monitors run more
    assert every_2_ops[0] == off_ops[0] and every_2_ops[2] == off_ops[2]
    instruments_own = {"aten::amax", "aten::maximum", "aten::logsumexp"}
    assert all(instruments_own <= ops.keys() for ops in every_2_ops[1::2])
    assert not any(instruments_own & ops.keys() for ops in off_ops[:-1])  # the last validates: log Z there
    assert all(sum(every_2_ops[i].values()) > sum(off_ops[i].values()) for i in (1, 3))
    # measuring changes nothing the run computes
    assert off["train/loss"] == every_2["train/loss"] and off["train/grad_norm"] == every_2["train/grad_norm"]


def test_z_loss_gradient_is_autograd_of_its_formula(compose_train):
    """loss + z·mean(logsumexp(logits)²): the training step's z-loss, built from the cross-entropy's own log Z,
    against autograd of the formula written out."""
    z = 1e-2  # large enough that its gradient is far above the tolerance (checked below)
    cfg = compose_train("model=tiny", "model.n_layer=1", "accelerator=cpu", f"train.z_loss={z}")
    module = instantiate(cfg.module)
    reference = copy.deepcopy(module.model)
    x, y = torch.randint(0, 50257, (2, 2, 16)).unbind(0)  # (B, T) each
    _, loss, z_term, _ = module.losses(x, y)
    (loss + z_term).backward()

    logits, _ = reference(x)
    cross_entropy = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    z_formula = z * torch.logsumexp(logits.double(), dim=-1).square().mean()
    assert loss.item() == pytest.approx(cross_entropy.item(), rel=1e-6)
    assert z_term.item() == pytest.approx(z_formula.item(), rel=1e-6)
    cross_entropy.backward(retain_graph=True)
    ce_grads = {name: p.grad.clone() for name, p in reference.named_parameters()}
    z_formula.float().backward()
    for (name, p), (_, p_ref) in zip(module.model.named_parameters(), reference.named_parameters()):
        scale = p_ref.grad.abs().max().item()  # float32 rounding, relative to the gradient's largest entry
        torch.testing.assert_close(
            p.grad, p_ref.grad, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, name=name: f"{name}: {m}"
        )
    # the z-loss moves the gradient by far more than that tolerance
    wte = "transformer.wte.weight"
    z_part = reference.get_parameter(wte).grad - ce_grads[wte]
    assert z_part.norm() > 1e-3 * ce_grads[wte].norm()


def test_z_loss_is_logged_apart_and_train_loss_stays_the_cross_entropy(tmp_path, data_dir):
    runs = {}
    for z in ("0.0", "1e-4"):
        train(compose_train_in(tmp_path / z, data_dir, *TINY, "trainer.max_steps=2", f"train.z_loss={z}"))
        runs[z] = scalars(tmp_path / z)
    off, on = runs["0.0"], runs["1e-4"]
    # step 1 starts from the same weights: its train/loss is the same cross-entropy, with or without z-loss
    assert on["train/loss"][0][1] == pytest.approx(off["train/loss"][0][1], rel=1e-6)
    # z-loss at init: log Z ≈ ln(50257) + the logits' spread (std 0.02 weights: tiny), so z·log²Z ≈ 1e-4 · 10.83²
    assert [step for step, _ in on["train/z_loss"]] == [1, 2]
    assert on["train/z_loss"][0][1] == pytest.approx(1e-4 * math.log(50257) ** 2, rel=1e-2)
    assert "train/z_loss" not in off


@pytest.mark.parametrize(
    "override, message",
    [("train.monitor_every_n_steps=0", "train.monitor_every_n_steps=0: must be >= 1"),
     ("train.z_loss=-1e-4", "train.z_loss=-0.0001: must be >= 0")],
)  # fmt: skip
def test_bad_stability_settings_are_refused_naming_the_key(compose_train, override, message):
    with pytest.raises(ConfigError, match=message):
        train(compose_train("model=tiny", "accelerator=cpu", override))


def test_the_instabilities_experiment_sweeps_lr_qk_norm_z_loss_and_seeds(tmp_path):
    cfg = compose_train_in(tmp_path, tmp_path, "experiment=instabilities", return_hydra_config=True)
    params = {key: value.split(",") for key, value in cfg.hydra.sweeper.params.items()}
    assert params["model.qk_norm"] == ["false", "true"] and float(params["train.z_loss"][0]) == 0
    lrs = sorted(map(float, params["optim.lr"]))
    assert lrs[0] == cfg.optim.lr == 6e-4 and lrs[-1] >= 100 * lrs[0] and len(params["seed"]) >= 2
    assert cfg.train.monitor_every_n_steps and cfg.hydra.callbacks.instabilities


@pytest.mark.slow
def test_instability_table_reads_each_runs_instruments_from_its_events(tmp_path, data_dir):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "scripts/train.py", "experiment=instabilities", "optim.lr=6e-4,0.6", "model.qk_norm=false",
           "train.z_loss=0", "seed=1", "trainer.max_steps=4", "train.monitor_every_n_steps=2",
           "scheduler.warmup_steps=1", "data.seq_len=32", "data.val_batches=1", "~callbacks.text_samples",
           f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {r.lr: r for r in instability_table(sweep_dir)}  # as summarize.py --instabilities writes it
    assert sorted(runs) == [6e-4, 0.6]
    for lr, run in runs.items():
        events = read_events(sweep_dir / f"optim.lr={lr:g}")  # read here from the run's own events
        tags = {tag for accumulator in events for tag in accumulator.Tags()["scalars"]}
        logged = {tag: [(step, value) for step, value, _ in scalar_series(events, tag)] for tag in tags}
        layers = [points for tag, points in logged.items() if tag.startswith("stability/attn_logit_max/")]
        assert len(layers) == 4 and all([step for step, _ in points] == [2, 4] for points in layers)
        assert run.attn_logit_max == pytest.approx(max(value for points in layers for _, value in points))
        assert run.final_log_z == pytest.approx(logged["stability/log_z_mean"][-1][1])
        assert run.final_val_loss == pytest.approx(logged["val/loss"][-1][1])
        assert run.diverged == (run.final_val_loss > logged["train/loss"][0][1])
    assert runs[0.6].attn_logit_max > runs[6e-4].attn_logit_max  # 1000× the learning rate: the logits grow
    table = (sweep_dir / "instabilities.md").read_text()  # also written by the experiment's own Hydra callback
    assert (
        f"| false | 0 | 0.6 | {'**yes**' if runs[0.6].diverged else 'no'} | {runs[0.6].attn_logit_max:.1f} |" in table
    )
    assert (sweep_dir / "instabilities.png").stat().st_size > 10_000
