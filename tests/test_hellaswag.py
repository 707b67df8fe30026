"""hellaswag.py on items written here in HellaSwag's own schema (the real file cannot be fetched in
CI): lm-eval-harness's cleaning, scores against an unbatched float64 computation, ranks against one
process, and one-line errors for a file that is missing, corrupt or not HellaSwag's."""

import dataclasses
import json
import urllib.request

import pytest
import torch
import torch.multiprocessing as mp
import torch.distributed as dist

import hellaswag
import train
from config import ConfigError
from data.tokenizer import bytes_tokenizer
from tests.test_model import random_model, tiny
from tests.test_train import metrics, tiny_config, tiny_data  # noqa: F401

# As the validation file has them: WikiHow items with bracketed headers, ActivityNet items whose
# ctx_b is the start of a sentence the ending finishes.
ROWS = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering "
     "the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "label": 3,
     "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men "
                 "supporting the head of the person wearing winter clothes snow as the we girls sled.",
                 ", the man puts on a christmas coat, knitted with netting.",
                 ", the man continues removing the snow on his car."]},
    {"ind": 12, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a cast iron pan [title] Rinse "
     "the pan with hot water. [step] Do not use soap, which strips the seasoning.", "ctx_b": "", "label": 1,
     "endings": ["[title] Dry it in the oven. [step] Put the pan upside down  on a rack.",
                 "[title] Scrub it with coarse salt. [step] Salt lifts stuck food without hurting the pan.",
                 "[substeps] Paint the pan [title] blue.", "[header] Buy a new pan."]},
    {"ind": 30, "activity_label": "Playing harmonica", "ctx_a": "A man is holding a harmonica.",
     "ctx_b": "he", "label": 0,
     "endings": ["plays a tune on it.", "eats the harmonica.", "throws it at the moon.", "becomes a harmonica."]},
    {"ind": 41, "activity_label": "Education and Communications", "ctx_a": "[header] How to write a letter "
     "[title] Start with a greeting.", "ctx_b": "[step] write", "label": 2,
     "endings": ["the end first.", "it underwater.", "the body of the letter next.", "nothing at all."]},
]
# lm-eval-harness 0.4.13's process_docs on ROWS (its hellaswag utils.py, run once on these items).
CONTEXTS = [
    "Removing ice from car: Then, the man writes over the snow covering the window of a car, and a woman wearing "
    "winter clothes smiles. Then",
    "Home and Garden: How to clean a cast iron pan. Rinse the pan with hot water. Do not use soap, which strips "
    "the seasoning.",
    "Playing harmonica: A man is holding a harmonica. He",
    "Education and Communications: How to write a letter. Start with a greeting. write",
]
SECOND_ITEM_ENDINGS = [" Dry it in the oven. Put the pan upside down on a rack.",
                       " Scrub it with coarse salt. Salt lifts stuck food without hurting the pan.",
                       " Paint the pan. blue.", " Buy a new pan."]


def byte_model(block_size: int = 128):
    """A tiny float64 MLA model over bytes, every weight random (tests/test_model.py)."""
    return random_model(dataclasses.replace(tiny("mla"), vocab_size=257, block_size=block_size))


def write_items(path, rows=ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_items_are_cleaned_as_lm_eval_harness_cleans_them(tmp_path):
    items = hellaswag.read_items(write_items(tmp_path / "items.jsonl"))
    assert [item.context for item in items] == CONTEXTS
    assert items[1].endings == SECOND_ITEM_ENDINGS
    assert [item.label for item in items] == [3, 1, 0, 2]


def reference_scores(model, items):
    """Per item, per ending, in float64 one row at a time with no padding: the summed and mean
    negative log-likelihood of the ending's bytes after the context's."""
    tokenizer = bytes_tokenizer()
    right = right_norm = 0
    for item in items:
        context = tokenizer.encode_ordinary(item.context)
        sums, means = [], []
        for ending in item.endings:
            tokens = tokenizer.encode_ordinary(" " + ending)
            row = torch.tensor(context + tokens)[-(model.config.block_size + 1):]
            log_probs = torch.log_softmax(model(row[None, :-1])[0].double(), dim=-1)
            picked = log_probs[-len(tokens):].gather(1, row[-len(tokens):, None])
            sums.append(-picked.sum().item())
            means.append(-picked.mean().item())
        right += min(range(4), key=sums.__getitem__) == item.label
        right_norm += min(range(4), key=means.__getitem__) == item.label
    return right / len(items), right_norm / len(items)


def items_for_scoring(n=12):
    """ROWS repeated with the endings rotated, so the right ending moves and the counts mean something."""
    rows = []
    for i in range(n):
        row = dict(ROWS[i % len(ROWS)])
        shift = i % 4
        row["endings"] = row["endings"][shift:] + row["endings"][:shift]
        row["label"] = (row["label"] - shift) % 4
        rows.append(row)
    return rows


@pytest.mark.parametrize("batch_items", [1, 5])
def test_scores_equal_an_unbatched_float64_computation(tmp_path, batch_items):
    model = byte_model()
    items = hellaswag.read_items(write_items(tmp_path / "items.jsonl", items_for_scoring()))
    acc, acc_norm, total = hellaswag.score(model, bytes_tokenizer(), items, batch_items=batch_items)
    assert total == 12
    assert (acc, acc_norm) == reference_scores(model, items)
    # and the losses themselves, batched and padded, against the unbatched rows
    rows = hellaswag.ending_rows(bytes_tokenizer(), items[1], model.config.block_size)
    sums, means = hellaswag.ending_losses(model, rows, bf16=False)
    for (tokens, ending), total_loss in zip(rows, sums.tolist()):
        row = torch.tensor(tokens)
        log_probs = torch.log_softmax(model(row[None, :-1])[0].double(), dim=-1)
        assert total_loss == pytest.approx(-log_probs[-ending:].gather(1, row[-ending:, None]).sum().item(), rel=1e-9)


def test_a_context_longer_than_the_model_is_cut_from_the_left(tmp_path):
    model = byte_model(32)
    row = dict(ROWS[0], ctx_a="word " * 40)
    item = hellaswag.read_items(write_items(tmp_path / "long.jsonl", [row]))[0]
    rows = hellaswag.ending_rows(bytes_tokenizer(), item, 32)
    assert all(len(tokens) <= 33 and tokens[-ending:] == list((" " + e).encode())[:32]
               for (tokens, ending), e in zip(rows, item.endings))
    hellaswag.score(model, bytes_tokenizer(), [item])  # fits the model's context


def split_worker(rank, world, rendezvous, path, out):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    model = byte_model()
    result = hellaswag.score(model, bytes_tokenizer(), hellaswag.read_items(path), batch_items=2)
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_score_as_one_process(tmp_path):
    path = write_items(tmp_path / "items.jsonl", items_for_scoring(11))  # 11 items: the ranks get 6 and 5
    mp.spawn(split_worker, args=(2, str(tmp_path / "rendezvous"), path, str(tmp_path / "two.pt")), nprocs=2)
    one = hellaswag.score(byte_model(), bytes_tokenizer(),
                          hellaswag.read_items(path), batch_items=3)
    assert tuple(torch.load(tmp_path / "two.pt")) == one and one[2] == 11


@pytest.fixture
def offline(monkeypatch):
    """No network: every download fails as it does on a machine without one."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_a_missing_file_offline_names_the_url_and_the_path(tmp_path, offline):
    path = tmp_path / "cache" / "hellaswag_val.jsonl"
    with pytest.raises(ConfigError, match=rf"could not download {hellaswag.URL} .*put the file there by hand: {path}"):
        hellaswag.validation_items(path)
    assert not path.exists()


def test_a_file_that_is_not_the_published_one_is_refused(tmp_path, monkeypatch):
    path = write_items(tmp_path / "hellaswag_val.jsonl")
    with pytest.raises(ConfigError, match=r"is not the published validation file \(sha256 .*delete it to fetch"):
        hellaswag.validation_items(path)
    import hashlib
    monkeypatch.setattr(hellaswag, "SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(ConfigError, match=r"holds 4 items, expected 10042"):
        hellaswag.validation_items(path)
    (tmp_path / "bad.jsonl").write_text('{"ctx_a": "no endings"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl, line 1: not a HellaSwag item"):
        hellaswag.read_items(tmp_path / "bad.jsonl")


def test_training_scores_every_n_steps_and_at_the_end_as_the_command_scores_a_checkpoint(tiny_data, tmp_path):
    items = write_items(tmp_path / "items.jsonl", items_for_scoring())
    config = tiny_config(tmp_path, tiny_data, log__hellaswag_every="4")
    train.main(["--config", config, "--log.hellaswag_file", str(items)])
    rows = [r for r in metrics(tmp_path / "run") if "eval/hellaswag_acc" in r]
    assert [r["step"] for r in rows] == [4, 6]  # every 4 steps, and at the end
    acc, acc_norm, total = hellaswag.main(["--ckpt", str(tmp_path / "run" / "ckpt_000006.pt"), "--data", str(items)])
    assert (acc, acc_norm, total) == (rows[-1]["eval/hellaswag_acc"], rows[-1]["eval/hellaswag_acc_norm"], 12)


def test_training_without_the_file_offline_stops_before_any_work(tiny_data, tmp_path, monkeypatch, offline):
    monkeypatch.setattr(hellaswag, "CACHE", tmp_path / "cache" / "hellaswag_val.jsonl")
    with pytest.raises(ConfigError, match=r"log.hellaswag_every = 3: HellaSwag: could not download .*put the file "
                                          r"there by hand: .*hellaswag_val.jsonl \(or --log.hellaswag_every 0"):
        train.main(["--config", tiny_config(tmp_path, tiny_data, log__hellaswag_every="3")])
    assert not (tmp_path / "run").exists()  # nothing written
