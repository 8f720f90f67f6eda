"""lm-evaluation-harness (the `lm-eval` package, the `eval` extra) on a gpt2lab model, in process: GPT2LabLM answers
lm-eval's three requests with our GPT and GPT-2's BPE, hellaswag_dataset hands lm-eval the HellaSwag examples our own
scorer reads, and evaluate(cfg) runs lm_eval.simple_evaluate as scripts/eval_lm.py configures it (conf/eval_lm.yaml).
No export to Hugging Face on the way: every design variant a checkpoint can hold runs as it trained."""

import json
import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.nn import functional as F
from tqdm import tqdm

from gpt2lab import tokenizer
from gpt2lab.accelerator import resolve_accelerator, set_up_process
from gpt2lab.checkpoint import load_model, resolve_checkpoint
from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT
from gpt2lab.sample import generate

try:
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.tasks import TaskManager
except ImportError as e:
    raise ConfigError(f'lm-evaluation-harness is not installed ({e}): pip install -e ".[eval]"') from e

log = logging.getLogger(__name__)

RESULTS_FILE = "lm_eval_results.json"  # in the eval's run dir


class GPT2LabLM(TemplateLM):
    """lm-eval's LM interface over a GPT, on the model's device; the caller sets eval mode and autocast.

    Text becomes tokens as lm-eval's Hugging Face models make it (TemplateLM): a (context, continuation) pair is
    encoded whole, and the continuation is the tokens after the context's own (a context's trailing spaces move
    to the continuation); an empty context is <|endoftext|>, which starts every document of our training data.
    A sequence longer than the context window keeps its last tokens (block_size of them, and one more whose
    prediction is not scored), as lm-eval's HFLM does."""

    def __init__(self, model: GPT, batch_size: int, max_gen_toks: int):
        super().__init__()
        self.model = model
        self.batch_size = batch_size  # sequences a forward
        self.max_gen_toks = max_gen_toks  # for requests that do not say
        self.enc = tokenizer.encoding()
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return tokenizer.EOT_ID

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def tokenizer_name(self) -> str:  # keys lm-eval's request cache
        return tokenizer.NAME

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # GPT-2 adds no special tokens; "<|endoftext|>" in the text is the token, as in Hugging Face's tokenizer
        return self.enc.encode(string, allowed_special={"<|endoftext|>"})

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.enc.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """Per (key, context tokens, continuation tokens): the continuation's summed log-probability given the
        context, and whether greedy decoding would produce it. Longest first, batch_size at a time, each row
        right-padded to its batch's longest (causal attention: padding after a token changes nothing before it)."""
        rows = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens is longer than the context, "
                    f"block_size={self.max_length}: it cannot be scored in one window"
                )
            window = (context + continuation)[-(self.max_length + 1) :]
            rows.append((window[:-1], continuation))  # the window's last len(continuation) tokens are the targets
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        answers: list[tuple[float, bool] | None] = [None] * len(rows)
        vocab_size = self.model.config.vocab_size
        for start in tqdm(range(0, len(order), self.batch_size), desc="loglikelihood", disable=disable_tqdm):
            batch = order[start : start + self.batch_size]
            tokens = torch.zeros(len(batch), len(rows[batch[0]][0]), dtype=torch.long)
            for b, i in enumerate(batch):
                tokens[b, : len(rows[i][0])] = torch.tensor(rows[i][0])
            logits, _ = self.model(tokens.to(self._device))  # (B, L, vocab)
            for b, i in enumerate(batch):
                inputs, targets = rows[i]
                # the input's last len(targets) positions predict the targets; log-probabilities over every row of
                # the (possibly padded) vocabulary, as training's loss and our HellaSwag scorer take them
                logprobs = F.log_softmax(logits[b, len(inputs) - len(targets) : len(inputs)].float(), dim=-1)
                targets = torch.tensor(targets, device=logprobs.device)
                logprob = logprobs.gather(-1, targets[:, None]).sum().item()
                greedy = bool((logprobs[:, :vocab_size].argmax(dim=-1) == targets).all())
                answers[i] = (logprob, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answers[i])
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-probability, every token predicted once: lm-eval's rolling windows of block_size
        tokens (the first conditioned on <|endoftext|>), each window given as much context as fits. The windows
        of all texts are batched together."""
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                lm_eval_utils.make_disjoint_window,
                lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                ),
            ):  # fmt: skip
                windows.append((None, context, continuation))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[n] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation, with the key/value cache (gpt2lab.sample.generate), until a stop string
        or max_gen_toks tokens. Greedy unless the request says do_sample (then its temperature and top_k, drawn
        from torch's global generator, which lm-eval seeds). Our model has no padding mask, so a batch is requests
        whose contexts have the same number of tokens and the same generation arguments; others run alone. A
        context keeps its last block_size tokens; where generation outgrows the window, the window slides (as
        sample.generate does), where HFLM would have cut the context to leave room."""
        groups = defaultdict(list)
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            ids = self.tok_encode(context)[-self.max_length :] or [self.eot_token_id]
            groups[len(ids), json.dumps(gen_kwargs, sort_keys=True, default=str)].append((i, ids))
        texts: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            for members in groups.values():
                _, gen_kwargs = requests[members[0][0]].args
                until, max_gen_toks, temperature, top_k = self.generation_settings(gen_kwargs)
                for start in range(0, len(members), self.batch_size):
                    batch = members[start : start + self.batch_size]
                    idx = torch.tensor([ids for _, ids in batch], device=self._device)
                    with torch.no_grad():
                        out = generate(self.model, idx, max_gen_toks, temperature=temperature, top_k=top_k,
                                       stop=self.stop_strings_in(until))  # fmt: skip
                    for (i, _), row in zip(batch, out[:, idx.size(1) :].tolist()):
                        text = self.tok_decode(row)
                        for s in until:  # what precedes the first stop string
                            text = text.split(s)[0]
                        texts[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        return texts

    def stop_strings_in(self, until: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
        """sample.generate's stop: which rows of the tokens generated so far (B, new) contain a stop string in their
        text (one that spans several tokens too)."""

        def found(new: torch.Tensor) -> torch.Tensor:
            texts = [self.tok_decode(row) for row in new.tolist()]
            return torch.tensor([any(s in text for s in until) for text in texts], device=new.device)

        return found

    def generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int, float, int | None]:
        """(stop strings, max_gen_toks, temperature, top_k) of a request's generation arguments. <|endoftext|> always
        stops; temperature 0 is greedy."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen_toks = kwargs.pop("max_gen_toks", self.max_gen_toks)
        do_sample = kwargs.pop("do_sample", False)
        temperature, top_k = kwargs.pop("temperature", 1.0), kwargs.pop("top_k", None)
        if kwargs:
            raise ConfigError(
                f"generation arguments {kwargs}: gpt2lab's sampler takes until, max_gen_toks, do_sample, temperature "
                "and top_k only; choose tasks whose generation_kwargs use those"
            )
        return [*until, self.tok_decode([self.eot_token_id])], max_gen_toks, temperature if do_sample else 0.0, top_k


def hellaswag_dataset(load_examples: Callable[[], list[dict]], **task_metadata: Any) -> dict:
    """HellaSwag for lm-eval's `custom_dataset`: the examples gpt2lab.hellaswag.load_examples gives our own scorer
    (the same file, downloaded if missing, the same checks and limit), as the validation split. lm-eval also
    passes the task's metadata as keywords; the data needs none of it."""
    import datasets  # an lm-eval dependency

    return {"validation": datasets.Dataset.from_list(load_examples())}


def evaluate(cfg: DictConfig) -> dict:
    """Score the model that cfg.ckpt or cfg.hf names on cfg.tasks with lm_eval.simple_evaluate (cfg.evaluate);
    write lm-eval's results (without per-example samples) to <run dir>/lm_eval_results.json, log each task's
    metrics to cfg.logger's loggers, and return the results."""
    accelerator = cfg.accelerator
    if accelerator.devices != 1:
        raise ConfigError(
            f"accelerator.devices={accelerator.devices}: lm-eval runs in this one process; set accelerator.devices=1 "
            "(and pick the GPU with CUDA_VISIBLE_DEVICES)"
        )
    resolve_accelerator(accelerator)  # each `auto` setting: the device's default
    fabric = L.Fabric(accelerator=accelerator.name, devices=1, precision=accelerator.precision)
    set_up_process(accelerator.matmul_precision, accelerator.malloc)
    ckpt = None if cfg.ckpt is None else str(resolve_checkpoint(cfg.ckpt, cfg.paths.runs_dir))  # for the results
    model = load_model(ckpt, cfg.hf, cfg.paths.runs_dir).to(fabric.device).eval()
    lm = instantiate(cfg.lm, model=model)
    # a task of ours (conf/lm_eval_tasks/) goes to lm-eval built; any other name is one of lm-eval's own tasks
    tasks = [
        instantiate(cfg.local_tasks[name], _convert_="all") if name in cfg.local_tasks else name for name in cfg.tasks
    ]
    # lm-eval's own tasks are indexed only when asked for: reading their thousands of YAML files takes ~20 s
    task_manager = TaskManager(include_defaults=any(isinstance(task, str) for task in tasks))
    with fabric.autocast():
        results = instantiate(cfg.evaluate)(model=lm, tasks=tasks, task_manager=task_manager)
    results.pop("samples", None)
    results["config"]["model_args"] = {"ckpt": ckpt, "hf": cfg.hf}  # lm-eval leaves it empty for an LM object

    out = Path(cfg.paths.output_dir) / RESULTS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=lm_eval_utils.handle_non_serializable, ensure_ascii=False))
    metrics = task_metrics(results)
    for logger in (instantiate(c) for c in cfg.get("logger", {}).values()):
        logger.log_metrics(metrics, step=0)
        logger.finalize("success")
    print(lm_eval_utils.make_table(results))
    log.info("results in %s", out)
    return results


def task_metrics(results: dict) -> dict[str, float]:
    """lm_eval/<task>/<metric> for each metric lm-eval reports (its keys are `<metric>,<filter>`): `acc,none` is
    acc, `acc,<filter>` acc/<filter>; standard errors too, where they are numbers (lm-eval writes "N/A" where not)."""
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, is_metric, filter_name = key.partition(",")
            if is_metric and isinstance(value, (int, float)) and not isinstance(value, bool):
                suffix = "" if filter_name == "none" else f"/{filter_name}"
                metrics[f"lm_eval/{task}/{metric}{suffix}"] = float(value)
    return metrics
