import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from gpt2lab.lit_module import GPTModule, StepReport


@pytest.fixture
def module(compose_train) -> GPTModule:
    cfg = compose_train("model=tiny", "accelerator=cpu", "trainer.max_steps=100")
    module = instantiate(cfg.module)
    module.trainer = L.Trainer(
        max_steps=cfg.trainer.max_steps, accelerator="cpu", logger=False, enable_checkpointing=False
    )
    return module


def test_only_matrices_and_embeddings_are_weight_decayed(module):
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in module.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "model.transformer.wte.weight" in decayed and "model.transformer.h.0.attn.c_attn.weight" in decayed
    assert "model.transformer.h.0.ln_1.weight" in {names[id(p)] for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    assert decay["betas"] == (0.9, 0.95) or list(decay["betas"]) == [0.9, 0.95]
    assert decay["eps"] == 1e-8 and decay["fused"] is True  # cpu has the fused kernel


def lrs(module, steps: int) -> list[float]:
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return out


def test_lr_warms_up_linearly_then_decays_by_cosine_to_ten_percent(module):
    lr = lrs(module, 120)  # max_steps=100, warmup 10, lr 6e-4, min 6e-5
    assert lr[0] == pytest.approx(6e-4 / 10)  # step 0: build-nanogpt's max_lr·(it+1)/warmup_steps
    assert lr[9] == pytest.approx(6e-4)  # end of warmup
    assert lr[10] == pytest.approx(6e-4)
    assert lr[55] == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5))  # half way through the decay
    assert lr[100] == pytest.approx(6e-5) and lr[119] == pytest.approx(6e-5)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert lr[30] == pytest.approx(6e-5 + 0.5 * (1 + math.cos(math.pi * 20 / 90)) * (6e-4 - 6e-5))


def test_checkpoint_of_another_model_size_is_refused_naming_both(compose_train, module):
    other = instantiate(compose_train("model=tiny", "model.n_layer=2").module)
    checkpoint = {"hyper_parameters": dict(other.hparams), "gpt2lab_format": 2}
    with pytest.raises(ValueError, match="'n_layer': 2.*this run builds.*'n_layer': 4"):
        module.on_load_checkpoint(checkpoint)


@pytest.mark.parametrize(
    "version, message",
    [(None, "not written by gpt2lab"), (1, "older gpt2lab, whose train batches were micro-batches"),
     (99, "written by a newer gpt2lab")],
)  # fmt: skip
def test_checkpoint_of_unknown_format_says_why_it_does_not_load(module, version, message):
    checkpoint = {"hyper_parameters": dict(module.hparams), "gpt2lab_format": version}
    with pytest.raises(ValueError, match=message):
        module.on_load_checkpoint(checkpoint)


def report_at(step: int, last_step: int) -> StepReport:
    return StepReport(step=step, loss=1.0, grad_norm=1.0, lr=1e-3, tokens=1, time=0.1, applied=True,
                      last=step == last_step)  # fmt: skip


@pytest.mark.parametrize(("every", "due"), [(5, [5, 10, 12]), (4, [4, 8, 12]), (1, list(range(1, 13))), (None, [12])])
def test_periodic_work_is_due_at_each_multiple_and_at_the_last_step(every, due):
    """The one rule of validation, samples, HellaSwag, monitors and last.ckpt (build-nanogpt: step % every == 0 or
    last_step), for a 12-step run."""
    assert [step for step in range(1, 13) if report_at(step, 12).due(every)] == due
