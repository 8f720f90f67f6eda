"""GPT-2's byte-pair encoding (tiktoken's "gpt2"): its name, its end-of-text id, and the one place it is
loaded, with the error that says what to do on a machine without network."""

import tiktoken

from gpt2lab.errors import DataError

NAME = "gpt2"  # tiktoken's encoding name, also recorded in each data dir's manifest
EOT_ID = 50256  # <|endoftext|>: starts every document in the shards, and ends sampling
VOCAB_SIZE = 50257  # ids 0..50256


def encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding; tiktoken caches it, so every call after the first in a process is free."""
    try:
        enc = tiktoken.get_encoding(NAME)
    except Exception as e:  # tiktoken downloads its BPE files on first use
        raise DataError(
            f"could not load the GPT-2 BPE files ({type(e).__name__}: {e}): tiktoken downloads them once; on an "
            "offline machine point TIKTOKEN_CACHE_DIR at a directory that holds them"
        ) from e
    assert enc.eot_token == EOT_ID and enc.n_vocab == VOCAB_SIZE, (enc.eot_token, enc.n_vocab)
    return enc
