"""The unused-token metrics: the exact split of val/loss at token ids the training split never holds, checked
against closed forms, a brute-force float64 softmax per position, and two real ranks (gloo)."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate

from gpt2lab.metrics import unseen_token_mask, unused_token_sums, validation_metrics
from gpt2lab.model import GPT, GPTConfig, init_weights

VOCAB = 40


def test_unused_token_sums_on_set_logits():
    # 6 ids, 3 never seen in training (2, 3, 5); each never-seen id gets twice the weight of a seen one
    unseen = torch.tensor([False, False, True, True, False, True])
    logits = torch.where(unseen, math.log(2.0), 0.0).expand(2, 3, 6)  # (B, T, V)
    targets = torch.tensor([[0, 1, 4], [2, 4, 5]])  # two never-seen targets (U), four seen (S)
    seen_vocab_nll, unseen_mass_nll, unseen_target_nll, unseen_targets, mass = unused_token_sums(
        logits, targets, unseen
    ).tolist()
    assert seen_vocab_nll == pytest.approx(4 * math.log(3))  # uniform over the 3 seen ids
    assert unseen_mass_nll == pytest.approx(4 * math.log(3))  # m = 6/9 at every position: −log(1 − m) = ln 3
    assert unseen_target_nll == pytest.approx(2 * math.log(9 / 2))  # p(y) = 2/9 for a never-seen target
    assert unseen_targets == 2 and mass == pytest.approx(6 * 2 / 3)
    # row chunking (for large batches) changes nothing
    chunked = unused_token_sums(logits, targets, unseen, chunk=1).tolist()
    assert chunked == pytest.approx([seen_vocab_nll, unseen_mass_nll, unseen_target_nll, unseen_targets, mass])


def test_the_mass_term_stays_finite_where_one_minus_m_rounds_to_zero():
    # the never-seen ids hold all but ~e^-80 of the probability: 1 − m is 0 in float32, log(1 − m) is not
    unseen = torch.tensor([False, False, True, True, False, True])
    logits = torch.where(unseen, 80.0, 0.0)[None]  # (1, V)
    seen_vocab_nll, unseen_mass_nll, *_ = unused_token_sums(logits, torch.tensor([4]), unseen).tolist()
    assert seen_vocab_nll == pytest.approx(math.log(3))
    assert unseen_mass_nll == pytest.approx(80.0, rel=1e-6)  # −log(1 − m) = ln(1 + e^80) = 80 + O(e^-80)


def random_gpt_and_batches(seed: int = 0, n_batches: int = 4) -> tuple[GPT, list, torch.Tensor]:
    """A random tiny GPT with logits spread over several nats, random (x, y) batches, and a random mask of
    never-seen ids that catches some targets (U) and leaves most seen (S)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)).eval()
    init_weights(model, std=0.5, scale_residual=True)
    batches = [(torch.randint(VOCAB, (2, 16)), torch.randint(VOCAB, (2, 16))) for _ in range(n_batches)]
    unseen = torch.rand(VOCAB) < 0.3
    return model, batches, unseen


def brute_force_split(model: GPT, batches, unseen: torch.Tensor) -> dict[str, float]:
    """The same quantities from the definitions: a float64 softmax over the full vocabulary, one position at a
    time, in plain Python."""
    nll = {"S": [], "U": []}
    seen_vocab_nll, unseen_mass_nll, masses = [], [], []
    unseen_ids = unseen.numpy()
    for x, y in batches:
        logits = model(x)[0].double().numpy().reshape(-1, VOCAB)
        for row, target in zip(logits, y.flatten().tolist()):
            p = np.exp(row - row.max())
            p /= p.sum()
            m = p[unseen_ids].sum()
            masses.append(m)
            nll["U" if unseen_ids[target] else "S"].append(-math.log(p[target]))
            if not unseen_ids[target]:
                seen_vocab_nll.append(-math.log(p[target] / (1 - m)))
                unseen_mass_nll.append(-math.log(1 - m))
    n = len(masses)
    return {
        "val/loss": (sum(nll["S"]) + sum(nll["U"])) / n,
        "val/loss_seen_targets": float(np.mean(nll["S"])),
        "val/loss_seen_vocab": float(np.mean(seen_vocab_nll)),
        "val/unseen_mass_nll": float(np.mean(unseen_mass_nll)),
        "val/loss_unseen_targets": float(np.mean(nll["U"])),
        "val/unseen_target_share": len(nll["U"]) / n,
        "val/unused_token_mass": float(np.mean(masses)),
    }


def test_validation_splits_the_loss_exactly_at_never_seen_ids():
    """val/loss = (1 − p_U)·loss_seen_targets + p_U·loss_unseen_targets, loss_seen_targets = loss_seen_vocab +
    unseen_mass_nll, each part as a brute-force softmax per position gives it (a random GPT, random mask)."""
    model, batches, unseen = random_gpt_and_batches()
    with torch.no_grad():
        expected = brute_force_split(model, batches, unseen)
    metrics = {k: v.item() for k, v in validation_metrics(model, batches, unseen).items()}

    assert 0.05 < expected["val/unseen_target_share"] < 0.5 and 0.1 < expected["val/unused_token_mass"] < 0.9
    assert expected["val/unseen_mass_nll"] > 0.1  # the mass term is far from negligible here
    assert metrics == pytest.approx(expected, rel=1e-5)
    share = metrics["val/unseen_target_share"]
    assert metrics["val/loss"] == pytest.approx(
        (1 - share) * metrics["val/loss_seen_targets"] + share * metrics["val/loss_unseen_targets"], rel=1e-6
    )
    assert metrics["val/loss_seen_targets"] == pytest.approx(
        metrics["val/loss_seen_vocab"] + metrics["val/unseen_mass_nll"], rel=1e-6
    )


def split_on_two_ranks(rank: int, port: int, results) -> None:
    """One rank of two (gloo): the split of its own half of the batches, its sums added to the other's."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, batches, unseen = random_gpt_and_batches()

        def all_reduce_sum(sums: torch.Tensor) -> torch.Tensor:  # what strategy.reduce(reduce_op="sum") does
            dist.all_reduce(sums)
            return sums

        reduced = validation_metrics(model, batches[rank::2], unseen, all_reduce_sum)
        alone = validation_metrics(model, batches[rank::2], unseen)
        results.put((rank, {k: v.item() for k, v in reduced.items()}, {k: v.item() for k, v in alone.items()}))
    finally:
        dist.destroy_process_group()


def test_the_split_over_two_ranks_is_the_split_over_all_batches():
    """Each rank holds its own share of unseen targets: summing before dividing keeps the logged values those
    of one process over all the batches, where the mean of the ranks' values would not be."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(split_on_two_ranks, args=(port, results), nprocs=2)  # spawn: forking a process that ran torch can hang
    results = {rank: (reduced, alone) for rank, reduced, alone in (results.get() for _ in range(2))}
    model, batches, unseen = random_gpt_and_batches()
    everything = {k: v.item() for k, v in validation_metrics(model, batches, unseen).items()}

    (reduced_0, alone_0), (reduced_1, alone_1) = results[0], results[1]
    assert reduced_0 == pytest.approx(everything, rel=1e-6) and reduced_1 == pytest.approx(everything, rel=1e-6)
    assert alone_0["val/unseen_target_share"] != pytest.approx(alone_1["val/unseen_target_share"], rel=1e-2)
    mean_of_ranks = (alone_0["val/loss_unseen_targets"] + alone_1["val/loss_unseen_targets"]) / 2
    assert mean_of_ranks != pytest.approx(everything["val/loss_unseen_targets"], rel=1e-3)


@pytest.mark.parametrize("pad_vocab", [False, True])
def test_validation_splits_the_loss_of_a_uniform_model(compose_train, pad_vocab):
    """A model whose logits are all zero predicts uniformly: on Tiny Shakespeare, whose training split holds
    11,266 distinct GPT-2 ids, it puts (V − 11266)/V on never-seen ids (the padded rows among them), its loss
    over the seen vocabulary is ln 11266, and the mass term makes up the rest of ln V."""
    cfg = compose_train("model=tiny", "accelerator=cpu", "data.seq_len=64", "data.val_batches=2",
                        f"model.pad_vocab={pad_vocab}")  # fmt: skip
    datamodule, module = instantiate(cfg.data), instantiate(cfg.module)
    with torch.no_grad():
        module.model.lm_head.weight.zero_()  # the logits are h · lm_headᵀ = 0 for every id
    datamodule.prepare_data()
    datamodule.setup("fit")
    counts = datamodule.train_token_counts()
    unseen = unseen_token_mask(counts, module.model.config.padded_vocab_size)
    metrics = {k: v.item() for k, v in validation_metrics(module.model, datamodule.val_loader(), unseen).items()}

    n_seen = int(np.count_nonzero(counts))
    assert n_seen == 11_266  # the first 90% of Tiny Shakespeare, <|endoftext|> included
    n_logits = 50304 if pad_vocab else 50257
    val_targets = torch.cat([y.flatten() for _, y in datamodule.val_loader()]).numpy()
    share = float(np.mean(counts[val_targets] == 0))
    assert 0 < share < 0.05  # a few val targets never occur in training
    assert metrics == pytest.approx(
        {
            "val/loss": math.log(n_logits),
            "val/loss_seen_targets": math.log(n_logits),
            "val/loss_seen_vocab": math.log(n_seen),
            "val/unseen_mass_nll": math.log(n_logits / n_seen),
            "val/loss_unseen_targets": math.log(n_logits),
            "val/unseen_target_share": share,
            "val/unused_token_mass": (n_logits - n_seen) / n_logits,
        },
        rel=1e-5,
    )


def test_unused_tokens_experiment_validates_densely_on_tiny(compose_train):
    cfg = compose_train("experiment=unused_tokens")
    assert (cfg.model.n_layer, cfg.model.n_embd) == (4, 128)
    assert cfg.train.val_every_n_steps == 5 and cfg.trainer.max_steps == 200
