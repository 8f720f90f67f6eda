"""lm-evaluation-harness on our models in process: its HellaSwag acc against our own scorer's on the same local
examples, each request type against a direct computation on the model, and scripts/eval_lm.py end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import CONF_DIR, ROOT, scalars
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.nn import functional as F

from gpt2lab import hellaswag, tokenizer
from gpt2lab.checkpoint import load_checkpoint
from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT, GPTConfig, init_weights
from gpt2lab.sample import generate
from gpt2lab.train import train

lm_eval = pytest.importorskip("lm_eval")  # the `eval` extra
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from gpt2lab.harness import RESULTS_FILE, GPT2LabLM


def example(ind: int, activity: str, ctx_a: str, ctx_b: str, endings: list[str], label: int) -> dict:
    """A line of the official hellaswag_val.jsonl: ctx is ctx_a and ctx_b joined by a space."""
    return {"ind": ind, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": f"{ctx_a} {ctx_b}".strip(), "split": "val", "split_type": "indomain", "label": label,
            "endings": endings, "source_id": f"activitynet~v_{ind}"}  # fmt: skip


EXAMPLES = [
    example(24, "Roof shingle removal", "A man is sitting on a roof.", "he",
            ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
             "is holding a rubik's cube.", "starts pulling up roofing on a roof."], 3),
    example(92, "Clean and jerk", "A lady walks to a barbell. She bends down and grabs the pole.", "the lady",
            ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
             "stands and lifts the weight over her head."], 3),
    example(106, "Canoeing", "Two women in a child are shown in a canoe while a man pulls the canoe while standing "
            "in the water, with other individuals visible in the background.", "the child and a different man",
            ["are then shown paddling down a river in a boat while a woman talks.",
             "are driving the canoe, they go down the river flowing side to side.",
             "sit in a canoe while the man paddles.",
             "walking go down the rapids, while the man in his helicopter almost falls and goes out of canoehood."], 2),
    example(114, "Making a cake", "A woman is in a kitchen with a bowl of batter.", "she",
            ["pours the batter into a pan and bakes it.", "eats the bowl.", "throws the café au lait at the wall.",
             "sings a song about ducks."], 0),
    example(201, "Playing guitar", "A boy holds a guitar on his lap.", "he",
            ["strums the strings and sings.", "swims across the lake.", "paints the guitar blue, then red.",
             "talks."], 0),
    example(305, "Home and Garden", "[header] How to water a cactus [title] Check the soil.", "",
            ["Water only when it is dry.", "Cacti enjoy daily baths.", "Sing to it.", "Remove its spines."], 0),
    example(412, "Shaving", "A man applies shaving cream to his face.", "then he",
            ["drives to work.", "picks up a razor and shaves.", "eats the cream.", "shaves the cat."], 1),
    example(517, "Running a marathon", "Runners cross the starting line as the crowd cheers.", "the runners",
            ["fly away.", "sit down.", "run down the street, 42 km to go.", "sleep."], 2),
]  # fmt: skip

TINY = {"block_size": 64, "vocab_size": 50257, "n_layer": 2, "n_head": 2, "n_embd": 32}
VARIANTS = {
    "gpt2": {},
    "rope_post": {"position": "rope", "norm_placement": "post"},
    "others": {"position": "sinusoidal", "norm": "rmsnorm", "qk_norm": True, "activation": "relu2",
               "tie_embeddings": False},
}  # fmt: skip


@pytest.fixture
def examples_file(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in EXAMPLES))
    return path


def random_model(**switches) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, **switches)).eval()
    init_weights(model, std=0.2, scale_residual=True)  # larger than GPT-2's 0.02: peaked, varied predictions
    return model


def local_task(name: str, examples_file):
    """conf/lm_eval_tasks/<name>.yaml as scripts/eval_lm.py gives it to lm-eval, HellaSwag read from examples_file."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval_lm", overrides=[f"hellaswag.load_examples.path={examples_file}"])
    return instantiate(cfg.local_tasks[name], _convert_="all")


@pytest.mark.parametrize("name", sorted(f.stem for f in (CONF_DIR / "lm_eval_tasks").glob("*.yaml")))
def test_every_local_task_is_in_eval_lms_defaults_and_builds_with_its_data(name, examples_file):
    task = local_task(name, examples_file)  # a KeyError: the file is missing from conf/eval_lm.yaml's defaults
    assert task.config.task == name and len(task.eval_docs) > 0


def lm_eval_samples(lm: GPT2LabLM, examples_file) -> tuple[dict, list[dict]]:
    """lm-eval's results on hellaswag_local, and its per-example records in the order of the file."""
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[local_task("hellaswag_local", examples_file)], task_manager=TaskManager(include_defaults=False)
    )
    assert results["n-samples"]["hellaswag_local"]["effective"] == len(EXAMPLES)
    samples = sorted(results["samples"]["hellaswag_local"], key=lambda sample: sample["doc_id"])
    return results["results"]["hellaswag_local"], samples


@pytest.mark.parametrize("switches", VARIANTS.values(), ids=VARIANTS.keys())
def test_lm_eval_acc_equals_our_hellaswag_acc_on_the_same_examples(switches, examples_file):
    model = random_model(**switches)
    ours = hellaswag.accuracies(hellaswag.evaluate(model, EXAMPLES, progress=False))
    tokens, mask, _ = next(hellaswag.batches(EXAMPLES, tokenizer.encoding(), TINY["block_size"], len(EXAMPLES)))
    summed, _ = hellaswag.ending_losses(model, tokens, mask)  # (4·N,) each ending's summed cross-entropy

    theirs, samples = lm_eval_samples(GPT2LabLM(model, batch_size=5, max_gen_toks=8), examples_file)
    assert theirs["acc,none"] == ours["acc"]
    for sample, losses, ex in zip(samples, summed.view(-1, 4), EXAMPLES):
        assert sample["arguments"] == [(ex["ctx"], " " + ending) for ending in ex["endings"]]  # the same texts
        loglikelihoods = torch.tensor([ll for [(ll, _)] in sample["resps"]])
        torch.testing.assert_close(loglikelihoods, -losses, rtol=1e-5, atol=1e-4)
        assert sample["acc"] == float(losses.argmin() == ex["label"])
        # lm-eval's acc_norm: the summed log-likelihood divided by the ending's length in characters
        chars = torch.tensor([len(ending) for ending in ex["endings"]], dtype=torch.float)
        assert sample["acc_norm"] == float((losses / chars).argmin() == ex["label"])
    assert 0 < ours["acc"] < 1  # a model that picks some right and some wrong: the comparison can fail


def instances(request_type: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type, doc={}, arguments=args, idx=0) for args in arguments]


def direct_logprobs(model: GPT, inputs: list[int]) -> torch.Tensor:
    """(len(inputs), vocab): the model's log-probabilities of the token after each input position, one row alone."""
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([inputs]))[0][0].float(), dim=-1)


def test_loglikelihood_is_the_continuations_log_probability_and_a_long_context_loses_its_start():
    model = random_model(**VARIANTS["rope_post"])
    lm = GPT2LabLM(model, batch_size=2, max_gen_toks=8)
    enc = tokenizer.encoding()
    long_context = " ".join(f"word{i}" for i in range(60))  # > 64 tokens: its start does not fit
    requests = [("A man is sitting on a roof.", " He is ripping tiles off."), (long_context, " the end"),
                ("", "Hello world")]  # fmt: skip
    answers = lm.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    for (context, continuation), (logprob, _) in zip(requests, answers):
        ctx = enc.encode(context) or [tokenizer.EOT_ID]  # an empty context is <|endoftext|>
        cont = enc.encode(continuation)
        sequence = (ctx + cont)[-(TINY["block_size"] + 1) :]  # the last block_size + 1 tokens
        logprobs = direct_logprobs(model, sequence[:-1])
        expected = sum(logprobs[len(sequence) - 1 - len(cont) + k, t].item() for k, t in enumerate(cont))
        assert logprob == pytest.approx(expected, rel=1e-5)
    assert len(enc.encode(long_context)) > TINY["block_size"]

    # is_greedy: whether greedy decoding gives the continuation
    context = enc.encode("A man is sitting on a roof.")
    greedy = generate(model, torch.tensor([context]), 5, temperature=0.0)[0, len(context) :].tolist()
    other = greedy[:-1] + [(greedy[-1] + 1) % TINY["vocab_size"]]
    [(_, is_greedy), (_, is_other_greedy)] = lm._loglikelihood_tokens([(None, context, greedy), (None, context, other)])
    assert is_greedy and not is_other_greedy


def test_loglikelihood_rolling_sums_every_tokens_log_probability_once():
    model = random_model()
    lm = GPT2LabLM(model, batch_size=3, max_gen_toks=8)
    enc = tokenizer.encoding()
    short, long = "To be, or not to be, that is the question.", " ".join(f"token{i}" for i in range(80))
    T = TINY["block_size"]
    sequence = [tokenizer.EOT_ID] + enc.encode(long)  # predicted from <|endoftext|> on
    N = len(sequence)
    assert N > 2 * T  # three windows, the last one partial

    # lm-eval's rolling windows: T tokens predicted per window, each from the window's own tokens only (so the
    # first of each window from just the token before it); the last window is given a full T tokens of context
    expected_long = 0.0
    for a in range(1, N, T):  # predict sequence[a:b]
        b = min(a + T, N)
        start = max(0, b - 1 - T) if b == N else a - 1
        logprobs = direct_logprobs(model, sequence[start : b - 1])
        expected_long += sum(logprobs[j - 1 - start, sequence[j]].item() for j in range(a, b))
    short_tokens = [tokenizer.EOT_ID] + enc.encode(short)
    logprobs = direct_logprobs(model, short_tokens[:-1])
    expected_short = sum(logprobs[j - 1, short_tokens[j]].item() for j in range(1, len(short_tokens)))

    rolling = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(short,), (long,)]), disable_tqdm=True)
    assert rolling == pytest.approx([expected_short, expected_long], rel=1e-5)


def test_generate_until_with_the_cache_equals_uncached_greedy_decoding_and_stops_at_a_stop_string():
    model = random_model(**VARIANTS["others"])  # rope_post's random weights repeat one token, these vary
    lm = GPT2LabLM(model, batch_size=4, max_gen_toks=20)
    enc = tokenizer.encoding()
    prompts = ["ROMEO: What light", "KING: Now is the", " ".join(f"word{i}" for i in range(60))]  # the last: > 64
    inputs = []  # the shape of every forward's tokens
    model.register_forward_hook(lambda module, args, output: inputs.append(tuple(args[0].shape)))

    def uncached(prompt: str, n: int) -> list[int]:
        ids = enc.encode(prompt)[-TINY["block_size"] :]
        out = generate(model, torch.tensor([ids]), n, temperature=0.0, kv_cache=False)
        return out[0, len(ids) :].tolist()

    texts = lm.generate_until(instances("generate_until", [(p, {"until": []}) for p in prompts]), disable_tqdm=True)
    assert inputs[:3] == [(2, 5), (2, 1), (2, 1)]  # the two 5-token prompts in one batch, then a token at a time
    assert texts == [enc.decode(uncached(p, 20)) for p in prompts]

    # a stop string (the text of a token not seen before it): the text before it, and no token generated past it
    tokens = uncached(prompts[0], 20)
    k = next(k for k in range(3, 20) if enc.decode(tokens[k : k + 1]).strip() not in enc.decode(tokens[:k]))
    stop = enc.decode(tokens[k : k + 1]).strip()
    inputs.clear()
    [text] = lm.generate_until(instances("generate_until", [(prompts[0], {"until": [stop], "max_gen_toks": 20})]))
    assert text == enc.decode(tokens[: k + 1]).split(stop)[0] and len(text) < len(enc.decode(tokens))
    assert inputs == [(1, 5)] + [(1, 1)] * k  # the prompt, then a token at a time until the stop string's

    with pytest.raises(ConfigError, match="generation arguments {'num_beams': 4}"):
        lm.generate_until(instances("generate_until", [(prompts[0], {"until": [], "num_beams": 4})]))


@pytest.mark.slow
def test_eval_lm_script_scores_a_checkpoint_as_our_hellaswag_scorer_does(compose_train, tmp_path, examples_file):
    """A design variant trained for 2 steps, its checkpoint scored by scripts/eval_lm.py on the examples that
    GPT2LAB_HELLASWAG names; lm-eval's results in the run dir and in TensorBoard."""
    cfg = compose_train("model=tiny", "model.n_layer=2", "model.n_embd=64", "model.position=rope",
                        "model.norm_placement=post", "accelerator=cpu", "accelerator.precision=32-true",
                        "trainer.max_steps=2", "data.seq_len=32", "data.batch_size=2", "train.total_batch_size=64",
                        "~callbacks.text_samples")  # fmt: skip
    train(cfg)
    run_dir = tmp_path / "run"
    eval_dir = tmp_path / "eval"
    cmd = [sys.executable, "scripts/eval_lm.py", f"ckpt={run_dir}", "accelerator=cpu", "accelerator.precision=32-true",
           f"hydra.run.dir={eval_dir}"]  # fmt: skip
    env = {**os.environ, "GPT2LAB_HELLASWAG": str(examples_file)}
    done = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((eval_dir / RESULTS_FILE).read_text())
    theirs = results["results"]["hellaswag_local"]
    model = load_checkpoint(run_dir / "checkpoints" / "last.ckpt").eval()
    assert model.config.position == "rope" and model.config.norm_placement == "post"
    ours = hellaswag.accuracies(hellaswag.evaluate(model, EXAMPLES, progress=False))
    assert results["n-samples"]["hellaswag_local"]["effective"] == len(EXAMPLES)
    assert theirs["acc,none"] == ours["acc"]
    assert "samples" not in results
    assert results["config"]["model_args"] == {"ckpt": str(run_dir / "checkpoints" / "last.ckpt"), "hf": None}
    logged = scalars(eval_dir)
    metrics = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
    assert set(logged) == {f"lm_eval/hellaswag_local/{metric}" for metric in metrics}
    assert logged["lm_eval/hellaswag_local/acc"] == [(0, pytest.approx(ours["acc"]))]
    assert logged["lm_eval/hellaswag_local/acc_norm"] == [(0, pytest.approx(theirs["acc_norm,none"]))]
    assert "| hellaswag_local |" in done.stdout.replace("|hellaswag_local|", "| hellaswag_local |")
