"""GPT-2 in plain PyTorch: attention, MLP, Block, the key/value cache for generation, config, GPT,
and the weight init.

Parameter names follow Hugging Face's GPT-2 (`transformer.h.0.attn.c_attn`, ...) so that weights map
one to one (gpt2lab.hf.load_pretrained reads them); their Conv1D layers store (in, out) where our nn.Linear
stores (out, in).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

ATTENTION = ("sdpa", "eager")  # how attention is computed; the same result either way


def check_attention(attention: str) -> None:
    if attention not in ATTENTION:
        raise ValueError(
            f"attention={attention!r}: must be one of {', '.join(ATTENTION)} (sdpa: F.scaled_dot_product_attention, "
            "flash where the backend has it; eager: softmax(q·kᵀ)·v in plain ops)"
        )


class CausalSelfAttention(nn.Module):
    def __init__(self, config: "GPTConfig", attention: str):
        super().__init__()
        self.n_head = config.n_head
        self.attention = attention
        # query, key and value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, kv_cache: "KVCache | None" = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, embedding width
        q, k, v = self.c_attn(x).split(C, dim=2)
        # each head attends in its own hs = C / n_head subspace
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        start = 0  # position of x's first token
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(layer, k, v)  # (B, nh, start + T, hs): the cached prefix, then these T
        if self.attention == "sdpa" and start == 0:
            # softmax(q·kᵀ/√hs + causal mask)·v; flash attention where the backend has it
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        else:
            # query i sits at position start + i and sees keys 0..start + i; is_causal would align the
            # mask at the top-left corner instead, as if the queries were the first T positions
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            if self.attention == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
            else:  # the same in three ops: in bf16 on CPU faster than PyTorch's flash kernel (README, Performance)
                att = (q @ k.transpose(-2, -1)) * k.size(-1) ** -0.5  # (B, nh, T, start + T)
                att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
                y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: "GPTConfig"):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: "GPTConfig", attention: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, attention)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: "KVCache | None" = None, layer: int = 0) -> torch.Tensor:
        # pre-LayerNorm: the residual stream itself is never normalized, only each branch's input
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class KVCache:
    """The keys and values of every layer for the positions already run, so that generating a token
    runs the model on that one position, not the whole context: attention still sees every position.
    Filled by GPT.forward(idx, kv_cache=...); one cache per sequence batch, up to block_size positions."""

    def __init__(self, config: "GPTConfig"):
        self.block_size = config.block_size
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * config.n_layer
        self.pos = 0  # positions 0..pos-1 are cached

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the keys and values (B, nh, T, hs) of the T positions from self.pos on; return those of all
        positions so far. GPT.forward advances self.pos once every layer has stored its own."""
        if self.layers[layer] is None:
            # allocated whole on first use, in the dtype autocast gives k and v: appending never copies
            B, nh, _, hs = k.shape
            self.layers[layer] = (k.new_empty(B, nh, self.block_size, hs), v.new_empty(B, nh, self.block_size, hs))
        cache_k, cache_v = self.layers[layer]
        end = self.pos + k.size(2)
        cache_k[:, :, self.pos : end] = k
        cache_v[:, :, self.pos : end] = v
        return cache_k[:, :, :end], cache_v[:, :, :end]


@dataclass
class GPTConfig:
    """The architecture. Sizes live in conf/model/*.yaml; this only checks they fit together."""

    block_size: int  # longest sequence (context length)
    vocab_size: int  # tokenizer vocabulary: 50257 for GPT-2's BPE
    n_layer: int
    n_head: int
    n_embd: int
    pad_vocab: bool = False  # round the embedding rows up to a multiple of 64 (50304): faster matmuls

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                "each head works in n_embd / n_head dimensions; pick sizes that divide"
            )

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding / logits: the extra ones are tokens that never occur."""
        return math.ceil(self.vocab_size / 64) * 64 if self.pad_vocab else self.vocab_size


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, attention: str = "sdpa"):
        """attention: "sdpa" (F.scaled_dot_product_attention: flash attention where the backend has it)
        or "eager" (softmax(q·kᵀ/√hs)·v in plain ops). How to compute, not what: it is not part of the
        config, so checkpoints and exports do not carry it."""
        super().__init__()
        check_attention(attention)
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # token embedding
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embedding
                h=nn.ModuleList([Block(config, attention) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # weight tying: the output projection is the token embedding (one Parameter, GPT-2 and
        # "Using the Output Embedding to Improve Language Models", Press & Wolf 2017)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position of idx (B, T), and the mean cross-entropy against targets if given.
        With a kv_cache, idx continues the sequence cached so far: its tokens sit at positions
        kv_cache.pos onwards, and their keys and values are added to the cache."""
        B, T = idx.size()
        start = 0 if kv_cache is None else kv_cache.pos
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of length {start + T} is longer than the context, block_size={self.config.block_size}: "
                "shorten it (e.g. keep its last block_size tokens)"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (the tied embedding too); non_embedding drops the position
        embedding, the convention of the FLOPs formula 6·N (Kaplan et al. 2020)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n


@torch.no_grad()
def init_weights(model: GPT, std: float, scale_residual: bool) -> None:
    """GPT-2's init: N(0, std) for every Linear and Embedding weight, zero biases, LayerNorm (1, 0).

    With scale_residual, the two projections that write into the residual stream in each block
    (attn.c_proj, mlp.c_proj) get std·(2·n_layer)^-0.5, so the stream's variance does not grow with
    depth: the stream is a sum of 2·n_layer such outputs (GPT-2 paper, section 2.3).
    """
    residual_std = std * (2 * model.config.n_layer) ** -0.5 if scale_residual else std
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=residual_std if name.endswith("c_proj") else std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
