"""
Download pre-tokenized FineWeb (GPT-2 tokens) from the Hugging Face dataset
kjj0/fineweb10B-gpt2, the data of the modded-nanogpt speedrun:

    python -m data.fineweb --train-shards 17 --out data/cache/fineweb10B

fetches fineweb_val_000000.bin and fineweb_train_000001.bin .. _000017.bin
(100M tokens, 200 MB each; 103 train shards exist). 17 is what configs/*.toml read
once: 3200 steps of 524,288 tokens are 1.68B tokens. Files already present and
complete are skipped, so an interrupted download can simply be run again.
HF_ENDPOINT and the other huggingface_hub settings apply as usual.
"""

import argparse
import socket
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from tqdm import tqdm

from data.shard import read_header

REPO_ID = "kjj0/fineweb10B-gpt2"
TRAIN_SHARDS = 103
DEFAULT_DIR = Path(__file__).parent / "cache" / "fineweb10B"


def shard_names(train_shards):
    if not 0 <= train_shards <= TRAIN_SHARDS:
        raise ValueError(f"--train-shards must be in [0, {TRAIN_SHARDS}], got {train_shards}")
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, train_shards + 1)]


def is_complete(path):
    try:
        read_header(path)
        return True
    except (OSError, ValueError):
        return False


def download_fineweb(train_shards, out_dir=DEFAULT_DIR, endpoint=None):
    """Make sure out_dir holds the val shard and the first train_shards train shards; returns their paths."""
    out_dir = Path(out_dir)
    endpoint = endpoint or constants.ENDPOINT
    paths = [out_dir / name for name in shard_names(train_shards)]
    missing = [p for p in paths if not is_complete(p)]
    if missing:
        check_resolvable(endpoint)
        out_dir.mkdir(parents=True, exist_ok=True)
    for path in tqdm(missing, desc="fineweb shards", unit="file"):
        # A broken file from an earlier attempt goes first, so the client fetches it afresh.
        path.unlink(missing_ok=True)
        try:
            hf_hub_download(REPO_ID, path.name, repo_type="dataset", local_dir=out_dir, endpoint=endpoint)
        except LocalEntryNotFoundError as e:  # what the hub client raises when it cannot connect
            raise ConnectionError(offline_message(endpoint, path.name, e)) from e
        read_header(path)  # a bad download is an error here, not in the middle of training
    print(f"fineweb: {len(paths) - len(missing)} shards already present, {len(missing)} downloaded, in {out_dir}")
    return paths


def check_resolvable(endpoint):
    # The hub client retries an unreachable server for ~25 s per file; a DNS
    # lookup says "offline" at once. Behind a proxy the machine may reach the hub
    # without resolving it, so then leave it to the client.
    if urllib.request.getproxies():
        return
    host = urllib.parse.urlsplit(endpoint).hostname
    try:
        socket.getaddrinfo(host, 443)
    except socket.gaierror as e:
        raise ConnectionError(offline_message(endpoint, "", e)) from e


def offline_message(endpoint, name, error):
    what = f"download {name} from" if name else "reach"
    return (
        f"cannot {what} the Hugging Face Hub at {endpoint} ({error.__class__.__name__}: {error}). "
        "Check the network (or set HF_ENDPOINT to a mirror), or copy the fineweb_*.bin shards into the output "
        "directory by hand. To train without network use the demo data: python train.py --config configs/demo.toml"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-shards", type=int, default=17,
                        help=f"how many 100M-token train shards, 0..{TRAIN_SHARDS} (default 17: one pass "
                             "of configs/*.toml's 3200 x 524,288 tokens)")
    parser.add_argument("--out", default=DEFAULT_DIR, help=f"directory for the shards (default {DEFAULT_DIR})")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        download_fineweb(args.train_shards, args.out)
    except (OSError, ValueError) as e:  # no network (ConnectionError), a bad --train-shards, a full disk, ...
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
