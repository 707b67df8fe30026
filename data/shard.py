"""
The token shard file format, shared with llm.c and modded-nanogpt:

    256 little-endian int32 header values:
        header[0] = 20240520 (magic), header[1] = 1 (version), header[2] = token count
    then the tokens as little-endian uint16.

Every reader checks the header against the file size, so a truncated or foreign
file is an error that names it, never a silent partial read.
"""

import os
import secrets
from pathlib import Path

import numpy as np

MAGIC = 20240520
LLMC_UINT32_MAGIC = 20240801  # llm.c's other format: uint32 tokens (its LLaMA-3 shards)
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKEN = 2**16 - 1  # tokens are stored as uint16
MAX_COUNT = 2**31 - 1  # the count is stored as int32


def write_shard(path, tokens):
    """Write tokens (integers in [0, 65535]) as a shard at path, atomically."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
        raise ValueError(f"{path}: expected a 1-D array of integer tokens, got {tokens.dtype} {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_TOKEN):
        raise ValueError(
            f"{path}: tokens must fit in uint16 [0, {MAX_TOKEN}], found range [{tokens.min()}, {tokens.max()}]"
        )
    if tokens.size > MAX_COUNT:
        raise ValueError(f"{path}: {tokens.size} tokens is more than a shard header can count ({MAX_COUNT})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, tokens.size

    def write(f):
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    write_atomically(path, write)


def write_atomically(path, write):
    """Call write(f) on a new file beside path, then rename it over path (shards, checkpoints).

    A crash or a full disk leaves either the old file or the complete new one, never half of
    one. (The temp file is named by hand rather than by tempfile.mkstemp, whose files ignore
    the umask.)
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_header(path):
    """Check the shard at path is whole and return its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is too short for the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, count = (int(v) for v in header[:3])
    if magic == LLMC_UINT32_MAGIC:
        raise ValueError(f"{path}: an llm.c shard of uint32 tokens (magic {magic}, version {version}; llm.c writes "
                         f"LLaMA-3 tokens this way); this trainer reads uint16 shards (magic {MAGIC}), whose "
                         "vocabulary fits 65,536 ids, such as GPT-2's")
    if magic != MAGIC:
        raise ValueError(f"{path}: bad magic number {magic}, expected {MAGIC} (not a token shard?)")
    if version != VERSION:
        raise ValueError(f"{path}: unsupported shard version {version}, expected {VERSION}")
    expected_size = HEADER_BYTES + 2 * count
    if count < 0 or size != expected_size:
        raise ValueError(
            f"{path}: header says {count} tokens ({expected_size} bytes) but the file is {size} bytes "
            "(truncated or corrupted)"
        )
    return count


def read_shard(path):
    """The tokens of the shard at path as a read-only uint16 memmap (nothing is loaded until used)."""
    count = read_header(path)
    if count == 0:
        return np.empty(0, dtype="<u2")  # mmap cannot map zero bytes
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
