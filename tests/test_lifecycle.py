"""A run's life outside the happy path: resumed into the same W&B run, stopped by a signal, a locked
or dirty run dir, bad shards, ranks that disagree, and every error a one-line message whose hint
is a command that works."""

import fcntl
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import checkpoint
import config
import train
from config import ConfigError
from data import fineweb, prepare
from data.shard import HEADER_BYTES, write_shard
from tests.test_train import REPO, metrics, read_wandb_records, tiny_config, tiny_data, train_losses  # noqa: F401


def history_steps(run_dir, offline_dir) -> list[int]:
    records = read_wandb_records_in(offline_dir)
    return [r.history.step.num for r in records if r.WhichOneof("record_type") == "history"]


def read_wandb_records_in(offline_dir):
    """read_wandb_records for one offline-run-* folder (a resumed run has two)."""
    class OneRun:  # read_wandb_records globs run_dir/wandb/offline-run-*/run-*.wandb
        def glob(self, pattern):
            return offline_dir.glob("run-*.wandb")
    return read_wandb_records(OneRun())


# ----------------------------------------------------------------------------------------------
# W&B: one run is one W&B run


def test_resume_rewinds_the_wandb_run_and_the_record_holds_every_value_once(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config(tmp_path, tiny_data)
    run_dir = tmp_path / "run"
    train.main(["--config", config, "--log.wandb=offline"])
    uninterrupted = metrics(run_dir)
    # A kill after step 4 was logged: ckpt 6 and the rows after step 4 never happened.
    (run_dir / "ckpt_000006.pt").unlink()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in uninterrupted if r["step"] <= 4))
    train.main(["--config", config, "--resume", "latest", "--log.wandb=offline"])

    # Resumed from step 3: the rows of step 4 went and came back, so every value is there once.
    timings = ("train/tokens_per_s", "train/mfu", "train/time_s")
    assert ([{k: v for k, v in r.items() if k not in timings} for r in metrics(run_dir)]
            == [{k: v for k, v in r.items() if k not in timings} for r in uninterrupted])
    first, resumed = sorted((run_dir / "wandb").glob("offline-run-*"))
    run_records = [r.run for r in read_wandb_records_in(resumed) if r.WhichOneof("record_type") == "run"]
    first_id = [r.run for r in read_wandb_records_in(first) if r.WhichOneof("record_type") == "run"][0].run_id
    assert run_records[0].run_id == first_id  # one W&B run...
    point = run_records[0].branch_point  # ...rewound (wandb.init's resume_from) to the checkpoint's step
    assert (point.run, point.metric, point.value) == (first_id, "_step", 3)
    assert sorted(set(history_steps(run_dir, resumed))) == [4, 5, 6]
    completions = torch.load(run_dir / "ckpt_000006.pt", weights_only=True)["completions"]
    assert sorted({row[0] for row in completions}) == [3, 6]  # the table's whole history, each step once
    assert len(completions) == 2


def test_wandb_environment_wins_where_the_config_is_unset(tiny_data, tmp_path, monkeypatch):
    import wandb
    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("no W&B in this test")

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_NAME", "env-name")
    config = tiny_config(tmp_path, tiny_data, schedule__steps="1", train__checkpoint_every="0")
    train.main(["--config", config, "--log.wandb=offline", "--log.wandb_group=cfg-group"])
    assert seen["project"] == "from-env" and seen["name"] == "env-name" and seen["group"] == "cfg-group"
    assert seen["entity"] is None and seen["tags"] is None  # left to WANDB_ENTITY, WANDB_TAGS
    train.main(["--config", config, "--log.wandb=offline", "--train.run_dir", str(tmp_path / "two"),
                "--log.wandb_project=cfg-project"])
    assert seen["project"] == "cfg-project"


# ----------------------------------------------------------------------------------------------
# Signals


def run_script(args, timeout=300, **kwargs):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_at_a_checkpoint_that_resumes_exactly(tiny_data, tmp_path, signum):
    config = tiny_config(tmp_path, tiny_data, schedule__steps="400", train__checkpoint_every="0", log__val_every="0",
                         log__sample_every="0", log__heatmap_every="0")
    straight = run_script(["--config", config, "--train.run_dir", str(tmp_path / "straight"), "--schedule.steps=400"])
    stopped = run_script(["--config", config])
    for line in stopped.stdout:  # stop it while it trains
        if line.startswith("step     5/"):
            stopped.send_signal(signum)
            break
    out, err = stopped.communicate(timeout=300)
    assert stopped.returncode == 128 + signum, out + err
    assert "Traceback" not in err and f"{signal.Signals(signum).name}: stopping after this step" in err
    match = re.search(r"stopped by \w+ at step (\d+), checkpoint saved; resume with: (.*)", out)
    assert match, out
    step = int(match.group(1))
    assert 5 <= step < 400 and (tmp_path / "run" / f"ckpt_{step:06d}.pt").is_file()
    assert not list((tmp_path / "run").glob(".*.tmp"))
    command = shlex.split(match.group(2))
    assert command[:2] == ["python", "train.py"]  # the printed hint, run as printed
    resumed = run_script(command[2:])
    resumed_out, resumed_err = resumed.communicate(timeout=300)
    straight.communicate(timeout=300)
    assert resumed.returncode == 0 and straight.returncode == 0, resumed_out + resumed_err
    expected, got = train_losses(tmp_path / "straight"), train_losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 401))
    assert all(got[s] == expected[s] for s in range(1, 401))  # bit for bit, before and after the stop


def test_stop_signals_restore_the_previous_handlers_after_the_first():
    previous = signal.getsignal(signal.SIGINT)
    with checkpoint.StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) is previous  # a second Ctrl-C acts at once
    assert signal.getsignal(signal.SIGINT) is previous


# ----------------------------------------------------------------------------------------------
# The run dir


def test_a_second_trainer_on_a_locked_run_dir_is_refused(tiny_data, tmp_path):
    config = tiny_config(tmp_path, tiny_data)
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        with pytest.raises(ConfigError, match=r"run is in use by another trainer \(pid 4242 on elsewhere\)"):
            train.main(["--config", config])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    train.main(["--config", config, "--schedule.steps=1", "--train.checkpoint_every=0"])  # released: it runs


def test_stale_temporary_checkpoints_are_removed_at_start(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = run_dir / ".ckpt_000003.pt.12345-abcd1234.tmp"
    stale.write_bytes(b"x" * 100)
    keep = run_dir / "notes.tmp"
    keep.write_text("mine")
    train.main(["--config", tiny_config(tmp_path, tiny_data), "--schedule.steps=1", "--train.checkpoint_every=0"])
    assert not stale.exists() and keep.exists()
    assert f"removing {stale}" in capsys.readouterr().out


def test_an_unwritable_run_dir_is_refused_before_any_work(tiny_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"train.run_dir = .*file/run: cannot write there"):
        train.main(["--config", tiny_config(tmp_path, tiny_data), "--train.run_dir", str(blocker / "run")])


def test_a_failed_checkpoint_write_is_one_clear_error(tiny_data, tmp_path, monkeypatch):
    def disk_full(state, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(train.RunError, match=r"could not write the checkpoint .*ckpt_000003.pt \(RuntimeError: "
                                              r"\[enforce fail.*nothing was left half-written; the latest checkpoint is none"):
        train.main(["--config", tiny_config(tmp_path, tiny_data)])
    assert not [p.name for p in (tmp_path / "run").iterdir() if "ckpt" in p.name]


# ----------------------------------------------------------------------------------------------
# Data


def test_a_train_shard_with_a_token_past_the_vocabulary_is_refused_by_name(tiny_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train_000000.bin", "val_000000.bin"):
        (data / name).write_bytes((tiny_data / name).read_bytes())
    tokens = np.full(3000, 65, dtype=np.int64)
    tokens[1234] = 300  # bytes has 257 tokens; the padded embedding has 320 rows: silent garbage
    write_shard(data / "train_000001.bin", tokens)
    with pytest.raises(ConfigError, match=r"train_000001.bin holds token id 300, but data.tokenizer = 'bytes' "
                                                r"has 257 tokens"):
        train.main(["--config", tiny_config(tmp_path, data)])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_llmc_uint32_shards_are_named_as_such(tmp_path):
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240801, 7, 4
    (tmp_path / "llama3.bin").write_bytes(header.tobytes() + np.arange(4, dtype="<u4").tobytes())
    with pytest.raises(ValueError, match=r"an llm.c shard of uint32 tokens \(magic 20240801, version 7"):
        from data.shard import read_header
        read_header(tmp_path / "llama3.bin")
    assert HEADER_BYTES == 1024


@pytest.mark.parametrize("argv, message", [
    (["nowhere.txt", "--out", "fresh"], "error: input nowhere.txt does not exist"),
    (["bad.jsonl", "--out", "fresh"], "error: bad.jsonl:1: not a line of UTF-8 JSON"),
    (["good.txt", "--out", "used"], "error: used already holds shards (train_000000.bin, ...); remove them"),
])
def test_data_prepare_errors_are_one_line(tmp_path, argv, message):
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    (tmp_path / "good.txt").write_text("hello world\n")
    (tmp_path / "used").mkdir()
    write_shard(tmp_path / "used" / "train_000000.bin", [1, 2])
    result = subprocess.run([sys.executable, "-m", "data.prepare", *argv, "--tokenizer", "bytes", "--workers", "1"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    # The progress bar may have drawn on stderr; the error is one line after it, with no traceback.
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith(message), result.stderr


def test_fineweb_bad_shard_count_is_one_line():
    result = subprocess.run([sys.executable, "-m", "data.fineweb", "--train-shards", "200"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == "error: --train-shards must be in [0, 103], got 200\n"


# ----------------------------------------------------------------------------------------------
# Ranks that disagree


def _uneven_gradients(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    if rank == 1:
        model[1].bias.grad = None  # a branch this rank's data did not take
    try:
        checkpoint.check_gradients_match_across_ranks(model)
        results[rank] = "no error"
    except checkpoint.RunError as e:
        results[rank] = str(e)
    for p in model.parameters():  # every rank with every gradient: no error
        p.grad = torch.ones_like(p)
    checkpoint.check_gradients_match_across_ranks(model)
    dist.destroy_process_group()


def test_a_gradient_on_some_ranks_only_stops_every_rank_naming_it(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_uneven_gradients, args=(2, tmp_path / "init", results), nprocs=2)
    for rank in (0, 1):
        assert results[rank].startswith("parameters with a gradient on some ranks only: 1.bias (1 of 2 ranks)")


# ----------------------------------------------------------------------------------------------
# Errors and hints


def test_help_lists_every_config_key_with_type_and_default():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0
    for section, cls in config.SECTIONS.items():
        for key in typing.get_type_hints(cls):
            assert re.search(rf"^    {section}\.{key}: \S", result.stdout, flags=re.M), f"{section}.{key}"
    assert "    optim.lr: float = 0.05  # hidden matrices" in result.stdout
    assert "HOST:29500 train.py --config configs/speedrun.toml" in result.stdout  # one line, as printed


def test_help_after_a_config_and_overrides_prints_the_resolved_config():
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/demo.toml", "--optim.lr=0.01", "--help"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "    optim.lr: float = 0.01  # hidden matrices" in result.stdout  # the override
    assert "    model.n_layer: int = 4" in result.stdout  # the config's
    assert "    model.n_head: int = 4" in result.stdout  # its preset's (tiny-mla)
    assert '    train.run_dir: str = "runs/demo"' in result.stdout


@pytest.mark.parametrize("argv_tail, message", [
    (["--config", "other.toml"], r"--config given twice"),
    (["--optim.lr=inf"], r"optim.lr = inf: expected a finite number"),
    (["--optim.embed_lr=nan"], r"optim.embed_lr = nan: expected a finite number"),
])
def test_more_command_line_errors(tiny_data, tmp_path, argv_tail, message):
    with pytest.raises(ConfigError, match=message):
        train.main(["--config", tiny_config(tmp_path, tiny_data)] + argv_tail)


def test_demo_with_gpt2_is_a_config_error_before_any_download(tiny_data, tmp_path, monkeypatch):
    def no_download(*args):
        raise AssertionError("the tokenizer was loaded before the config was checked")

    monkeypatch.setattr(train, "get_tokenizer", no_download)
    with pytest.raises(ConfigError, match=r'data.tokenizer = .gpt2.: expected "bytes" with data.demo = true'):
        train.main(["--config", str(REPO / "configs/demo.toml"), "--data.tokenizer=gpt2"])


def test_resume_of_a_torch_file_that_is_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / "model.pt")
    with pytest.raises(ConfigError, match=r"model.pt: a torch file, but not one of train.py's checkpoints "
                                                r"\(it lacks step, model, optimizer"):
        train.main(["--resume", str(tmp_path / "model.pt")])
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match=r"not one of train.py's checkpoints"):
        train.main(["--resume", str(tmp_path / "list.pt")])


def test_every_hint_in_an_error_is_a_command_that_parses(tiny_data, tmp_path, monkeypatch):
    """The commands that error messages suggest, parsed by the parsers of the scripts they name."""
    with pytest.raises(ConfigError) as error:
        train.main(["--config", tiny_config(tmp_path, tiny_data), "--data.dir", str(tmp_path / "nowhere")])
    hints = re.findall(r"python (?:-m )?(\S+) ([^;)]*)", str(error.value))
    assert {script for script, _ in hints} == {"data.fineweb", "data.prepare", "train.py"}
    for script, args in hints:
        args = [a if a not in ("FILES", "DIR") else str(tmp_path / a) for a in shlex.split(args)]
        if script == "train.py":
            cfg, _ = train.load_run_config([a if not a.startswith("configs/") else str(REPO / a) for a in args])
            assert cfg.data.demo
        else:
            module = {"data.fineweb": fineweb, "data.prepare": prepare}[script]
            assert module.build_parser().parse_args(args) is not None  # argparse exits on a bad line

    # Offline GPT-2: the hint names train.py's own key.
    def offline(*args):
        from data.tokenizer import TokenizerDownloadError
        raise TokenizerDownloadError("could not download the GPT-2 tokenizer files (ConnectionError)")

    monkeypatch.setattr(train, "get_tokenizer", offline)
    with pytest.raises(ConfigError) as error:
        train.main(["--config", tiny_config(tmp_path, tiny_data), "--data.tokenizer=gpt2"])
    flag = re.search(r"pass it with (--\S+) (\S+)", str(error.value))
    assert flag and flag.group(1) == "--data.tokenizer_file"
    cfg, _ = train.load_run_config(["--config", tiny_config(tmp_path, tiny_data), flag.group(1), flag.group(2)])
    assert cfg.data.tokenizer_file == flag.group(2)


def test_the_readme_path_from_data_prepare_to_training(tmp_path, capsys):
    """Your own text, prepared and trained on with the README's overrides of configs/demo.toml; a
    val set too small for the demo's val_tokens is an error that says what will fit."""
    texts = tmp_path / "texts"
    texts.mkdir()
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while seven cats watch".split()
    for i in range(40):
        (texts / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, 3000)))
    prepare.main([str(texts), "--out", str(tmp_path / "mytext"), "--tokenizer", "bytes", "--workers", "1",
                  "--val-fraction", "0.05"])
    command = ["--config", str(REPO / "configs/demo.toml"), "--data.demo=false", "--data.dir", str(tmp_path / "mytext"),
               "--train.run_dir", str(tmp_path / "runs" / "mytext"), "--schedule.steps=20", "--log.every=10",
               "--log.val_every=10", "--log.sample_every=0", "--log.heatmap_every=0", "--train.checkpoint_every=0",
               "--schedule.momentum_warmup_steps=5"]
    with pytest.raises(ConfigError, match=r"hold \d+ tokens, fewer than the 32769 needed .*set data.val_tokens "
                                                r"to at most (\d+) \(a multiple of 2048\)") as error:
        train.main(command)
    fits = re.search(r"at most (\d+)", str(error.value)).group(1)
    train.main(command + ["--data.val_tokens", fits])
    vals = [r["val/loss"] for r in metrics(tmp_path / "runs" / "mytext") if "val/loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] - 1.0


# ----------------------------------------------------------------------------------------------
# One command that starts, resumes or does nothing: --resume auto


def test_resume_auto_starts_resumes_and_stops_at_a_finished_run(tiny_data, tmp_path, capsys):
    """The command a requeued job repeats: a fresh run the first time, a resume from the newest
    checkpoint after an interruption, nothing once the run is done; the losses are the
    uninterrupted run's."""
    config = tiny_config(tmp_path, tiny_data)
    train.main(["--config", config, "--train.run_dir", str(tmp_path / "straight")])
    command = ["--config", config, "--resume", "auto"]
    assert train.main(command + ["--schedule.steps=6", "--train.checkpoint_every=3"]) == 0
    run_dir = tmp_path / "run"
    (run_dir / "ckpt_000006.pt").unlink()  # interrupted after step 3's checkpoint
    assert train.main(command) == 0
    assert "resumed from" in capsys.readouterr().out
    assert train_losses(run_dir) == train_losses(tmp_path / "straight")
    assert train.main(command) == 0
    assert "ckpt_000006.pt is step 6 of schedule.steps = 6: the run has finished" in capsys.readouterr().out


def test_an_unreadable_newest_checkpoint_is_skipped_for_the_one_before(tiny_data, tmp_path, capsys):
    config = tiny_config(tmp_path, tiny_data)
    train.main(["--config", config])
    run_dir = tmp_path / "run"
    newest = run_dir / "ckpt_000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short
    cfg, path = train.load_run_config(["--config", config, "--resume", "latest"])
    assert path == run_dir / "ckpt_000003.pt"
    assert re.search(r"skipping ckpt_000006.pt \(step 6\): not a readable checkpoint", capsys.readouterr().err)
    for name in ("ckpt_000003.pt", "ckpt_000006.pt"):
        (run_dir / name).write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="--resume latest: no readable checkpoint"):
        train.load_run_config(["--config", config, "--resume", "latest"])
    _, path = train.load_run_config(["--config", config, "--resume", "auto"])
    assert path is None  # auto would start over, and the run dir's check refuses to write over them
    with pytest.raises(ConfigError, match=r"already holds a run"):
        train.main(["--config", config, "--resume", "auto"])
