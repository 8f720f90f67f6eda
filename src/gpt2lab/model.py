"""GPT-2 in plain PyTorch: attention, MLP, Block, the key/value cache for generation, config, GPT,
and the weight init.

Parameter names follow Hugging Face's GPT-2 (`transformer.h.0.attn.c_attn`, ...) so that weights map
one to one (gpt2lab.hf.load_pretrained reads them); their Conv1D layers store (in, out) where our nn.Linear
stores (out, in).

Design switches (GPTConfig: position, norm_placement, norm, qk_norm, activation, tie_embeddings, parametrization)
default to GPT-2's own choice; each alternative is a branch marked `# variant <switch>=<value>:`, so the GPT-2 path
reads first and alone (the alternatives' own pieces, sinusoids and Rotary, come last). With the defaults the model, its
parameter names and its numbers are GPT-2's.

parametrization=mup is μP for Adam (Yang et al. 2022, "Tensor Programs V", arXiv 2203.03466): with the width
multiplier m = n_embd / mup_base_width, attention scores are scaled 1/hs instead of 1/√hs, the logits × 1/m, the
blocks' matrices initialized with std × m^-0.5 (init_weights), and their AdamW lr × 1/m (gpt2lab.lit_module); at
n_embd = mup_base_width it is GPT-2's (sp) exactly. docs/mup.md.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

ATTENTION = ("sdpa", "eager")  # how attention is computed; the same result either way
# the design switches with a fixed set of values; GPT-2's choice first (the default)
CHOICES = {
    "position": ("learned", "sinusoidal", "rope"),
    "norm_placement": ("pre", "post"),
    "norm": ("layernorm", "rmsnorm"),
    "activation": ("gelu_tanh", "relu2"),
    "parametrization": ("sp", "mup"),
}


def check_attention(attention: str) -> None:
    if attention not in ATTENTION:
        raise ValueError(
            f"attention={attention!r}: must be one of {', '.join(ATTENTION)} (sdpa: F.scaled_dot_product_attention, "
            "flash where the backend has it; eager: softmax(q·kᵀ)·v in plain ops)"
        )


def make_norm(config: "GPTConfig", dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        # variant norm=rmsnorm: x / rms(x) · gain, no mean removed, no bias (Zhang & Sennrich 2019; llama);
        # LayerNorm's eps, so that the switch changes only those two things
        return nn.RMSNorm(dim, eps=1e-5)
    return nn.LayerNorm(dim)  # GPT-2: (x - mean) / std · gain + bias


class CausalSelfAttention(nn.Module):
    def __init__(self, config: "GPTConfig", attention: str):
        super().__init__()
        self.n_head = config.n_head
        self.attention = attention
        # query, key and value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        head_size = config.n_embd // config.n_head
        self.scale = 1 / math.sqrt(head_size)  # softmax(q·kᵀ·scale): 1/√hs (Vaswani et al. 2017), SDPA's own default
        if config.parametrization == "mup":
            # variant parametrization=mup: 1/hs (μP, Yang et al. 2022): once trained, q and k are correlated
            # and q·k grows ∝ hs, not √hs. As √hs_base / hs, hs_base = mup_base_width / n_head: 1/√hs, SP's, at the
            # base width exactly (the factor is then 1.0)
            self.scale *= math.sqrt(config.mup_base_width // config.n_head / head_size)
        self.q_norm = self.k_norm = self.rotary = None  # GPT-2: none of these
        if config.qk_norm:
            # variant qk_norm=true: RMSNorm on each head's queries and keys, one gain per dimension shared by
            # the heads (OLMo 2, Qwen3; modded-nanogpt without the gain): attention logits stay bounded
            self.q_norm, self.k_norm = nn.RMSNorm(head_size, eps=1e-5), nn.RMSNorm(head_size, eps=1e-5)
        if config.position == "rope":
            self.rotary = Rotary(head_size, config.block_size)  # variant position=rope: see Rotary, below
        # the largest attention logit of the forwards so far, while GPT.recording_attention_logits is on; else None
        self.logit_max: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, kv_cache: "KVCache | None" = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, embedding width
        q, k, v = self.c_attn(x).split(C, dim=2)
        # each head attends in its own hs = C / n_head subspace
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        start = 0 if kv_cache is None else kv_cache.pos  # position of x's first token
        if self.q_norm is not None:  # variant qk_norm=true: in float32, as autocast runs GPT-2's LayerNorms
            q, k = self.q_norm(q.float()).type_as(v), self.k_norm(k.float()).type_as(v)
        if self.rotary is not None:  # variant position=rope: rotated at their own positions, then cached
            q, k = self.rotary(q, start), self.rotary(k, start)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, start + T, hs): the cached prefix, then these T
        if self.logit_max is not None:  # a monitored step: its own q and k, before they are used
            self.logit_max = torch.maximum(self.logit_max, self.largest_logit(q, k, start))
        if self.attention == "sdpa" and start == 0:
            # softmax(q·kᵀ·scale + causal mask)·v; flash attention where the backend has it
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # (B, nh, T, hs)
        else:
            # query i sits at position start + i and sees keys 0..start + i; is_causal would align the
            # mask at the top-left corner instead, as if the queries were the first T positions
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            if self.attention == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, nh, T, hs)
            else:  # the same in three ops: in bf16 on CPU faster than PyTorch's flash kernel (README, Performance)
                att = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, T, start + T)
                att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
                y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.c_proj(y)

    @torch.no_grad()
    def largest_logit(self, q: torch.Tensor, k: torch.Tensor, start: int) -> torch.Tensor:
        """max of q·kᵀ·scale over the positions each query attends to: the logit that saturates the softmax first
        as it grows (Dehghani et al. 2023; Wortsman et al. 2023). SDPA never materializes the logits, so they are
        computed once more here: one (B, nh, T, start + T) matmul, freed as soon as its max is taken."""
        T = q.size(2)
        att = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, T, start + T)
        mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return att.masked_fill_(~mask, float("-inf")).amax()


class MLP(nn.Module):
    def __init__(self, config: "GPTConfig"):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.activation = config.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, 4C)
        if self.activation == "relu2":
            h = F.relu(h).square()  # variant activation=relu2: relu(x)² (Primer, So et al. 2021; modded-nanogpt)
        else:
            h = self.gelu(h)
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config: "GPTConfig", attention: str):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, attention)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)
        self.norm_placement = config.norm_placement

    def forward(self, x: torch.Tensor, kv_cache: "KVCache | None" = None, layer: int = 0) -> torch.Tensor:
        if self.norm_placement == "pre":
            # pre-LayerNorm: the residual stream itself is never normalized, only each branch's input
            x = x + self.attn(self.ln_1(x), kv_cache, layer)
            x = x + self.mlp(self.ln_2(x))
            return x
        # variant norm_placement=post: the original transformer's x = norm(x + sublayer(x)): the stream itself
        # is normalized after each residual add (Vaswani et al. 2017, section 3.1)
        x = self.ln_1(x + self.attn(x, kv_cache, layer))
        return self.ln_2(x + self.mlp(x))


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
    """The architecture: sizes from conf/model/*.yaml, the design switches' defaults here (GPT-2's); it checks that
    they fit together."""

    block_size: int  # longest sequence (context length)
    vocab_size: int  # tokenizer vocabulary: 50257 for GPT-2's BPE
    n_layer: int
    n_head: int
    n_embd: int
    pad_vocab: bool = False  # round the embedding rows up to a multiple of 64 (50304): faster matmuls
    # Design switches: the defaults are GPT-2's (the `model` config takes its keys and defaults from here), and
    # what a checkpoint written before the switch existed was built with.
    position: str = "learned"  # learned (wpe) | sinusoidal (fixed, the original transformer's) | rope (rotary)
    norm_placement: str = "pre"  # pre: norm(x) into each branch | post: norm(x + branch(x)), no ln_f
    norm: str = "layernorm"  # layernorm | rmsnorm
    qk_norm: bool = False  # true: RMSNorm on each head's queries and keys before attention
    activation: str = "gelu_tanh"  # MLP: gelu_tanh | relu2 (relu(x)²)
    tie_embeddings: bool = True  # the output layer is the token embedding; false: lm_head a matrix of its own
    # sp: GPT-2's (standard) parametrization | mup: μP for Adam (docs/mup.md): the best lr and init found at
    # mup_base_width carry over to wider models
    parametrization: str = "sp"
    mup_base_width: int = 128  # mup: the n_embd at which μP is sp (model=tiny's); width multiplier m = n_embd / this

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                "each head works in n_embd / n_head dimensions; pick sizes that divide"
            )
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"model.{name}={getattr(self, name)!r}: must be one of {', '.join(choices)} ({choices[0]}: GPT-2's)"
                )
        for name in ("qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name}={getattr(self, name)!r}: must be true or false")
        if self.parametrization == "mup":
            base = self.mup_base_width
            if isinstance(base, bool) or not isinstance(base, int) or base < 1 or base % self.n_head:
                near = base - base % self.n_head if isinstance(base, int) and base > self.n_head else self.n_head
                raise ValueError(
                    f"model.mup_base_width={base!r}: must be a positive integer divisible by model.n_head="
                    f"{self.n_head} (its head size sets μP's attention scale), e.g. {near} or {near + self.n_head}"
                )
        # rope rotates pairs of a head's dimensions, sinusoids pair the embedding's
        paired = {"rope": ("n_embd / n_head", self.n_embd // self.n_head), "sinusoidal": ("n_embd", self.n_embd)}
        if self.position in paired and paired[self.position][1] % 2:
            what, size = paired[self.position]
            raise ValueError(f"model.position={self.position} needs an even {what}, got {size}: pick sizes that fit")

    @property
    def width_mult(self) -> float:
        """μP's width multiplier m = n_embd / mup_base_width (parametrization=mup)."""
        return self.n_embd / self.mup_base_width

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
        modules = dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd))  # token embedding
        if config.position == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # learned position embedding
        elif config.position == "sinusoidal":
            # variant position=sinusoidal: a fixed buffer, not a parameter; not in state_dict either, since the
            # config rebuilds it exactly (a checkpoint holds what training learned). The original transformer adds
            # it to token embeddings scaled by √n_embd; scaling it by 1/√n_embd instead keeps that ratio and leaves
            # the (tied) token embedding GPT-2's: else, RMS 0.71 beside embeddings of std 0.02, it drowns the tokens
            pe = sinusoids(config.block_size, config.n_embd) * config.n_embd**-0.5
            self.register_buffer("sinusoids", pe, persistent=False)
        # (variant position=rope: no position embedding; attention rotates q and k instead, see Rotary)
        modules["h"] = nn.ModuleList([Block(config, attention) for _ in range(config.n_layer)])
        if config.norm_placement == "pre":
            # the stream is normalized once, at the end (variant post: the last block's ln_2 did that already,
            # and the original transformer has no final norm)
            modules["ln_f"] = make_norm(config, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            # weight tying: the output projection is the token embedding (one Parameter, GPT-2 and
            # "Using the Output Embedding to Improve Language Models", Press & Wolf 2017)
            self.transformer.wte.weight = self.lm_head.weight
        # (variant tie_embeddings=false: lm_head is a matrix of its own)

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
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.position == "learned":
            x = x + self.transformer.wpe(pos)
        elif self.config.position == "sinusoidal":  # variant position=sinusoidal
            x = x + self.sinusoids[pos]
        for layer, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.pos += T
        if self.config.norm_placement == "pre":
            x = self.transformer.ln_f(x)
        if self.config.parametrization == "mup":
            # variant parametrization=mup: the readout × 1/m (mup's MuReadout / MuSharedReadout, on its input as
            # there): its matrix keeps SP's init and lr, and once trained, aligned with x, W·x grows ∝ n_embd
            x = x / self.config.width_mult
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            # reshape, not view: targets may be a strided slice (seq[:, 1:])
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @contextmanager
    def recording_attention_logits(self) -> Iterator[Callable[[], torch.Tensor]]:
        """Within it, each forward keeps every layer's largest attention logit (CausalSelfAttention.largest_logit,
        on the forward's own q and k, without gradient); yields a function that returns them, (n_layer,): the max
        over the forwards so far. A training step's micro-batches are recorded together; outside it nothing is
        computed. Under torch.compile it is a second graph, compiled once."""
        attentions = [block.attn for block in self.transformer.h]
        for attention in attentions:
            attention.logit_max = torch.tensor(float("-inf"), device=self.lm_head.weight.device)
        try:
            yield lambda: torch.stack([attention.logit_max for attention in attentions])
        finally:
            for attention in attentions:
                attention.logit_max = None

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (the tied embedding too); non_embedding drops the embeddings that are
        only looked up, the convention of the FLOPs formula 6·N (Kaplan et al. 2020): the learned position
        embedding, and an untied token embedding (tied, it is also the lm_head matmul, and counts)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.position == "learned":
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at sequence length seq_len: 6·N + 12·n_layer·n_embd·T.

        6·N: each of the N non-embedding parameters does a multiply-add (2 FLOPs) per token forward and twice that
        backward (Kaplan et al. 2020); the tied token embedding counts once, as the lm_head matmul.
        12·n_layer·n_embd·T: attention's q·kᵀ and att·v, 2·2·T·n_embd per token per layer forward, ×3 with
        backward, causal masking not discounted (PaLM, appendix B; nanoGPT's estimate_mfu)."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * seq_len


@torch.no_grad()
def init_weights(model: GPT, std: float, scale_residual: bool) -> None:
    """GPT-2's init: N(0, std) for every Linear and Embedding weight (an untied lm_head too), zero biases,
    LayerNorm (1, 0), RMSNorm 1.

    With scale_residual, the two projections that write into the residual stream in each block
    (attn.c_proj, mlp.c_proj) get std·(2·n_layer)^-0.5, so the stream's variance does not grow with
    depth: the stream is a sum of 2·n_layer such outputs (GPT-2 paper, section 2.3).

    variant parametrization=mup: the blocks' matrices (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) get a variance
    ∝ 1/fan_in: std·m^-0.5 on top of the above, m = n_embd / mup_base_width; embeddings and an untied lm_head keep
    std (μP for Adam, Yang et al. 2022).
    """
    config = model.config
    residual_std = std * (2 * config.n_layer) ** -0.5 if scale_residual else std
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module_std = residual_std if name.endswith("c_proj") else std
            if config.parametrization == "mup" and name.startswith("transformer.h."):
                module_std *= config.width_mult**-0.5  # variant parametrization=mup: a hidden matrix
            nn.init.normal_(module.weight, mean=0.0, std=module_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)


# The alternatives' own pieces, used by the `variant` branches above


def sinusoids(block_size: int, n_embd: int) -> torch.Tensor:
    """The original transformer's fixed position encoding (Vaswani et al. 2017, section 3.5), (block_size, n_embd):
    PE(pos, 2i) = sin(pos / 10000^(2i/n_embd)), PE(pos, 2i+1) = cos(pos / 10000^(2i/n_embd))."""
    pos = torch.arange(block_size, dtype=torch.float32)[:, None]  # (block_size, 1)
    angles = pos / 10000 ** (torch.arange(0, n_embd, 2, dtype=torch.float32) / n_embd)  # (block_size, n_embd/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)  # sin, cos interleaved


class Rotary(nn.Module):
    """variant position=rope: rotary position embedding (RoFormer, Su et al. 2021). Each head's q and k are
    rotated by angles proportional to their position, so q·k depends on the positions' difference only.
    Half-split convention (llama, modded-nanogpt): dimension i pairs with i + hs/2, at frequency 10000^(-2i/hs)."""

    def __init__(self, head_size: int, block_size: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** -(torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (block_size, hs/2)
        # fixed by the config: not in state_dict, rebuilt with the model
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x (B, nh, T, hs) at positions start..start+T-1, rotated; in float32, returned in x's dtype."""
        cos, sin = self.cos[start : start + x.size(2)], self.sin[start : start + x.size(2)]  # (T, hs/2)
        x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hs/2) each
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)
