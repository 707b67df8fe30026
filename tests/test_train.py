"""train.py end to end on CPU: the demo learns, W&B gets every key, two gloo ranks match one process,
a resumed run repeats the uninterrupted one exactly, bad configs and non-finite losses stop cleanly."""

import functools
import json
import math
import os
import re
import struct
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import muon
import runlog
import train
from config import Config, ConfigError, ScheduleConfig, build_config, read_toml, validate
from data.demo import ensure_demo_shards
from data.shard import write_shard
from model import CONFIGS, GPT

REPO = Path(__file__).resolve().parent.parent
# A tiny run: bytes tokenizer, 2 micro-steps of 4 x 32 per step, MuonClip with a tau it will hit.
TINY_TOML = """
[model]
preset = "tiny-mla"
block_size = 32

[data]
dir = "{data_dir}"
train_files = "train_*.bin"
val_files = "val_*.bin"
tokenizer = "bytes"
seq_len = 32
val_tokens = 512

[optim]
lr = 0.05
embed_lr = 0.3
head_lr = 0.01
muon_clip = true
muon_clip_tau = 0.8

[schedule]
steps = 6
warmup_steps = 1
cooldown_frac = 0.5
momentum_warmup_steps = 4

[train]
run_dir = "{run_dir}"
batch_tokens = 256
micro_batch_size = 4
compile = false
compile_warmup_steps = 0
bf16 = false
checkpoint_every = 3

[log]
every = 1
val_every = 3
heatmap_every = 3
sample_every = 3
hellaswag_every = 0
prompts = ["The capital of France is"]
sample_mode = "sampled"
max_new_tokens = 4
wandb = "disabled"
"""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Byte-level shards with learnable structure: repeated words, in shuffled order."""
    out = tmp_path_factory.mktemp("tiny_data")
    rng = np.random.default_rng(0)
    words = [w.encode() for w in "the cat sat on a mat and the dog ran to it".split()]
    text = b" ".join(words[i] for i in rng.integers(0, len(words), 12_000))
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    write_shard(out / "train_000000.bin", tokens[:-4000])
    write_shard(out / "val_000000.bin", tokens[-4000:])
    return out


def tiny_config(tmp_path, data_dir, run_dir="run", **replace):
    text = TINY_TOML.format(data_dir=data_dir, run_dir=tmp_path / run_dir)
    for key, value in replace.items():  # "section__key" = TOML value text
        section, name = key.split("__")
        text = re.sub(rf"(\[{section}\][^\[]*?)^{name} = [^\n]*", rf"\g<1>{name} = {value}", text, count=1, flags=re.M)
    path = tmp_path / f"{run_dir}.toml"
    path.write_text(text)
    return str(path)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["train/loss"] for row in metrics(run_dir) if "train/loss" in row}


def read_wandb_records(run_dir: Path) -> list:
    """Every record of the single offline run under run_dir/wandb, parsed with wandb's protobuf.

    The .wandb file is a LevelDB-style log: a 7-byte header (":W&B", 0xBEE1, version), then 32 KiB
    blocks of chunks, each with a 7-byte header (crc32, little-endian uint16 length, type: 1 full,
    2 first, 3 middle, 4 last); a block's tail shorter than a header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


# ----------------------------------------------------------------------------------------------
# Training runs


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return ensure_demo_shards(tmp_path_factory.mktemp("demo") / "shards")


def test_demo_config_learns_and_wandb_offline_run_has_every_key(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "demo"
    train.main(["--config", str(REPO / "configs/demo.toml"), "--data.dir", str(demo_dir), "--train.run_dir", str(run_dir),
                "--schedule.steps=30", "--schedule.momentum_warmup_steps=10", "--log.every=5", "--log.val_every=15",
                "--log.heatmap_every=15", "--log.sample_every=15", "--log.max_new_tokens=8",
                "--train.checkpoint_every=0", "--optim.muon_clip_tau=2.0"])
    losses = list(train_losses(run_dir).values())
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0, losses
    vals = [row["val/loss"] for row in metrics(run_dir) if "val/loss" in row]
    assert len(vals) == 3 and vals[-1] < vals[0] - 1.0, vals
    assert (run_dir / "ckpt_000030.pt").is_file()

    records = read_wandb_records(run_dir)
    history = [{item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    keys = set().union(*history)
    n_layer, n_head = 4, CONFIGS["tiny-mla"].n_head
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "train/tokens",
                "val/loss", "attn/max_logit", "attn/clipped_heads", "attn/max_logit_heatmap/_type",
                "samples/completions/_type"}
    expected |= {f"attn/max_logit/layer_{i}" for i in range(n_layer)}
    expected |= {f"attn/max_logit/layer_{i}/head_{h}" for i in range(n_layer) for h in range(n_head)}
    assert expected <= keys, expected - keys
    assert sum("train/loss" in row for row in history) == 6
    clipped = [json.loads(row["attn/clipped_heads"]) for row in history if "attn/clipped_heads" in row]
    assert max(clipped) > 0  # tau 2 is low enough to clip
    # The run config is the full resolved config, the model preset's values included.
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "run"
              for item in r.run.config.update}
    assert config["optim"]["muon_clip_tau"] == 2.0 and config["model"]["n_layer"] == n_layer
    assert config["model"]["n_head"] == n_head and config["world_size"] == 1

    tokens = {json.loads(row["train/tokens"]) for row in history if "val/loss" in row}
    assert tokens == {0, 15 * 4096, 30 * 4096}  # the x axis of every chart (define_metric)
    defined = {r.metric.name or r.metric.glob_name: r.metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert defined["val/*"].step_metric == "train/tokens" and defined["val/loss"].summary.min
    media = next(run_dir.glob("wandb/offline-run-*/files/media"))
    heatmaps = sorted(media.rglob("attn/max_logit_heatmap_*.png"))
    assert len(heatmaps) == 2 and all(h.read_bytes()[:4] == b"\x89PNG" for h in heatmaps)
    per_head = [row for row in metrics(run_dir) if "attn/max_logit/layer_3/head_3" in row]
    assert len(per_head) == 6  # the numbers behind the picture, in metrics.jsonl too
    # An incremental table: each log sends the rows added since the one before, never all again.
    tables = [json.loads(p.read_text()) for p in sorted(media.rglob("*.table.json"))]
    assert len(tables) == 2 and all(t["columns"] == ["step", "prompt", "mode", "completion"] for t in tables)
    steps = [row[0] for t in tables for row in t["data"]]
    assert steps == [15] * 6 + [30] * 6  # 3 prompts x greedy and sampled, each row once
    assert "The capital of France is" in {row[1] for t in tables for row in t["data"]}


@pytest.mark.parametrize("options", [[], ["--optim.normuon", "--optim.cautious_weight_decay", "--optim.per_head",
                                           "--optim.muon_clip_alpha=0.25", "--optim.adamw_weight_decay=0.1"]],
                         ids=["recipe", "every-option"])
def test_resume_repeats_the_uninterrupted_run_exactly(tiny_data, tmp_path, options):
    straight = tiny_config(tmp_path, tiny_data, "straight")
    train.main(["--config", straight, *options])
    # A crash after step 3: a new run dir holding only the step-3 checkpoint, resumed with "latest".
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / "ckpt_000003.pt").write_bytes((tmp_path / "straight" / "ckpt_000003.pt").read_bytes())
    train.main(["--config", straight, *options, "--train.run_dir", str(resumed_dir), "--resume", "latest"])

    expected, got = train_losses(tmp_path / "straight"), train_losses(resumed_dir)
    assert list(expected) == [1, 2, 3, 4, 5, 6] and list(got) == [4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]  # bit for bit
    clipped = [row["attn/clipped_heads"] for row in metrics(tmp_path / "straight") if "attn/clipped_heads" in row]
    assert sum(clipped) > 0  # MuonClip acted, so its effect is part of what resumed exactly
    a = torch.load(tmp_path / "straight" / "ckpt_000006.pt", weights_only=True)
    b = torch.load(resumed_dir / "ckpt_000006.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["loader"] == b["loader"]


def test_compile_warm_up_leaves_no_trace_in_the_run(tiny_data, tmp_path, capsys):
    """The warm-up trains on random tokens, MuonClip's clipping included, then undoes it: the run
    that follows is the run without a warm-up, bit for bit."""
    cold = tiny_config(tmp_path, tiny_data, "cold")
    train.main(["--config", cold])
    train.main(["--config", cold, "--train.run_dir", str(tmp_path / "warm"), "--train.compile_warmup_steps=3"])
    assert "compile warm-up: 3 steps" in capsys.readouterr().out
    expected, got = train_losses(tmp_path / "cold"), train_losses(tmp_path / "warm")
    assert list(got) == [1, 2, 3, 4, 5, 6] and got == expected
    a = torch.load(tmp_path / "cold" / "ckpt_000006.pt", weights_only=True)
    b = torch.load(tmp_path / "warm" / "ckpt_000006.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["loader"] == b["loader"]


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_after_the_compile_warm_up_nothing_compiles_again(tiny_data, tmp_path, monkeypatch, backend):
    """The warm-up is what keeps compilation out of the speedrun's time: every graph the run needs
    (probe on and off, evaluation, Muon's bucket steps) exists when it ends, and the model's
    forward is one graph, with no graph break. Dynamo's eager backend builds the same graphs and
    guards as Inductor without generating code; Inductor on the CPU builds the real thing."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    monkeypatch.setattr(muon, "_COMPILED", {})  # not another test's compiled functions
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    warm_up, built = train.warm_up, {}

    def counting_warm_up(*args, **kwargs):
        seconds = warm_up(*args, **kwargs)
        built["by the warm-up"] = counters["stats"]["unique_graphs"]
        return seconds

    monkeypatch.setattr(train, "warm_up", counting_warm_up)
    # No MuonClip, a log line every 3 steps: the steps between don't run the probe, those logged do.
    config = tiny_config(tmp_path, tiny_data, train__compile="true", train__compile_warmup_steps="2",
                         optim__muon_clip="false", log__every="3")
    train.main(["--config", config])
    # forward with and without the probe, evaluation, and one Muon graph per shape bucket
    assert built["by the warm-up"] >= 6
    assert counters["stats"]["unique_graphs"] == built["by the warm-up"]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(train_losses(tmp_path / "run")) == 2


def test_resume_from_a_checkpoint_path_uses_its_config_plus_overrides(tiny_data, tmp_path, capsys):
    train.main(["--config", tiny_config(tmp_path, tiny_data, "first")])
    checkpoint = tmp_path / "first" / "ckpt_000003.pt"
    with pytest.raises(ConfigError, match="holds checkpoints after step 3"):
        train.main(["--resume", str(checkpoint)])  # would overwrite ckpt_000006.pt
    with pytest.raises(ConfigError, match=r"does not fit this config.s model, optimizer or data: model.n_embd: checkpoint 64, config 32$"):
        train.main(["--resume", str(checkpoint), "--train.run_dir", str(tmp_path / "wide"), "--model.n_embd=32"])
    assert not (tmp_path / "wide").exists()
    other = tmp_path / "other"
    train.main(["--resume", str(checkpoint), "--train.run_dir", str(other), "--log.sample_every=0"])
    assert "config changed since the checkpoint: train.run_dir" in capsys.readouterr().out
    assert list(train_losses(other)) == [4, 5, 6]
    assert train_losses(other) == {s: v for s, v in train_losses(tmp_path / "first").items() if s > 3}


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tiny_data, tmp_path):
    config = tiny_config(tmp_path, tiny_data, "one", schedule__steps=2, train__checkpoint_every=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank below: the same kernels, so the same rounding
    try:
        train.main(["--config", config])  # 1 process: 2 micro-steps per step
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
         "--config", config, "--train.run_dir", str(tmp_path / "two")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cpu x 2, 1 micro-steps" in result.stdout
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2}
    assert one == pytest.approx(two, rel=1e-6)
    a = torch.load(tmp_path / "one" / "ckpt_000002.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt_000002.pt", weights_only=True)["model"]
    # Equal in exact arithmetic: one process accumulates grad(loss / 2) per micro-batch, DDP averages
    # two grad(loss); halving is exact in floating point and a two-term sum has one order. So only
    # last-bit differences are allowed; a missing all-reduce, overlapping data shards or a wrong
    # distributed Muon step moves weights by the size of an update (~1e-3 here).
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_a_checkpoint_of_a_diverging_update_is_never_called_good(tiny_data, tmp_path, monkeypatch):
    """The update of step 3 diverges (lr 1e36). The loss check sees each step's loss from before its
    update, so the checkpoint written just before the first non-finite loss holds the weights that
    produced it: it is renamed, the one before is named the last good one, --resume latest takes it."""
    factor = train.lr_factor
    monkeypatch.setattr(train, "lr_factor", lambda step, s: 1e36 if step == 2 else factor(step, s))
    # No validation before the end: the training losses are the first to see the update.
    config = tiny_config(tmp_path, tiny_data, "diverge", train__checkpoint_every=1, log__val_every=0, log__sample_every=0)
    with pytest.raises(checkpoint.NonFiniteLoss) as error:
        train.main(["--config", config])
    run_dir = tmp_path / "diverge"
    message = str(error.value)
    # Here the weights of step 3 give a finite loss (uniform logits) but a nan gradient at step 4.
    match = re.match(r"step (\d+): (training loss|gradient norm) is (nan|inf).*; stopped without saving this state; ",
                     message)
    assert match, message
    bad = int(match.group(1))
    assert bad == 4  # step 3's own loss came before its update
    assert f"the last good checkpoint is {run_dir / f'ckpt_{bad - 2:06d}.pt'} (step {bad - 2})" in message
    assert (f"ckpt_{bad - 1:06d}.pt (step {bad - 1}) holds the update that led here and was renamed "
            f"ckpt_{bad - 1:06d}.pt.nonfinite") in message
    assert sorted(p.name for p in run_dir.glob("*ckpt*")) == (  # no temporary files either
        [f"ckpt_{s:06d}.pt" for s in range(1, bad - 1)] + [f"ckpt_{bad - 1:06d}.pt.nonfinite"])
    monkeypatch.setattr(train, "lr_factor", factor)
    train.main(["--config", config, "--resume", "latest", "--optim.lr=0.04"])
    losses = train_losses(run_dir)
    assert all(math.isfinite(losses[s]) for s in (3, 4, 5, 6))

    # Validating every step finds bad weights at the step that made them, before they are saved.
    monkeypatch.setattr(train, "lr_factor", lambda step, s: 1e36 if step == 2 else factor(step, s))
    config = tiny_config(tmp_path, tiny_data, "validated", train__checkpoint_every=1, log__val_every=1)
    with pytest.raises(checkpoint.NonFiniteLoss) as error:
        train.main(["--config", config])
    match = re.match(r"step (\d+): (val loss|training loss|gradient norm) is (nan|inf).*; stopped without saving this state; the last "
                     r"good checkpoint is .*ckpt_(\d+).pt \(step \d+\)", str(error.value))
    assert match, str(error.value)
    saved = sorted(p.name for p in (tmp_path / "validated").glob("*ckpt*"))
    if match.group(2) == "val loss":  # found at the step it happened: its state was never saved
        assert saved == [f"ckpt_{s:06d}.pt" for s in range(1, int(match.group(1)))]


def test_a_diverging_first_update_leaves_no_good_checkpoint(tiny_data, tmp_path):
    # An absurd head lr: after one step the logits overflow float32 and the loss is nan.
    config = tiny_config(tmp_path, tiny_data, "diverge", optim__head_lr="1e38", train__checkpoint_every=1)
    with pytest.raises(checkpoint.NonFiniteLoss, match=r"^step 2: training loss is (nan|inf); .*no checkpoint is known "
                                                  r"to be good; ckpt_000001.pt \(step 1\) holds the update"):
        train.main(["--config", config])


# ----------------------------------------------------------------------------------------------
# Config and command line


def test_config_files_in_configs_all_load():
    for path in sorted((REPO / "configs").glob("*.toml")):
        cfg = build_config(read_toml(str(path)), str(path), [])
        assert cfg.model.n_layer is not None
    speedrun = build_config(read_toml(str(REPO / "configs/speedrun.toml")), "speedrun", [])
    assert validate(speedrun, world_size=8, vocab_size=50257) == 2
    assert speedrun.train.target_val_loss == 3.28 and speedrun.data.val_tokens == 10_485_760
    gpu = build_config(read_toml(str(REPO / "configs/gpu.toml")), "gpu", [])
    assert validate(gpu, world_size=1, vocab_size=50257) == 16
    assert gpu == build_config({}, "the defaults", [])  # train.py's defaults are gpu.toml
    adamw = build_config(read_toml(str(REPO / "configs/adamw.toml")), "adamw", [])
    assert adamw.optim.optimizer == "adamw" and asdict(adamw.model) == asdict(gpu.model)


def test_config_files_hold_only_what_differs_from_the_defaults():
    defaults = asdict(Config())
    for path in sorted((REPO / "configs").glob("*.toml")):
        for section, values in read_toml(str(path)).items():
            same = [key for key, value in values.items() if defaults[section][key] == value]
            assert not same, f"{path.name} repeats the defaults of {section}: {same}"


def test_overrides_are_parsed_to_the_keys_types(tiny_data, tmp_path):
    config = tiny_config(tmp_path, tiny_data)
    cfg, resume = train.load_run_config(["--config", config, "--optim.lr", "3e-4", "--schedule.steps=9",
                                         "--train.bf16", "--log.prompts", '["a", "b c"]', "--optim.weight_decay", "-0.5",
                                         "--model.n_head=2", "--log.wandb=offline"])
    assert resume is None
    assert cfg.optim.lr == 3e-4 and cfg.schedule.steps == 9 and cfg.train.bf16 is True
    assert cfg.log.prompts == ["a", "b c"] and cfg.optim.weight_decay == -0.5 and cfg.log.wandb == "offline"
    assert cfg.model.n_head == 2 and cfg.model.n_embd == CONFIGS["tiny-mla"].n_embd  # the rest from the preset
    with pytest.raises(ConfigError, match=r"optim.weight_decay = -0.5: expected a finite number >= 0"):
        validate(cfg, 1, 257)


@pytest.mark.parametrize("argv_tail, message", [
    (["--optim.lrr=1"], r"unknown key optim.lrr; valid keys in \[optim\]: optimizer, lr, weight_decay"),
    (["--optimm.lr=1"], r"unknown section \[optimm\]; valid sections: model, data, optim, schedule, train, log"),
    (["--schedule.steps=ten"], r"--schedule.steps=ten: expected int"),
    (["--train.compile", "maybe"], r"--train.compile=maybe: expected true or false"),
    (["--log.prompts=hello"], r"--log.prompts=hello: expected a TOML array"),
    (["--optim.lr"], r"--optim.lr=: expected float"),
    (["stray"], r"unexpected 'stray'"),
    (["--train.batch_tokens=300"], r"train.batch_tokens = 300: expected a multiple of world_size 1 x "
                                   r"train.micro_batch_size 4 x data.seq_len 32 = 128"),
    (["--data.val_tokens=100"], r"data.val_tokens = 100: expected a multiple"),
    (["--train.checkpoint_every=3", "--log.every=2"], r"train.checkpoint_every = 3: expected 0 or a multiple of log.every"),
    (["--model.preset=huge"], r"model.preset = 'huge'; expected one of gpt124m-mla"),
    (["--model.n_head=0"], r"\[model\] GPTConfig.n_head=0"),
    (["--data.seq_len=64"], r"data.seq_len = 64: expected 1 .. model.block_size = 32"),
    (["--data.tokenizer=gpt3"], r"data.tokenizer = 'gpt3'"),
    (["--train.compile_warmup_steps=-1"], r"train.compile_warmup_steps = -1: expected >= 0"),
    (["--optim.normuon_axis=cols"], r"optim.normuon_axis = 'cols': expected one of \('rows', 'larger'\)"),
    # muon.Muon's own checks, named by the config key
    (["--optim.normuon_beta2=1.0"], r"optim.normuon_beta2 = 1.0: expected a number in \[0, 1\)"),
    (["--optim.adamw_beta2=1.0"], r"optim.adamw_beta2 = 1.0: expected a number in \[0, 1\)"),
    (["--optim.lr_rule=rms"], r"optim.lr_rule = 'rms': expected one of \('original', 'match_rms_adamw'\)"),
    (["--optim.ns_coefficients=polar_express", "--optim.ns_steps=9"],
     r"optim.ns_steps = 9: the 'polar_express' schedule has 1 to 5 steps"),
    (["--optim.muon_clip_alpha=1.5"], r"optim.muon_clip_alpha = 1.5: expected in \[0, 1\]"),
])
def test_command_line_errors_name_the_key(tiny_data, tmp_path, argv_tail, message):
    config = tiny_config(tmp_path, tiny_data)
    with pytest.raises(ConfigError, match=message):
        train.main(["--config", config] + argv_tail)
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.parametrize("replace, message", [
    (dict(optim__lr='"fast"'), r"optim.lr = 'fast' is str; expected float"),
    (dict(train__compile="1"), r"train.compile = 1 is int; expected bool"),
    (dict(schedule__steps="6.0"), r"schedule.steps = 6.0 is float; expected int"),
    (dict(optim__muon_clip_tau="0.8\nlrr = 3"), r"unknown key optim.lrr; valid keys in \[optim\]: optimizer, lr,"),
    (dict(log__prompts='"just one"'), r"log.prompts = 'just one' is str; expected a list of strings"),
])
def test_config_file_errors_name_the_key_and_the_expected_type(tiny_data, tmp_path, replace, message):
    with pytest.raises(ConfigError, match=message):
        train.main(["--config", tiny_config(tmp_path, tiny_data, **replace)])


def test_config_file_errors_for_sections_and_files(tiny_data, tmp_path):
    config = Path(tiny_config(tmp_path, tiny_data))
    config.write_text("lr = 1\n" + config.read_text())
    with pytest.raises(ConfigError, match=r"'lr' is not a section; valid sections: model, data"):
        train.main(["--config", str(config)])
    with pytest.raises(ConfigError, match=r"--config nowhere.toml: no such file"):
        train.main(["--config", "nowhere.toml"])
    with pytest.raises(ConfigError, match=r"--config FILE is required"):
        train.main([])
    with pytest.raises(ConfigError, match=r"data.dir = '.*nowhere': no shard files match"):
        train.main(["--config", tiny_config(tmp_path, tiny_data), "--data.dir", str(tmp_path / "nowhere")])
    with pytest.raises(ConfigError, match=r"--resume latest: no readable checkpoint"):
        train.main(["--config", tiny_config(tmp_path, tiny_data), "--resume", "latest"])


def test_a_fresh_run_never_writes_over_another_runs_checkpoints(tiny_data, tmp_path):
    config = tiny_config(tmp_path, tiny_data)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt_000003.pt").write_bytes(b"precious")
    with pytest.raises(ConfigError, match=r"already holds a run \(ckpt_000003.pt\); resume it with"):
        train.main(["--config", config])
    assert (tmp_path / "run" / "ckpt_000003.pt").read_bytes() == b"precious"
    # A run that stopped before its first checkpoint has nothing to resume: it starts over and its
    # metrics are kept aside, twice over.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "metrics.jsonl").write_text('{"step": 0, "val/loss": 5.0}\n')
    with pytest.raises(ConfigError, match=r"--resume latest: no readable checkpoint .*--resume auto starts the run when there is none"):
        train.main(["--config", config, "--train.run_dir", str(crashed), "--resume", "latest"])
    (crashed / "metrics.1.jsonl").write_text("earlier\n")
    train.main(["--config", config, "--train.run_dir", str(crashed), "--schedule.steps=1", "--train.checkpoint_every=0"])
    assert (crashed / "metrics.2.jsonl").read_text() == '{"step": 0, "val/loss": 5.0}\n'
    assert (crashed / "metrics.1.jsonl").read_text() == "earlier\n" and list(train_losses(crashed)) == [1]


def test_the_script_reports_errors_in_one_line_without_a_traceback(tiny_data, tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--config", tiny_config(tmp_path, tiny_data), "--optim.lrr=1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("error: command line: unknown key optim.lrr") and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------
# Schedule and FLOPs


def test_trapezoid_schedule_and_momentum_warmup():
    s = ScheduleConfig(steps=10, warmup_steps=2, cooldown_frac=0.4, min_lr_frac=0.1,
                       momentum_start=0.85, momentum_warmup_steps=4, momentum_cooldown=-1)
    factors = [train.lr_factor(step, s) for step in range(10)]
    assert factors == pytest.approx([0.5, 1, 1, 1, 1, 1, 1.0, 0.1 + 0.9 * 3 / 4, 0.1 + 0.9 * 2 / 4, 0.1 + 0.9 / 4])
    # a warmup that runs into the cooldown (a short run): the lower line, no jump
    short = replace(s, warmup_steps=8)
    assert [train.lr_factor(step, short) for step in range(10)] == pytest.approx(
        [1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8, 0.1 + 0.9 * 3 / 4, 0.1 + 0.9 * 2 / 4, 0.1 + 0.9 / 4])
    cfg = Config(schedule=s)
    cfg.optim.momentum = 0.95
    model = torch.nn.Linear(4, 4, bias=False)
    optimizer = torch.optim.SGD([dict(params=model.parameters(), use_muon=True, base_lr=2.0)], lr=1.0)
    moments = []
    for step in (0, 2, 4, 8):
        train.set_schedule(optimizer, cfg, step)
        moments.append(optimizer.param_groups[0]["momentum"])
    assert moments == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * factors[8])


def test_momentum_cooldown_and_cosine_weight_decay():
    """nanochat's schedules: Muon momentum warms up 0.85 -> 0.97, holds, then goes linearly to 0.90
    over the lr cooldown; Muon's weight decay follows a cosine from its value to 0 over the run."""
    s = ScheduleConfig(steps=10, cooldown_frac=0.4, momentum_start=0.85, momentum_warmup_steps=4,
                       momentum_cooldown=0.90, weight_decay_cosine=True)
    cfg = Config(schedule=s)
    cfg.optim.momentum, cfg.optim.weight_decay = 0.97, 0.2
    model = torch.nn.Linear(4, 4, bias=False)
    optimizer = torch.optim.SGD([dict(params=model.parameters(), use_muon=True, base_lr=1.0),
                                 dict(params=[torch.nn.Parameter(torch.zeros(2))], use_muon=False, base_lr=1.0,
                                      weight_decay=0.01)], lr=1.0)
    moments, decays = [], []
    for step in range(10):
        train.set_schedule(optimizer, cfg, step)
        moments.append(optimizer.param_groups[0]["momentum"])
        decays.append(optimizer.param_groups[0]["weight_decay"])
    # warmup over steps 0..4; the cooldown is the last 4 steps (6..9): linear from 0.97 at step 6
    assert moments == pytest.approx([0.85, 0.88, 0.91, 0.94, 0.97, 0.97, 0.97, 0.97 - 0.07 / 4, 0.97 - 0.07 / 2,
                                     0.97 - 0.07 * 3 / 4])
    assert decays == pytest.approx([0.2 * 0.5 * (1 + math.cos(math.pi * step / 10)) for step in range(10)])
    assert optimizer.param_groups[1]["weight_decay"] == 0.01  # AdamW groups keep their own
    # A warmup (8 steps) that runs into the cooldown (from step 6): the lower line, so no jump.
    cfg.schedule.momentum_warmup_steps = 8
    warmup = [0.85 + 0.12 * step / 8 for step in range(10)]
    cooldown = [0.97 - 0.07 * max(step - 6, 0) / 4 for step in range(10)]
    for step in range(10):
        train.set_schedule(optimizer, cfg, step)
        assert optimizer.param_groups[0]["momentum"] == pytest.approx(min(warmup[step], cooldown[step], 0.97))


def test_flops_per_token_is_nanogpts_for_mha_and_uses_mla_widths():
    L, H, T = 12, 12, 1024
    with torch.device("meta"):  # shapes only: no 124M weights to fill
        mha, mla = GPT(CONFIGS["gpt124m-mha"]), GPT(CONFIGS["gpt124m-mla"])
    N, M = mha.num_params(non_embedding=True), mla.num_params(non_embedding=True)
    assert mha.flops_per_token(T) == 6 * N + 12 * L * H * 64 * T  # nanoGPT's estimate_mfu
    assert mla.flops_per_token(T) == 6 * M + 6 * L * H * T * ((64 + 32) + 64)


def test_spectrum_is_the_stable_rank_of_the_singular_values():
    u, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    singular = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    matrix = u[:, :8] @ torch.diag(singular) @ v.T
    stable_rank, top3 = runlog.spectrum(matrix)
    energy = singular.square()
    assert stable_rank == pytest.approx((energy.sum() / 16).item(), rel=1e-6)  # 22.25 / 16
    assert top3 == pytest.approx((21 / energy.sum()).item(), rel=1e-6)
    assert runlog.spectrum(u[:, :8])[0] == pytest.approx(8.0, rel=1e-6)  # orthonormal columns: full


def test_log_spectrum_every_logs_momentum_and_update_stable_ranks(tiny_data, tmp_path):
    config = tiny_config(tmp_path, tiny_data)
    train.main(["--config", config, "--log.spectrum_every=2", "--log.spectrum_matrices", '["attn.wo", "mlp.fc"]'])
    rows = [row for row in metrics(tmp_path / "run") if any(key.startswith("spectrum/") for key in row)]
    assert [row["step"] for row in rows] == [2, 4, 6]
    n_layer, width = CONFIGS["tiny-mla"].n_layer, CONFIGS["tiny-mla"].n_embd
    for row in rows:
        # The output head, wo and mlp.proj start at zero, so step 1 moves only the head, step 2
        # wo and proj, and mlp.fc has a gradient from step 3: a moment still zero is left out.
        for layer in range(n_layer):
            for name in ("attn.wo", "mlp.fc") if row["step"] > 2 else ("attn.wo",):
                key = f"spectrum/layer_{layer}/{name}"
                moment, update = row[f"{key}/moment_stable_rank"], row[f"{key}/update_stable_rank"]
                assert 1 <= moment <= width and 0 < row[f"{key}/moment_top3_energy"] <= 1
                assert moment < update <= width  # orthogonalising spreads the step over more directions
        assert not any("attn.wq" in key for key in row)
    with pytest.raises(ConfigError, match=r"log.spectrum_matrices: \['attn.nope'\] are not matrices"):
        train.main(["--config", tiny_config(tmp_path, tiny_data, "bad"), "--log.spectrum_every=2",
                    "--log.spectrum_matrices", '["attn.nope"]'])
