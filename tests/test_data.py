"""Tests of data/: shard format, tokenizers, prepare, fineweb download, demo data, loaders. CPU only, offline."""

import base64
import json
import math
import os
import re
import struct

import numpy as np
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

from data import fineweb, prepare
from data.demo import ensure_demo_shards
from data.loader import TrainLoader, ValLoader
from data.shard import read_header, read_shard, write_shard
from data.tokenizer import TokenizerDownloadError, get_tokenizer

EOT = 256  # end-of-text of the bytes tokenizer


# -----------------------------------------------------------------------------
# shard format

def test_shard_round_trip_has_the_exact_layout(tmp_path):
    path = tmp_path / "s.bin"
    tokens = [0, 1, 256, 50256, 65535]
    write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    assert struct.unpack("<3i", raw[:12]) == (20240520, 1, len(tokens))
    assert raw[12:1024] == bytes(1012)
    assert raw[1024:] == struct.pack(f"<{len(tokens)}H", *tokens)
    assert read_header(path) == len(tokens)
    assert read_shard(path).tolist() == tokens
    assert os.listdir(tmp_path) == ["s.bin"]  # no temp file left behind


def test_empty_shard_round_trips(tmp_path):
    write_shard(tmp_path / "e.bin", np.array([], dtype=np.uint16))
    assert read_shard(tmp_path / "e.bin").tolist() == []


def test_write_rejects_tokens_that_do_not_fit_uint16(tmp_path):
    with pytest.raises(ValueError, match=r"big\.bin.*uint16"):
        write_shard(tmp_path / "big.bin", [1, 65536])
    assert not list(tmp_path.iterdir())


def test_a_crash_while_writing_keeps_the_old_shard(tmp_path, monkeypatch):
    path = tmp_path / "s.bin"
    write_shard(path, [1, 2, 3])

    def crash(fd):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk on fire"):
        write_shard(path, [4, 5, 6, 7])
    assert read_shard(path).tolist() == [1, 2, 3]
    assert os.listdir(tmp_path) == ["s.bin"]


def corrupt(path, how):
    raw = bytearray(path.read_bytes())
    if how == "magic":
        raw[0:4] = struct.pack("<i", 12345)
    elif how == "version":
        raw[4:8] = struct.pack("<i", 7)
    elif how == "truncated":
        raw = raw[:-1]
    elif how == "extra bytes":
        raw += b"\0\0"
    elif how == "no header":
        raw = raw[:100]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how, message", [
    ("magic", "bad magic number 12345, expected 20240520"),
    ("version", "unsupported shard version 7, expected 1"),
    ("truncated", r"header says 10 tokens \(1044 bytes\) but the file is 1043 bytes"),
    ("extra bytes", r"header says 10 tokens \(1044 bytes\) but the file is 1046 bytes"),
    ("no header", "100 bytes is too short for the 1024-byte shard header"),
])
def test_corrupt_shards_are_rejected_by_name(tmp_path, how, message):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(10))
    corrupt(path, how)
    for read in (read_header, read_shard):
        with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
            read(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        TrainLoader(tmp_path / "train_*.bin", batch_size=1, seq_len=2)


# -----------------------------------------------------------------------------
# tokenizers

def test_bytes_tokenizer():
    enc = get_tokenizer("bytes")
    assert (enc.n_vocab, enc.eot_token) == (257, EOT)
    text = "héllo <|endoftext|> 🐍"
    ids = enc.encode_ordinary(text)
    assert ids == list(text.encode("utf-8"))
    assert enc.decode(ids + [EOT]) == text + "<|endoftext|>"


def test_gpt2_from_a_rank_file_is_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tiktoken does not exist"):
        get_tokenizer("gpt2", tmp_path / "missing.tiktoken")
    small = tmp_path / "small.tiktoken"
    small.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    with pytest.raises(ValueError, match=r"small\.tiktoken: 256 ranks, expected 50256"):
        get_tokenizer("gpt2", small)
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt3'"):
        get_tokenizer("gpt3")


def test_gpt2_without_network_says_to_pass_the_rank_file(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")  # what requests raises is an OSError like this

    monkeypatch.setattr("tiktoken.get_encoding", offline)
    # Each command line adds its own flag (train.py: --data.tokenizer_file; data.prepare: --tokenizer-file).
    with pytest.raises(TokenizerDownloadError, match=r"give a local copy of the rank file r50k_base\.tiktoken"):
        get_tokenizer("gpt2")


# -----------------------------------------------------------------------------
# prepare

def make_corpus(root):
    """Inputs for prepare and the documents they hold, in the order prepare reads them."""
    (root / "dir" / "sub").mkdir(parents=True)
    files = {
        "a.txt": "A plain text file.\nTwo lines, ünïcødé 🐍.\n",
        "dir/b.md": "# Markdown\n\ntext that mentions <|endoftext|> literally\n",
        "dir/sub/c.rst": "reStructuredText\n================\n",
        "dir/sub/skipped.py": "print('not a text suffix, not picked up from a directory')\n",
    }
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    z_lines = ["from the directory's jsonl"]
    jsonl_lines = [f"document {i}: " + "words " * i for i in range(12)]
    (root / "dir" / "z.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in z_lines))
    (root / "e.jsonl").write_text("".join(json.dumps({"text": t, "id": 1}) + "\n\n" for t in jsonl_lines))
    inputs = [str(root / "a.txt"), str(root / "dir"), str(root / "e.jsonl")]
    documents = [files["a.txt"], files["dir/b.md"], files["dir/sub/c.rst"], *z_lines, *jsonl_lines]
    return inputs, documents


def read_split(out_dir, split):
    """Decoded documents of a split, read back through the shard reader."""
    paths = sorted(out_dir.glob(f"{split}_*.bin"))
    stream = np.concatenate([read_shard(p) for p in paths])
    assert stream[0] == EOT  # the separator goes before each document
    pieces = np.split(stream, np.flatnonzero(stream == EOT))[1:]
    enc = get_tokenizer("bytes")
    return [enc.decode(piece[1:].tolist()) for piece in pieces], paths


def test_prepare_writes_every_document_and_splits_deterministically(tmp_path):
    inputs, documents = make_corpus(tmp_path)
    args = ["--tokenizer", "bytes", "--val-fraction", "0.25", "--shard-tokens", "64"]
    prepare.main([*inputs, "--out", str(tmp_path / "out1"), "--workers", "2", *args])
    prepare.main([*inputs, "--out", str(tmp_path / "out2"), "--workers", "1", *args])

    train, train_paths = read_split(tmp_path / "out1", "train")
    val, val_paths = read_split(tmp_path / "out1", "val")
    expected_val = [d for i, d in enumerate(documents) if prepare.goes_to_val(i, 0.25)]
    assert len(expected_val) == math.ceil(0.25 * len(documents))
    assert val == expected_val
    assert train == [d for i, d in enumerate(documents) if not prepare.goes_to_val(i, 0.25)]
    assert [p.name for p in train_paths[:2]] == ["train_000000.bin", "train_000001.bin"]
    assert val_paths[0].name == "val_000000.bin"
    assert all(read_header(p) == 64 for p in train_paths[:-1])  # full shards but the last

    # Same inputs, any number of workers: the same bytes.
    names = sorted(p.name for p in (tmp_path / "out1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out2").iterdir())
    for name in names:
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()


def test_prepare_refuses_to_mix_with_old_shards(tmp_path):
    inputs, _ = make_corpus(tmp_path)
    prepare.main([*inputs, "--out", str(tmp_path / "out"), "--tokenizer", "bytes", "--workers", "1"])
    with pytest.raises(SystemExit, match="^error: .* already holds shards"):  # one line, no traceback
        prepare.main([*inputs, "--out", str(tmp_path / "out"), "--tokenizer", "bytes", "--workers", "1"])


def test_prepare_names_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(SystemExit, match="error: " + re.escape(f"{bad}:2") + r': expected a JSON object with a string "text"'):
        prepare.main([str(bad), "--out", str(tmp_path / "out"), "--tokenizer", "bytes", "--workers", "2"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"empty: no \.txt/\.md/\.rst/\.jsonl files"):
        prepare.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--tokenizer", "bytes"])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(SystemExit, match=r"latin1\.txt: not UTF-8 text"):
        prepare.main([str(latin1), "--out", str(tmp_path / "out"), "--tokenizer", "bytes", "--workers", "1"])


# -----------------------------------------------------------------------------
# fineweb download, against a fake hub

class FakeHub:
    """Stands in for hf_hub_download: writes a valid shard into the directory it is given."""

    def __init__(self):
        self.downloaded = []

    def __call__(self, repo_id, filename, *, repo_type, local_dir, endpoint):
        assert (repo_id, repo_type) == ("kjj0/fineweb10B-gpt2", "dataset")
        assert re.fullmatch(r"fineweb_(val_000000|train_0000\d\d)\.bin", filename)
        self.downloaded.append(filename)
        path = os.path.join(local_dir, filename)
        write_shard(path, np.arange(len(self.downloaded) * 10))
        return path


def test_fineweb_downloads_skips_complete_and_refetches_truncated(tmp_path, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(fineweb, "hf_hub_download", hub)
    out = tmp_path / "fineweb"
    paths = fineweb.download_fineweb(2, out, endpoint="http://127.0.0.1")
    expected = ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [p.name for p in paths] == expected
    assert hub.downloaded == expected
    assert all(read_header(p) > 0 for p in paths)

    fineweb.download_fineweb(2, out, endpoint="http://127.0.0.1")
    assert hub.downloaded == expected  # all present and complete: nothing fetched

    corrupt(out / "fineweb_train_000001.bin", "truncated")
    fineweb.download_fineweb(3, out, endpoint="http://127.0.0.1")
    assert hub.downloaded == expected + ["fineweb_train_000001.bin", "fineweb_train_000003.bin"]
    assert read_header(out / "fineweb_train_000001.bin") == 40


def clear_proxies(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_fineweb_offline_fails_fast_with_advice(tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the download should not have been tried")

    clear_proxies(monkeypatch)
    monkeypatch.setattr(fineweb, "hf_hub_download", never)
    monkeypatch.setattr(fineweb.constants, "ENDPOINT", "https://hub.invalid")  # .invalid never resolves
    with pytest.raises(SystemExit, match="cannot reach the Hugging Face Hub at https://hub.invalid"):
        fineweb.main(["--train-shards", "1", "--out", str(tmp_path)])


def test_fineweb_connection_lost_mid_way_is_explained(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr(fineweb, "hf_hub_download", unreachable)
    with pytest.raises(ConnectionError, match=r"cannot download fineweb_val_000000\.bin from .*demo\.toml"):
        fineweb.download_fineweb(1, tmp_path, endpoint="http://127.0.0.1")


# -----------------------------------------------------------------------------
# demo data

def test_demo_shards_are_built_once(tmp_path, capsys):
    out = tmp_path / "demo"
    assert ensure_demo_shards(out) == out
    message = capsys.readouterr().out
    assert re.fullmatch(rf"demo data: built [\d,]+ train \+ [\d,]+ val tokens .* in {re.escape(str(out))}\n", message)
    train, val = read_shard(out / "train_000000.bin"), read_shard(out / "val_000000.bin")
    assert len(train) > 1_000_000 and len(val) > 50_000
    assert train[0] == EOT and int(train.max()) <= EOT
    stamps = [p.stat().st_mtime_ns for p in sorted(out.iterdir())]

    assert ensure_demo_shards(out) == out
    assert capsys.readouterr().out == ""
    assert [p.stat().st_mtime_ns for p in sorted(out.iterdir())] == stamps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no build directory left


# -----------------------------------------------------------------------------
# loaders

B, T = 2, 8


@pytest.fixture
def train_shards(tmp_path):
    """Three shards of distinct, consecutive tokens: 21, 14 and 8 windows of T + 1 (a window every T
    tokens); the pattern matching them."""
    sizes = [175, 119, 67]
    start = 0
    for i, size in enumerate(sizes):
        write_shard(tmp_path / f"train_{i:06d}.bin", np.arange(start, start + size))
        start += size
    return str(tmp_path / "train_*.bin")


def batches(loader, n):
    return [next(loader) for _ in range(n)]


STEPS_PER_EPOCH = 5 + 3 + 2  # per shard: windows // (2 ranks x B)


def test_train_batches_are_shifted_int64_pairs(train_shards):
    x, y = next(TrainLoader(train_shards, B, T))
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # each row is one window of the (consecutive) tokens, y shifted by one


def test_two_ranks_never_see_the_same_inputs_and_batches_mix_the_shard(train_shards):
    seen = []
    for rank in range(2):
        loader = TrainLoader(train_shards, B, T, rank=rank, world_size=2, seed=1)
        epoch = batches(loader, STEPS_PER_EPOCH)
        inputs = torch.cat([x.flatten() for x, _ in epoch]).tolist()
        assert len(inputs) == len(set(inputs)) == STEPS_PER_EPOCH * B * T  # one epoch: no window twice
        assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["shard"] == 2  # the epoch's last shard
        # A batch's sequences are windows from anywhere in the shard, not one run of B * T tokens.
        assert any(int(x[1, 0]) != int(x[0, -1]) + 1 for x, _ in epoch)
        seen.append(set(inputs))
    assert not seen[0] & seen[1]
    # What train.py reports as a pass: both ranks' input tokens.
    assert loader.tokens_per_pass() == 2 * STEPS_PER_EPOCH * B * T


def test_train_order_follows_the_seed(train_shards):
    def run(seed, rank=0):
        return [x for x, _ in batches(TrainLoader(train_shards, B, T, rank, 2, seed=seed), 3 * STEPS_PER_EPOCH)]

    first, again, other = run(seed=0), run(seed=0), run(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    epoch0, epoch1 = first[:STEPS_PER_EPOCH], first[STEPS_PER_EPOCH:2 * STEPS_PER_EPOCH]
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1))  # each epoch reshuffles


def test_resume_gives_the_identical_next_batch(train_shards):
    loader = TrainLoader(train_shards, B, T, rank=1, world_size=2, seed=3)
    history = []
    for _ in range(2 * STEPS_PER_EPOCH + 3):
        state = loader.state_dict()
        history.append((state, next(loader)))
    states = [s for s, _ in history]
    assert all(type(v) is int for s in states for v in s.values())
    assert {s["epoch"] for s in states} == {0, 1, 2} and {s["shard"] for s in states} == {0, 1, 2}
    for state, (x, y) in history:  # every position, shard and epoch boundaries included
        resumed = TrainLoader(train_shards, B, T, rank=1, world_size=2, seed=3)
        resumed.load_state_dict(json.loads(json.dumps(state)))
        rx, ry = next(resumed)
        assert torch.equal(rx, x) and torch.equal(ry, y), state


def test_bad_train_setups_are_named(train_shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard files match .*nothing_"):
        TrainLoader(str(tmp_path / "nothing_*.bin"), B, T)
    with pytest.raises(ValueError, match="holds world_size"):
        TrainLoader(train_shards, 64, 64)
    loader = TrainLoader(train_shards, B, T)
    with pytest.raises(ValueError, match="keys epoch, shard, step"):
        loader.load_state_dict({"epoch": 0, "shard": 0})
    with pytest.raises(ValueError, match="has only"):
        loader.load_state_dict({"epoch": 0, "shard": 0, "step": 99})


@pytest.fixture
def val_shards(tmp_path):
    """Two val shards, 50 and 100 tokens, holding 0..149."""
    write_shard(tmp_path / "val_000000.bin", np.arange(50))
    write_shard(tmp_path / "val_000001.bin", np.arange(50, 150))
    return str(tmp_path / "val_*.bin")


def test_val_loader_covers_exactly_the_asked_tokens_the_same_every_time(val_shards):
    num_tokens = 3 * 2 * B * T  # 3 steps of 2 ranks: reaches into the second shard
    inputs = []
    for rank in range(2):
        loader = ValLoader(val_shards, num_tokens, B, T, rank=rank, world_size=2)
        assert len(loader) == 3
        first, second = list(loader), list(loader)
        assert len(first) == 3
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
        assert all(torch.equal(y, x + 1) for x, y in first)  # the tokens are 0..149, so targets are inputs + 1
        inputs += [x for x, _ in first]
    assert sorted(torch.cat([x.flatten() for x in inputs]).tolist()) == list(range(num_tokens))


def test_val_loader_errors(val_shards):
    with pytest.raises(ValueError, match="hold 150 tokens, fewer than the 161 needed"):
        ValLoader(val_shards, 160, B, T)
    with pytest.raises(ValueError, match="multiple of world_size"):
        ValLoader(val_shards, 100, B, T)
    ValLoader(val_shards, 144, 1, 16)  # 144 tokens + 1 target fit in 150


def test_a_val_set_smaller_than_one_batch_names_the_batch_and_sequence_that_fit(tmp_path):
    write_shard(tmp_path / "val_000000.bin", np.arange(1000) % 200)
    message = (r"hold 1000 tokens, fewer than the 2049 needed .* one validation batch needs 2049 tokens: set "
               r"train.micro_batch_size to at most 7 \(and data.val_tokens to 896\) or data.seq_len to at most 62 "
               r"\(and data.val_tokens to 992\)")
    with pytest.raises(ValueError, match=message):
        ValLoader(tmp_path / "val_*.bin", 2048, 16, 128)
    assert len(ValLoader(tmp_path / "val_*.bin", 896, 7, 128)) == 1  # what it names fits
    assert len(ValLoader(tmp_path / "val_*.bin", 992, 16, 62)) == 1
    with pytest.raises(ValueError, match=r"one validation batch needs 1000001: give the val set more text"):
        ValLoader(tmp_path / "val_*.bin", 1_000_000, 1000, 1000)  # neither a smaller batch nor sequence fits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_loaders_put_batches_on_the_gpu(train_shards, val_shards):
    x, y = next(TrainLoader(train_shards, B, T, device="cuda"))
    assert x.is_cuda and y.is_cuda
    x, y = next(iter(ValLoader(val_shards, 32, B, T, device="cuda")))
    assert torch.equal(y.cpu(), x.cpu() + 1)
