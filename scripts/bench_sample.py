"""Measure sampling speed with and without the key/value cache:
`python scripts/bench_sample.py [--models tiny small] [--max-new-tokens 256] [--repeat 2] [--threads 1]`.

For each model size (conf/model/<name>.yaml with GPT-2's init; random weights, as speed does not depend on
them) it generates max_new_tokens tokens from <|endoftext|> with top-k sampling, alternating cached and
uncached runs so that both see the same machine load, and reports tokens/s (best of --repeat) and their
ratio. Both modes sample the same tokens (tests/test_sample.py). Once a sequence outgrows block_size its
window slides and each further token costs a full run in both modes (model=tiny, block_size 256: the
256th new token).
"""

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from tqdm import tqdm

from gpt2lab import tokenizer
from gpt2lab.accelerator import detect_device
from gpt2lab.config import register_resolvers
from gpt2lab.model import GPT
from gpt2lab.sample import generate

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def build_model(name: str, device: str) -> GPT:
    """model=<name> as training builds it, from the real configs."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"])
    model = GPT(instantiate(cfg.model))
    instantiate(cfg.init)(model)
    return model.to(device).eval()


def tokens_per_second(model: GPT, kv_cache: bool, max_new_tokens: int, num_samples: int, device: str) -> float:
    idx = torch.full((num_samples, 1), tokenizer.EOT_ID, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(model, idx, max_new_tokens, top_k=50, generator=generator, kv_cache=kv_cache)
    if device == "cuda":
        torch.cuda.synchronize()
    return num_samples * (out.size(1) - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], help="conf/model options")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--num-samples", type=int, default=1, help="sequences generated together (batch)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default=detect_device())
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, {torch.get_num_threads()} threads, {args.max_new_tokens} new tokens × "
          f"{args.num_samples} sample(s), best of {args.repeat}")  # fmt: skip
    for name in args.models:
        model = build_model(name, args.device)
        tokens_per_second(model, True, 8, args.num_samples, args.device)  # warm-up: first-call allocations
        speeds: dict[bool, list[float]] = {True: [], False: []}
        runs = [(r, cached) for r in range(args.repeat) for cached in (True, False)]  # alternating
        for _, cached in tqdm(runs, desc=f"model={name}", leave=False):
            speeds[cached].append(tokens_per_second(model, cached, args.max_new_tokens, args.num_samples, args.device))
        with_cache, without = max(speeds[True]), max(speeds[False])
        print(f"model={name:6s} ({model.num_params() / 1e6:5.1f}M): with KV cache {with_cache:8.1f} tokens/s, "
              f"without {without:8.1f} tokens/s: {with_cache / without:5.1f}× faster")  # fmt: skip


if __name__ == "__main__":
    main()
