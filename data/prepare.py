"""
Tokenize your own text into train/val shards.

    python -m data.prepare INPUT... --out DIR [--val-fraction 0.01] [--tokenizer gpt2|bytes]
                           [--tokenizer-file r50k_base.tiktoken] [--shard-tokens 100000000] [--workers N]

Each INPUT is one of:
    FILE.jsonl   one JSON object per line; its "text" field is a document
    FILE         any other file is one document (UTF-8 text)
    DIR          every *.txt, *.md, *.rst (one document each) and *.jsonl below DIR, recursively

Files are read in the order given, directories in sorted path order. Every
document becomes [end-of-text] + its tokens: the separator goes before each
document, as in llm.c and modded-nanogpt. Documents are split between train and
val deterministically (see goes_to_val) and packed into DIR/train_000000.bin,
DIR/val_000000.bin, ... each holding at most --shard-tokens tokens.
"""

import argparse
import json
import math
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.shard import MAX_TOKEN, write_shard
from data.tokenizer import TOKENIZERS, TokenizerDownloadError, get_tokenizer

DIR_SUFFIXES = (".txt", ".md", ".rst", ".jsonl")
DEFAULT_SHARD_TOKENS = 100_000_000


# -----------------------------------------------------------------------------
# reading documents

def find_input_files(inputs):
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in DIR_SUFFIXES and p.is_file())
            if not found:
                raise FileNotFoundError(f"{item}: no {'/'.join(DIR_SUFFIXES)} files anywhere below this directory")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    return files


def read_documents(files):
    for path in files:
        if path.suffix.lower() == ".jsonl":
            yield from read_jsonl(path)
        else:
            yield read_text(path)


def read_text(path):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def read_jsonl(path):
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)  # decoding errors are ValueErrors too
            except ValueError as e:
                raise ValueError(f"{path}:{line_number}: not a line of UTF-8 JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{line_number}: expected a JSON object with a string "text" field')
            yield record["text"]


# -----------------------------------------------------------------------------
# tokenizing, in parallel

def encode_document(enc, text):
    return np.array([enc.eot_token, *enc.encode_ordinary(text)], dtype=np.uint16)


worker_enc = None  # each pool worker's tokenizer, set once by init_worker


def init_worker(enc):
    global worker_enc
    worker_enc = enc


def encode_in_worker(text):
    return encode_document(worker_enc, text)


def encode_documents(documents, enc, workers):
    """Token arrays for documents, in order."""
    if workers == 1:  # no pool, nothing forked: the demo runs this inside the trainer
        yield from (encode_document(enc, text) for text in documents)
        return
    with Pool(workers, initializer=init_worker, initargs=(enc,)) as pool:
        yield from pool.imap(encode_in_worker, documents, chunksize=16)


# -----------------------------------------------------------------------------
# splitting and writing

def goes_to_val(index, val_fraction):
    # Document i goes to val when the quota ceil(f * documents seen) steps up, so
    # exactly ceil(f * n) of n documents land in val, evenly spread, and the first
    # is one of them: even a tiny corpus gets a val document.
    return math.ceil(val_fraction * (index + 1)) > math.ceil(val_fraction * index)


class ShardWriter:
    """Packs token arrays into out_dir/{split}_000000.bin, ... of shard_tokens tokens each."""

    def __init__(self, out_dir, split, shard_tokens):
        self.out_dir, self.split = out_dir, split
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.filled = 0
        self.paths = []
        self.total_tokens = 0

    def add(self, tokens):
        # A document may run across a shard boundary; the loaders read shards as one stream anyway.
        while len(tokens):
            take = min(len(tokens), len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self):
        if self.filled == 0:
            return
        path = self.out_dir / f"{self.split}_{len(self.paths):06d}.bin"
        write_shard(path, self.buffer[:self.filled])
        self.paths.append(path)
        self.total_tokens += self.filled
        self.filled = 0


def tokenize_to_shards(documents, out_dir, tokenizer="gpt2", rank_file=None, val_fraction=0.01,
                       shard_tokens=DEFAULT_SHARD_TOKENS, workers=1, progress=True):
    """Tokenize documents (an iterable of str) into train/val shards in out_dir; returns the two ShardWriters."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard size must be at least 1 token, got {shard_tokens}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    enc = get_tokenizer(tokenizer, rank_file)  # here, so a missing tokenizer fails before any work
    if enc.n_vocab - 1 > MAX_TOKEN:
        raise ValueError(f"tokenizer {tokenizer} has {enc.n_vocab} tokens, more than uint16 shards can hold")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Mixing in shards of an earlier run would silently change the data set.
    old = sorted(out_dir.glob("train_*.bin")) + sorted(out_dir.glob("val_*.bin"))
    if old:
        raise FileExistsError(
            f"{out_dir} already holds shards ({old[0].name}, ...); remove them or choose another --out"
        )

    train = ShardWriter(out_dir, "train", shard_tokens)
    val = ShardWriter(out_dir, "val", shard_tokens)
    count = 0
    with tqdm(unit="tok", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        for count, tokens in enumerate(encode_documents(documents, enc, workers), start=1):
            (val if goes_to_val(count - 1, val_fraction) else train).add(tokens)
            bar.update(len(tokens))
    train.flush()
    val.flush()
    if count == 0:
        raise ValueError("no documents to tokenize")
    if not train.paths:
        raise ValueError(f"all {count} documents went to val with val fraction {val_fraction}; add more text")
    return train, val


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="text files, .jsonl files or directories")
    parser.add_argument("--out", required=True, help="directory for the train_*.bin and val_*.bin shards")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="share of documents for val (default 0.01)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="gpt2")
    parser.add_argument("--tokenizer-file", help="local r50k_base.tiktoken rank file, for gpt2 without network")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="max tokens per shard")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="tokenizer processes (default: all cores)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        documents = read_documents(find_input_files(args.inputs))
        train, val = tokenize_to_shards(documents, args.out, args.tokenizer, args.tokenizer_file, args.val_fraction,
                                        args.shard_tokens, args.workers)
    except TokenizerDownloadError as e:
        sys.exit(f"error: {e}; pass it with --tokenizer-file /path/to/r50k_base.tiktoken")
    except (OSError, ValueError) as e:  # missing input, bad JSONL or UTF-8, shards already there, ...
        sys.exit(f"error: {e}")
    for split in (train, val):
        print(f"{split.split}: {split.total_tokens:,} tokens in {len(split.paths)} shards in {args.out}")


if __name__ == "__main__":
    main()
