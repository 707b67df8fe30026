"""Killed at any moment, nothing lost: a run killed with SIGKILL again and again, each time restarted
with the same command and --resume auto, ends with the uninterrupted run's checkpoints, losses and
whole metrics.jsonl, each value once. The moments are drawn from a seeded generator and planted in
the process (tests/kill_at.py), so every run of the test kills at the same places: entering a
step, inside validation, half-way through a checkpoint write, just after a logged row."""

import collections
import os
import random
import subprocess
import sys

import torch

from tests.test_cluster import ENV, torchrun
from tests.test_train import REPO, metrics, tiny_config, tiny_data, train_losses  # noqa: F401

# The values of a row that time the run: they differ between any two runs, killed or not.
TIMINGS = ("train/tokens_per_s", "train/mfu", "train/time_s")
# How many of each event a start may meet before its kill (enough for every start to get there).
EVENTS = {"step": 6, "validation": 2, "checkpoint": 2, "logged": 6}


def chaos_config(tmp_path, data):
    return tiny_config(tmp_path, data, schedule__steps=40, train__checkpoint_every=4, log__every=2,
                       log__val_every=4, log__sample_every=8, log__heatmap_every=0)


def kill_plan(seed: int, kills: int) -> list[str]:
    """kills moments, at least one inside validation and one inside a checkpoint write."""
    rng = random.Random(seed)
    kinds = ["validation", "checkpoint"] + [rng.choice(sorted(EVENTS)) for _ in range(kills - 2)]
    rng.shuffle(kinds)
    return [f"{kind} {rng.randint(1, EVENTS[kind])}" for kind in kinds]


def launch(args, kills: str, log, **kwargs):
    env = {**ENV, "CHAOS_KILLS": kills, "CHAOS_LOG": str(log)}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def record(run_dir) -> list[dict]:
    """metrics.jsonl, row by row, without the timings."""
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in metrics(run_dir)]


def assert_identical(a, b, where):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def assert_same_run(run_dir, straight_dir):
    """The killed run ended as the uninterrupted one: the same checkpoints, the same record."""
    names = sorted(p.name for p in straight_dir.glob("ckpt_*.pt"))
    assert sorted(p.name for p in run_dir.iterdir() if "ckpt" in p.name) == names  # no .tmp, no .nonfinite left
    for name in names:
        got, expected = (torch.load(d / name, weights_only=True) for d in (run_dir, straight_dir))
        for key in ("step", "model", "optimizer", "loader", "rng", "completions"):
            assert_identical(got[key], expected[key], f"{name}[{key!r}]")
    assert record(run_dir) == record(straight_dir)  # every value, once, in the same order
    losses = [row["step"] for row in metrics(run_dir) if "train/loss" in row]
    assert losses == sorted(set(losses))
    completions = torch.load(run_dir / names[-1], weights_only=True)["completions"]
    assert max(collections.Counter((step, prompt, mode) for step, prompt, mode, _ in completions).values()) == 1


def test_a_run_killed_eight_times_ends_as_the_uninterrupted_run(tiny_data, tmp_path):
    config = chaos_config(tmp_path, tiny_data)
    command = [sys.executable, "tests/kill_at.py", "--config", config, "--resume", "auto"]
    log = tmp_path / "kills.txt"
    straight = launch(command + ["--train.run_dir", str(tmp_path / "straight")], "", log)
    assert straight.returncode == 0, straight.stderr[-3000:]
    outputs = []
    for moment in kill_plan(seed=29, kills=8):
        killed = launch(command, moment, log)
        assert killed.returncode == -9, f"{moment}: the run ended before it ({killed.returncode})\n{killed.stderr[-2000:]}"
        outputs.append(killed.stdout)
    finished = launch(command, "", log)
    assert finished.returncode == 0, finished.stderr[-3000:]
    kills = log.read_text().splitlines()
    assert len(kills) == 8 and {k.split()[0] for k in kills} >= {"validation", "checkpoint"}
    # the start after a kill inside a checkpoint write found the half-written file and removed it
    assert any("a checkpoint that a killed run was writing" in out for out in outputs[1:] + [finished.stdout])
    assert_same_run(tmp_path / "run", tmp_path / "straight")
    assert sorted(train_losses(tmp_path / "run")) == list(range(2, 41, 2))


def test_a_torchrun_job_whose_ranks_are_killed_ends_as_the_uninterrupted_job(tiny_data, tmp_path):
    """Two ranks under torchrun --max-restarts: rank 1 killed inside validation and at a step, rank 0
    (the one that writes) inside a checkpoint write; each time torchrun restarts the group with the
    same command, which resumes from the last checkpoint."""
    config = chaos_config(tmp_path, tiny_data)
    command = ["--standalone", "--nproc_per_node=2", "--max-restarts=3", "tests/kill_at.py", "--config", config,
               "--resume", "auto", "--train.dist_timeout_s=30"]
    log = tmp_path / "kills.txt"
    straight = launch(torchrun(*command, "--train.run_dir", str(tmp_path / "straight")), "", log)
    assert straight.returncode == 0, straight.stderr[-3000:]
    job = launch(torchrun(*command), "1:validation 2;0:checkpoint 1;1:step 4", log)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert log.read_text().splitlines() == ["validation 2", "checkpoint 1", "step 4"]
    assert_same_run(tmp_path / "run", tmp_path / "straight")
