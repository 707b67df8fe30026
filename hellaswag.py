"""HellaSwag accuracy of a model: from a train.py checkpoint, or during training (log.hellaswag_every).

    python -m hellaswag --ckpt runs/gpu/ckpt_003200.pt                  # the 10,042 validation items
    python -m hellaswag --ckpt runs/demo/ckpt_000600.pt --limit 500
    python -m hellaswag --ckpt runs/demo/ckpt_000600.pt --data items.jsonl   # any file in HellaSwag's format

HellaSwag (Zellers et al., ACL 2019; MIT licence): a context and four endings, one of them right.
Scored as the GPT-2 reproductions score it (llm.c, nanoGPT's): each ending follows the context,
and the model's loss over the ending's tokens is summed and averaged per token; acc picks the
ending with the lowest sum, acc_norm the one with the lowest mean. The text is cleaned as
lm-eval-harness cleans it (WikiHow's " [title]" headers become ". ", other bracketed artifacts
go). Items are batched and padded; under torchrun each rank scores every world-th item and the
counts are summed. The validation file is fetched from the dataset's repository on first use
into data/cache/hellaswag/ and checked (item count and sha256); offline, put it there by hand.
"""

import argparse
import hashlib
import json
import re
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from config import ConfigError
from data.shard import write_atomically

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"  # also tensorflow_datasets' record
ITEMS = 10_042
CACHE = Path("data/cache/hellaswag/hellaswag_val.jsonl")


@dataclass
class Item:
    context: str
    endings: list[str]
    label: int


def preprocess(text: str) -> str:
    """lm-eval-harness's cleaning of HellaSwag text: WikiHow's " [title]" headers become sentence
    breaks, any other [bracketed] artifact goes, double spaces become one."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_items(path: Path) -> list[Item]:
    """The items of a file in HellaSwag's schema (ctx_a, ctx_b, endings, label, activity_label), each
    cleaned as lm-eval-harness does: the context is "activity_label: ctx_a Ctx_b"."""
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            context = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
            item = Item(preprocess(context), [preprocess(e) for e in row["endings"]], int(row["label"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path}, line {number}: not a HellaSwag item ({type(e).__name__}: {e}); each line "
                              "is a JSON object with ctx_a, ctx_b, endings (4), label and activity_label") from None
        if len(item.endings) != 4 or not 0 <= item.label < 4:
            raise ConfigError(f"{path}, line {number}: expected 4 endings and a label 0..3, got "
                              f"{len(item.endings)} endings and label {item.label}")
        items.append(item)
    return items


def validation_items(path: Path | None = None) -> list[Item]:
    """HellaSwag's validation split: from path (default CACHE), fetched there first if it is missing;
    a one-line ConfigError if it cannot be fetched or is not the published file."""
    path = path or CACHE
    if not path.exists():
        print(f"fetching HellaSwag's validation split ({ITEMS:,} items, 12 MB) from {URL}", flush=True)
        try:
            with urllib.request.urlopen(URL, timeout=30) as response:
                data = response.read()
        except OSError as e:
            raise ConfigError(f"HellaSwag: could not download {URL} ({e}); put the file there by hand: "
                              f"{path.resolve()}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: f.write(data))  # ranks that fetch at once each write their own
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise ConfigError(f"HellaSwag: {path} is not the published validation file (sha256 {digest[:12]}..., "
                          f"expected {SHA256[:12]}...); delete it to fetch it again from {URL}")
    items = read_items(path)
    if len(items) != ITEMS:
        raise ConfigError(f"HellaSwag: {path} holds {len(items)} items, expected {ITEMS}")
    return items


@torch.no_grad()
def score(model, tokenizer, items: list[Item], batch_items: int = 16, bf16: bool = False, progress: bool = False):
    """(acc, acc_norm, items scored) over items, split across ranks when torch.distributed is up.
    Each ending's tokens are the tokenizer's of " " + ending after the context's (the context cut
    from the left to fit the model); the four rows of an item go in one padded batch with others."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = model.lm_head.weight.device
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # right by sum, right by mean, items
    mine = items[rank::world]
    batches = range(0, len(mine), batch_items)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="hellaswag", unit="batch", disable=rank != 0)
    was_training = model.training
    model.eval()
    for start in batches:
        batch = mine[start:start + batch_items]
        rows = [ending_rows(tokenizer, item, model.config.block_size) for item in batch]
        losses_sum, losses_mean = ending_losses(model, [r for item_rows in rows for r in item_rows], bf16)
        labels = torch.tensor([item.label for item in batch], device=device)
        counts[0] += (losses_sum.view(-1, 4).argmin(dim=1) == labels).sum()
        counts[1] += (losses_mean.view(-1, 4).argmin(dim=1) == labels).sum()
        counts[2] += len(batch)
    model.train(was_training)
    if world > 1:
        dist.all_reduce(counts)
    right, right_norm, total = counts.tolist()
    return right / max(total, 1), right_norm / max(total, 1), int(total)


def ending_rows(tokenizer, item: Item, block_size: int) -> list[tuple[list[int], int]]:
    """Per ending: (context + ending tokens, how many of them are the ending's), fitted into block_size + 1."""
    context = tokenizer.encode_ordinary(item.context)
    rows = []
    for ending in item.endings:
        tokens = tokenizer.encode_ordinary(" " + ending)[:block_size]
        rows.append(((context + tokens)[-(block_size + 1):], len(tokens)))
    return rows


def ending_losses(model, rows: list[tuple[list[int], int]], bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed and mean per-token loss over its last `ending` tokens, the rows padded to one batch."""
    device = model.lm_head.weight.device
    length = max(len(tokens) for tokens, _ in rows)
    inputs = torch.zeros(len(rows), length - 1, dtype=torch.long, device=device)
    targets = torch.full((len(rows), length - 1), -1, dtype=torch.long, device=device)
    for i, (tokens, ending) in enumerate(rows):
        row = torch.tensor(tokens, device=device)
        inputs[i, :len(tokens) - 1] = row[:-1]
        targets[i, len(tokens) - 1 - ending:len(tokens) - 1] = row[-ending:]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(inputs)
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    losses = losses.view(len(rows), -1)
    counted = (targets >= 0).sum(dim=1)
    return losses.sum(dim=1), losses.sum(dim=1) / counted


def main(argv: list[str]) -> tuple[float, float, int]:
    """Print and return (acc, acc_norm, items) for a checkpoint."""
    import sample  # a checkpoint's model and tokenizer, as sample.py loads them
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a train.py checkpoint (ckpt_NNNNNN.pt)")
    parser.add_argument("--data", default="", help=f"a file in HellaSwag's format (default: the validation split, {CACHE})")
    parser.add_argument("--limit", type=int, default=0, help="score the first N items only (default: all)")
    parser.add_argument("--batch-items", type=int, default=16, help="items (of 4 endings each) per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--tokenizer-file", default="", help="a local r50k_base.tiktoken, for a GPT-2 model offline")
    args = parser.parse_args(argv)
    if args.limit < 0 or args.batch_items < 1:
        raise ConfigError(f"--limit {args.limit} / --batch-items {args.batch_items}: expected >= 0 and >= 1")
    device = sample.pick_device(args.device)
    model, tokenizer, cfg = sample.load_model(Path(args.ckpt), device, args.tokenizer_file)
    if args.data and not Path(args.data).is_file():
        raise ConfigError(f"--data {args.data}: no such file")
    items = read_items(Path(args.data)) if args.data else validation_items()
    items = items[:args.limit] if args.limit else items
    acc, acc_norm, total = score(model, tokenizer, items, args.batch_items, cfg.train.bf16 and device.type == "cuda",
                                 progress=True)
    print(f"hellaswag: acc {acc:.4f}, acc_norm {acc_norm:.4f} over {total:,} items ({args.ckpt})")
    return acc, acc_norm, total


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
