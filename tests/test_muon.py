"""optim=muon: torch.optim.Muon on the blocks' hidden matrices, AdamW (optim=adamw's) on everything else; a step is
torch's Muon step, and a non-finite step is withheld from both. Its exact resume: test_variants.py ("modern")."""

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import RESUME_K as K
from conftest import SHORT_RUN as RUN
from conftest import compose_train_in, inject_gradient
from hydra.utils import instantiate
from lightning.pytorch.plugins import MixedPrecision
from omegaconf import OmegaConf

from gpt2lab.errors import ConfigError
from gpt2lab.lit_module import GPTModule
from gpt2lab.train import train

HIDDEN = {f"transformer.h.{i}.{m}.weight" for i in range(4) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                        "mlp.c_proj")}  # fmt: skip


def muon_module(compose_train, *overrides: str, trainer: L.Trainer | None = None) -> GPTModule:
    cfg = compose_train("model=tiny", "accelerator=cpu", "optim=muon", "trainer.max_steps=100", *overrides)
    module = instantiate(cfg.module)
    module.trainer = trainer or L.Trainer(max_steps=100, accelerator="cpu", logger=False, enable_checkpointing=False)
    return module


def group_names(module: GPTModule, optimizer: torch.optim.Optimizer) -> list[set[str]]:
    names = {id(p): name for name, p in module.model.named_parameters()}
    return [{names[id(p)] for p in group["params"]} for group in optimizer.param_groups]


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(compose_train, tied):
    module = muon_module(compose_train, f"model.tie_embeddings={str(tied).lower()}")
    adamw, muon = (config["optimizer"] for config in module.configure_optimizers())
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    [hidden] = group_names(module, muon)
    decay, no_decay = group_names(module, adamw)
    assert hidden == HIDDEN
    embeddings = {"transformer.wte.weight", "transformer.wpe.weight"} | (set() if tied else {"lm_head.weight"})
    assert decay == embeddings  # the output layer too, when it is a matrix of its own
    params = dict(module.model.named_parameters())
    assert no_decay == {name for name, p in params.items() if p.dim() == 1}  # biases and norm gains
    assert hidden | decay | no_decay == set(params) and len(hidden) + len(decay) + len(no_decay) == len(params)
    # each with its own lr and weight decay, from conf/optim/muon.yaml; AdamW's are optim=adamw's
    assert muon.defaults["lr"] == 0.02 and muon.defaults["weight_decay"] == 0.0
    assert (muon.defaults["momentum"], muon.defaults["nesterov"], muon.defaults["ns_steps"]) == (0.95, True, 5)
    assert adamw.defaults["lr"] == 6e-4 and adamw.param_groups[0]["weight_decay"] == 0.1 and adamw.defaults["fused"]


def test_optim_muon_keeps_optim_adamws_keys_for_the_adamw(compose_train):
    muon, adamw = (OmegaConf.to_container(compose_train(f"optim={o}").optim) for o in ("muon", "adamw"))
    assert muon.pop("muon")["_target_"] == "torch.optim.Muon" and muon == adamw


def test_a_muon_step_is_torch_optim_muons_step_on_the_same_gradients(compose_train):
    module = muon_module(compose_train)
    _, muon = (config["optimizer"] for config in module.configure_optimizers())
    params = dict(module.model.named_parameters())
    # the same tensors and gradients, stepped by torch.optim.Muon built here with the config's values; the
    # module's lr is the schedule's first (warmup: 1/10 of optim.muon.lr)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.02 / 10)
    copies = {name: params[name].detach().clone().requires_grad_() for name in sorted(HIDDEN)}
    initial = {name: copy.detach().clone() for name, copy in copies.items()}
    reference = torch.optim.Muon(list(copies.values()), lr=0.02 / 10, weight_decay=0.0, momentum=0.95, nesterov=True,
                                 ns_steps=5, adjust_lr_fn="original")  # fmt: skip
    torch.manual_seed(0)
    for _ in range(2):  # the second step uses the momentum of the first
        for name, copy in copies.items():
            params[name].grad = torch.randn_like(copy)
            copy.grad = params[name].grad.clone()
        muon.step()
        reference.step()
    for name, copy in copies.items():
        assert torch.equal(params[name], copy) and not torch.equal(copy, initial[name]), name


def test_muon_with_fp16_is_refused(compose_train):
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = L.Trainer(accelerator="cpu", plugins=[fp16], logger=False, enable_checkpointing=False)
    with pytest.raises(ConfigError, match=r"optim=muon with fp16 \(16-mixed\) is not supported: use bf16-mixed"):
        muon_module(compose_train, trainer=trainer).configure_optimizers()


@pytest.mark.slow
def test_nonfinite_step_is_withheld_from_muon_and_adamw(tmp_path, data_dir):
    nan_at_3 = inject_gradient(3, param="transformer.h.0.attn.c_attn.weight")  # one of Muon's matrices
    # 3 steps, the checkpoint of step 2 kept; the NaN in step 3 is skipped (train.on_nonfinite=skip)
    every_k = f"callbacks.model_checkpoint.every_n_train_steps={K}"
    skip = "train.on_nonfinite=skip"
    train(compose_train_in(tmp_path, data_dir, *RUN, "optim=muon", "trainer.max_steps=3", every_k, skip, nan_at_3))
    before, after = (torch.load(Path(tmp_path, "checkpoints", f), weights_only=False)
                     for f in ("step000002.ckpt", "last.ckpt"))  # fmt: skip
    assert (before["global_step"], after["global_step"]) == (2, 3)
    for name, weight in before["state_dict"].items():  # step 3 changed nothing
        assert torch.equal(after["state_dict"][name], weight), name
    adamw, muon = after["optimizer_states"]
    assert {int(s["step"]) for s in adamw["state"].values()} == {2}  # AdamW's step count did not advance
    assert len(muon["state"]) == len(HIDDEN)
    for i, state in muon["state"].items():  # nor did Muon's momentum
        assert torch.equal(state["momentum_buffer"], before["optimizer_states"][1]["state"][i]["momentum_buffer"])
