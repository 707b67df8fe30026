"""
The one place tokenizers are made. Two are known:

    gpt2   GPT-2's BPE (tiktoken's r50k_base), 50257 tokens, end-of-text = 50256.
           Fetched by tiktoken on first use, or read from a local rank file
           (r50k_base.tiktoken) on machines without network.
    bytes  one token per UTF-8 byte (0..255) plus end-of-text = 256. Needs no
           files at all, which is what the tests and the offline demo rely on.

Both are tiktoken.Encoding objects: the trainer uses .encode_ordinary(),
.decode(), .eot_token and .n_vocab.
"""

from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256

# r50k_pat_str from tiktoken_ext/openai_public.py: GPT-2's split pattern with
# possessive quantifiers (tiktoken >= 0.8), which tokenizes identically but faster.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

TOKENIZERS = ("gpt2", "bytes")


class TokenizerDownloadError(RuntimeError):
    """tiktoken could not fetch GPT-2's files; each command line says how to pass a local copy."""


def get_tokenizer(name="gpt2", rank_file=None):
    """A tiktoken.Encoding for name ("gpt2" or "bytes"); rank_file is a local r50k_base.tiktoken for gpt2."""
    if name == "gpt2":
        return gpt2_from_file(rank_file) if rank_file else gpt2_from_tiktoken()
    if name == "bytes":
        if rank_file:
            raise ValueError(f"the bytes tokenizer needs no rank file, but got {rank_file}")
        return bytes_tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}, expected one of {', '.join(TOKENIZERS)}")


def gpt2_from_tiktoken():
    try:
        return tiktoken.get_encoding("gpt2")
    except OSError as e:  # requests' connection errors are OSErrors
        raise TokenizerDownloadError(
            f"could not download the GPT-2 tokenizer files ({e.__class__.__name__}); without network, give a local "
            "copy of the rank file r50k_base.tiktoken (from "
            "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken)"
        ) from e


def gpt2_from_file(rank_file):
    rank_file = Path(rank_file)
    if not rank_file.is_file():
        raise FileNotFoundError(f"tokenizer rank file {rank_file} does not exist")
    try:
        ranks = load_tiktoken_bpe(str(rank_file))
    except ValueError as e:  # includes base64 decoding errors
        raise ValueError(f"{rank_file}: not a tiktoken rank file ({e})") from e
    if len(ranks) != GPT2_EOT_ID:
        raise ValueError(f"{rank_file}: {len(ranks)} ranks, expected {GPT2_EOT_ID} (is it r50k_base.tiktoken?)")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: GPT2_EOT_ID},
        explicit_n_vocab=GPT2_EOT_ID + 1,
    )


def bytes_tokenizer():
    # With no merges the split pattern cannot change the tokens; GPT-2's is as good as any.
    return tiktoken.Encoding(
        name="bytes",
        pat_str=GPT2_PATTERN,
        mergeable_ranks={bytes([b]): b for b in range(256)},
        special_tokens={EOT: 256},
    )
