"""The unused-token metrics: how much probability a model puts on tokens the training split never holds, and
its loss with those masked out, on cases whose answer is known in closed form."""

import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from gpt2lab.metrics import unseen_token_mask, unused_token_metrics, validation_metrics


def test_unused_token_metrics_on_set_logits():
    # 6 ids, 3 never seen in training (2, 3, 5); each never-seen id gets twice the weight of a seen one
    unseen = torch.tensor([False, False, True, True, False, True])
    logits = torch.where(unseen, math.log(2.0), 0.0).expand(2, 3, 6)  # (B, T, V)
    targets = torch.tensor([[0, 1, 4], [2, 4, 5]])  # two never-seen targets: left out of the masked loss
    mass, loss_seen = unused_token_metrics(logits, targets, unseen)
    assert mass.item() == pytest.approx(3 * 2 / (3 * 2 + 3))  # 2/3 at every position
    assert loss_seen.item() == pytest.approx(math.log(3))  # uniform over the 3 seen ids
    # row chunking (for large batches) changes nothing
    assert [t.item() for t in unused_token_metrics(logits, targets, unseen, chunk=1)] == pytest.approx(
        [mass.item(), loss_seen.item()]
    )


def test_masked_loss_is_the_loss_renormalized_over_seen_tokens():
    """For a seen target, masking the never-seen logits removes exactly −log(1 − unused mass) from its loss."""
    torch.manual_seed(0)
    unseen = torch.rand(50) < 0.6
    logits = torch.randn(4, 8, 50) * 3
    seen_ids = torch.nonzero(~unseen).flatten()
    targets = seen_ids[torch.randint(len(seen_ids), (4, 8))]
    mass, loss_seen = unused_token_metrics(logits, targets, unseen, chunk=5)
    probs = logits.softmax(-1)
    per_position_mass = probs[..., unseen].sum(-1)
    loss = torch.nn.functional.cross_entropy(logits.view(-1, 50), targets.view(-1), reduction="none")
    assert mass.item() == pytest.approx(per_position_mass.mean().item(), rel=1e-5)
    assert loss_seen.item() == pytest.approx((loss + torch.log1p(-per_position_mass.view(-1))).mean().item(), rel=1e-5)


@pytest.mark.parametrize("pad_vocab", [False, True])
def test_validation_measures_unused_token_metrics_of_a_uniform_model(compose_train, pad_vocab):
    """A model whose logits are all zero predicts uniformly: on Tiny Shakespeare, whose training split holds
    11,266 distinct GPT-2 ids, it puts (V − 11266)/V on never-seen ids (the padded rows among them) and its
    masked loss is ln 11266."""
    cfg = compose_train("model=tiny", "accelerator=cpu", "data.seq_len=64", "data.val_batches=2",
                        f"model.pad_vocab={pad_vocab}")  # fmt: skip
    datamodule, module = instantiate(cfg.data), instantiate(cfg.module)
    with torch.no_grad():
        module.model.lm_head.weight.zero_()  # the logits are h · lm_headᵀ = 0 for every id
    datamodule.prepare_data()
    datamodule.setup("fit")
    unseen = unseen_token_mask(datamodule.train_token_counts(), module.model.config.padded_vocab_size)
    metrics = {k: v.item() for k, v in validation_metrics(module.model, datamodule.val_loader(), unseen).items()}

    n_seen = int(np.count_nonzero(datamodule.train_token_counts()))
    assert n_seen == 11_266  # the first 90% of Tiny Shakespeare, <|endoftext|> included
    n_logits = 50304 if pad_vocab else 50257
    assert metrics["val/loss"] == pytest.approx(math.log(n_logits), rel=1e-5)
    assert metrics["val/unused_token_mass"] == pytest.approx((n_logits - n_seen) / n_logits, rel=1e-5)
    assert metrics["val/loss_seen_vocab"] == pytest.approx(math.log(n_seen), rel=1e-5)


def test_unused_tokens_experiment_validates_densely_on_tiny(compose_train):
    cfg = compose_train("experiment=unused_tokens")
    assert (cfg.model.n_layer, cfg.model.n_embd) == (4, 128)
    assert cfg.train.val_every_n_steps == 5 and cfg.trainer.max_steps == 200
