"""HellaSwag scoring on made-up examples in the official format, against answers known by construction and
against a direct computation of each ending's loss."""

import json
import re
import socket
import subprocess
import sys
import threading

import pytest
import torch
from conftest import CONF_DIR, ROOT, scalars
from hydra import compose, initialize_config_dir
from torch.nn import functional as F

from gpt2lab import hellaswag, tokenizer
from gpt2lab.errors import DataError
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
    with pytest.raises(DataError, match=f"{examples_file}:1 is not a HellaSwag example.*found keys"):
        hellaswag.load_examples("http://unused.invalid", examples_file)
    examples_file.write_text(json.dumps(EXAMPLES[0]) + "\n" + json.dumps(EXAMPLES[1])[:40] + "\n")  # cut short
    with pytest.raises(DataError, match=f"{examples_file}:2 is not a HellaSwag example.*found no JSON object"):
        hellaswag.load_examples("http://unused.invalid", examples_file)


def serve_once(body: bytes, announced: int) -> str:
    """The URL of a one-request HTTP server on localhost that announces `announced` bytes, sends `body` and
    hangs up: a download cut off midway."""
    server = socket.create_server(("127.0.0.1", 0))

    def respond():
        with server, server.accept()[0] as conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % announced + body)

    threading.Thread(target=respond, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}/hellaswag_val.jsonl"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hellaswag_val.jsonl",  # the discard port: nothing listens, the connection is refused
    "file:///nonexistent/hellaswag_val.jsonl",
    "cut",  # serve_once: 1000 bytes announced, 100 sent
])  # fmt: skip
def test_failed_download_says_where_to_put_the_file_and_leaves_nothing_behind(tmp_path, url):
    if url == "cut":
        url = serve_once(json.dumps(EXAMPLES[0]).encode()[:100], announced=1000)
    path = tmp_path / "hellaswag" / "hellaswag_val.jsonl"
    with pytest.raises(DataError) as error:
        hellaswag.load_examples(url, path)
    message = str(error.value)
    assert f"could not download HellaSwag from {url}" in message
    assert f"put hellaswag_val.jsonl at {path}" in message and "GPT2LAB_HELLASWAG=" in message
    assert "\n" not in message
    assert list(path.parent.iterdir()) == []  # no partial file that a later run would take for the data


def test_rank_zero_loads_before_the_barrier_and_the_others_after():
    for is_global_zero, expected in [(True, ["load", "barrier"]), (False, ["barrier", "load"])]:
        calls = []
        loaded = hellaswag.rank_zero_first(lambda: calls.append("load") or EXAMPLES, is_global_zero,
                                           lambda: calls.append("barrier"))  # fmt: skip
        assert loaded == EXAMPLES and calls == expected


def test_average_loss_picks_the_likely_ending_and_summed_loss_the_short_one():
    model = unigram_model(THE)
    counts = hellaswag.evaluate(model, EXAMPLES, progress=False)
    # example 0: average → ending 0 (right), sum → ending 1 (wrong); 1: both → ending 2 (right);
    # 2: both → " the the" (right)
    assert counts.tolist() == [3, 3, 2]
    assert hellaswag.accuracies(counts) == {"acc_norm": 1.0, "acc": 2 / 3, "examples": 3}


@pytest.mark.parametrize(
    "switches",
    [{},  # GPT-2
     {"position": "rope", "norm": "rmsnorm", "qk_norm": True, "activation": "relu2"},  # the speedrun's levers
     {"position": "sinusoidal", "norm_placement": "post", "tie_embeddings": False}],  # the original transformer's
    ids=["gpt2", "modern", "original"],
)  # fmt: skip
def test_batched_scores_equal_a_direct_computation_per_ending(switches):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32, **switches)).eval()
    enc = tokenizer.encoding()
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
def test_training_logs_hellaswag_and_the_script_scores_the_checkpoint(tmp_path, data_dir, examples_file):
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
    assert [s for s, _ in logged["hellaswag/acc_norm"]] == [2, 3]
    assert all(v in (0, 1 / 3, 2 / 3, 1) for _, v in logged["hellaswag/acc_norm"] + logged["hellaswag/acc"])

    cmd = [sys.executable, "scripts/eval_hellaswag.py", f"ckpt={run_dir}", "accelerator=cpu",
           f"hellaswag.load_examples.path={examples_file}", f"hydra.run.dir={tmp_path / 'eval'}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    acc_norm, acc, n = re.search(r"HellaSwag: acc_norm ([\d.]+), acc ([\d.]+) \((\d+) examples\)", done.stdout).groups()
    assert int(n) == 3
    assert float(acc_norm) == pytest.approx(logged["hellaswag/acc_norm"][-1][1], abs=1e-4)  # the same final weights
