"""train.py as a cluster runs it, on this machine with gloo: torchrun restarting a group after a
worker dies, two launchers as two nodes, and a rank that stops answering. Each is bounded in time."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.test_train import REPO, tiny_config, tiny_data, train_losses  # noqa: F401

ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def workers_of(config) -> dict[int, int]:
    """{rank: pid} of the train.py processes of this config file, from their environment."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            if b"train.py" not in cmdline or str(config).encode() not in cmdline:
                continue
            env = dict(v.split(b"=", 1) for v in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if b"=" in v)
        except OSError:  # the process ended meanwhile
            continue
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(pid)
    return found


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what} after {seconds}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_restarts_a_killed_worker_and_the_run_ends_as_an_uninterrupted_one(tiny_data, tmp_path):
    """The same command throughout, as a scheduler repeats it: torchrun --max-restarts=1 with
    --resume auto. Rank 1 is SIGKILLed once a checkpoint exists; torchrun restarts the group, which
    resumes from the last good checkpoint and ends with the uninterrupted run's losses, bit for bit."""
    config = tiny_config(tmp_path, tiny_data, schedule__steps=40, train__checkpoint_every=5, log__val_every=0,
                         log__sample_every=0, log__heatmap_every=0)
    command = ["--standalone", "--nproc_per_node=2", "--max-restarts=1", "train.py", "--config", config,
               "--resume", "auto", "--train.dist_timeout_s=30"]
    straight = subprocess.run(torchrun(*command, "--train.run_dir", str(tmp_path / "straight")),
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "run"
    job = subprocess.Popen(torchrun(*command), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        wait_for(lambda: (run_dir / "ckpt_000005.pt").exists(), 120, "the first checkpoint")
        victim = workers_of(config)[1]
        os.kill(victim, signal.SIGKILL)
        out, _ = job.communicate(timeout=240)
    finally:
        job.kill()
    assert job.returncode == 0, out[-3000:]
    assert "resumed from" in out
    interrupted, uninterrupted = train_losses(run_dir), train_losses(tmp_path / "straight")
    assert list(interrupted) == list(range(1, 41))
    assert interrupted == uninterrupted  # the last row of each step: the resumed run's


def test_two_launchers_as_two_nodes_train_as_one_node_with_two_ranks(tiny_data, tmp_path):
    """--nnodes=2 --nproc_per_node=1 with a c10d rendezvous on 127.0.0.1, one run dir both see:
    the same losses and weights as --nproc_per_node=2 on one node."""
    config = tiny_config(tmp_path, tiny_data, schedule__steps=4, train__checkpoint_every=0)
    one_node = subprocess.run(torchrun("--standalone", "--nproc_per_node=2", "train.py", "--config", config,
                                       "--train.run_dir", str(tmp_path / "one_node")),
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(torchrun("--nnodes=2", "--nproc_per_node=1", f"--node_rank={n}", "--rdzv_backend=c10d",
                                       f"--rdzv_endpoint={endpoint}", "--rdzv_id=two-nodes", "train.py",
                                       "--config", config, "--train.run_dir", str(tmp_path / "two_nodes")),
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in range(2)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert train_losses(tmp_path / "two_nodes") == train_losses(tmp_path / "one_node")
    assert sum("cpu x 2" in out for out in outputs) == 1  # one rank prints


def test_a_rank_that_stops_answering_fails_the_job_within_the_timeout(tiny_data, tmp_path):
    """Rank 1 frozen (SIGSTOP) mid-run: rank 0's next collective gives up after
    train.dist_timeout_s and the job fails, instead of hanging."""
    config = tiny_config(tmp_path, tiny_data, schedule__steps=100000, train__checkpoint_every=0, log__val_every=0,
                         log__sample_every=0, log__heatmap_every=0)
    run_dir = tmp_path / "run"
    job = subprocess.Popen(torchrun("--standalone", "--nproc_per_node=2", "train.py", "--config", config,
                                    "--train.dist_timeout_s=10"), cwd=REPO,
                           env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(train_losses(run_dir)) >= 2, 120, "training")
        os.kill(workers_of(config)[1], signal.SIGSTOP)
        frozen_at = time.monotonic()
        out, _ = job.communicate(timeout=120)
    finally:
        for pid in workers_of(config).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.kill()
    assert job.returncode != 0
    assert time.monotonic() - frozen_at < 90, out[-2000:]
