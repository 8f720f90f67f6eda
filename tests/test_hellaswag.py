"""HellaSwag scoring on made-up examples in the official format, against answers known by construction and
against a direct computation of each ending's loss."""

import json

import pytest
import tiktoken
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from test_train import scalars
from torch.nn import functional as F

from gpt2lab import hellaswag
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.train import train

THE = 262  # GPT-2's token for " the"

EXAMPLES = [
    # label 0: eight likely tokens and two unlikely ones; ending 1 has a single unlikely token
    {"ctx": "A man is sitting on a roof. He", "label": 0,
     "endings": ["the the the the the the the the cat dog", "dog", "cat dog bird", "bird cat dog fish"]},
    {"ctx": "A woman walks her dog.", "label": 2,
     "endings": ["fish fish", "cat dog bird", "the the the", "dog bird"]},
    {"ctx": "Two kids play chess. One of them", "label": 3,
     "endings": ["moves", "wins the game", "loses", "the the"]},
]  # fmt: skip


@pytest.fixture
def examples_file(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in EXAMPLES))
    return path


def unigram_model(favourite: int) -> GPT:
    """A GPT whose next-token distribution is the same at every position: ln_f's gain is 0, so its output is
    its bias b whatever the input, and the logits are wte·b; only `favourite`'s row of wte is non-zero."""
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[favourite, 0] = 12.0  # p(" the") ≈ 1 - 50256·e^-12 ≈ 0.70
    return model.eval()


def test_examples_load_from_a_local_file_and_bad_lines_name_the_file(examples_file):
    assert hellaswag.load_examples("http://unused.invalid", examples_file) == EXAMPLES
    assert len(hellaswag.load_examples("http://unused.invalid", examples_file, limit=2)) == 2
    examples_file.write_text('{"ctx": "x", "endings": ["a", "b"], "label": 0}\n')
    with pytest.raises(ValueError, match=f"{examples_file}:1 is not a HellaSwag example"):
        hellaswag.load_examples("http://unused.invalid", examples_file)


def test_average_loss_picks_the_likely_ending_and_summed_loss_the_short_one():
    model = unigram_model(THE)
    counts = hellaswag.evaluate(model, EXAMPLES, progress=False)
    # example 0: average → ending 0 (right), sum → ending 1 (wrong); 1: both → ending 2 (right);
    # 2: both → " the the" (right)
    assert counts.tolist() == [3, 3, 2]
    assert hellaswag.accuracies(counts) == {"acc_norm": 1.0, "acc": 2 / 3, "examples": 3}


def test_batched_scores_equal_a_direct_computation_per_ending():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)).eval()
    enc = tiktoken.get_encoding("gpt2")
    tokens, mask, labels = next(hellaswag.batches(EXAMPLES, enc, 64, size=3))
    summed, averaged = hellaswag.ending_losses(model, tokens, mask)
    for i, ex in enumerate(EXAMPLES):
        ctx = enc.encode(ex["ctx"])
        for j, ending in enumerate(ex["endings"]):
            end = enc.encode(" " + ending)
            row = torch.tensor([ctx + end])
            with torch.no_grad():
                logprobs = F.log_softmax(model(row)[0][0], dim=-1)  # (L, vocab), one unpadded row alone
            nll = [-logprobs[len(ctx) - 1 + k, t].item() for k, t in enumerate(end)]
            assert summed[4 * i + j].item() == pytest.approx(sum(nll), rel=1e-4)
            assert averaged[4 * i + j].item() == pytest.approx(sum(nll) / len(nll), rel=1e-4)
    assert labels.tolist() == [0, 2, 3]


def test_ranks_score_disjoint_shares_whose_counts_sum_to_the_whole():
    model = unigram_model(THE)
    whole = hellaswag.evaluate(model, EXAMPLES, progress=False)
    shares = [hellaswag.evaluate(model, EXAMPLES, rank=r, world_size=2, progress=False) for r in (0, 1)]
    assert [s[0].item() for s in shares] == [2, 1]
    assert (shares[0] + shares[1]).tolist() == whole.tolist()


@pytest.mark.slow
def test_training_logs_hellaswag_and_the_script_scores_the_checkpoint(tmp_path, data_dir, examples_file, capsys):
    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.output_dir={run_dir}", f"paths.data_dir={data_dir}", "model=tiny", "accelerator=cpu",
            "trainer.max_steps=3", "data.seq_len=32", "train.total_batch_size=256", "callbacks=[default,hellaswag]",
            "callbacks.hellaswag.every_n_steps=2", f"callbacks.hellaswag.load_examples.path={examples_file}",
        ])  # fmt: skip
    train(cfg)
    logged = scalars(run_dir)
    # after optimizer steps 2 and 3 (the last), each of 2 micro-batches: never mid-step
    assert [s for s, _ in logged["hellaswag/acc_norm"]] == [1, 2]
    assert all(v in (0, 1 / 3, 2 / 3, 1) for _, v in logged["hellaswag/acc_norm"] + logged["hellaswag/acc"])

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        eval_cfg = compose("eval_hellaswag", overrides=[
            f"ckpt={run_dir}", "accelerator=cpu", f"hellaswag.load_examples.path={examples_file}",
        ])  # fmt: skip
    scores = hellaswag.evaluate_from_config(eval_cfg)
    assert scores["examples"] == 3
    assert scores["acc_norm"] == pytest.approx(logged["hellaswag/acc_norm"][-1][1])  # the same final weights
