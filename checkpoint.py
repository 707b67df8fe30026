"""What a run leaves on disk, and how it gets back: checkpoints, resuming, the run dir, restarts, stopping.

    train.run_dir/
        ckpt_NNNNNN.pt    model, optimizer, step, loader position, RNG states, config, W&B run id, completions
        metrics.jsonl     every logged value (runlog.py)
        .lock             held by the one trainer writing here

Only rank 0 writes. A checkpoint is written to a temporary file and renamed, so a kill leaves either
the whole file or none; the temporaries of a killed writer are removed at the next start. A
checkpoint is verified once a finite training loss has been computed from its weights: one
written just before a run diverged is renamed *.pt.nonfinite, so `--resume auto` skips it.
"""

import datetime
import fcntl
import os
import random
import shlex
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from config import ConfigError
from data.shard import write_atomically

CHECKPOINT_KEYS = ("step", "model", "optimizer", "loader", "rng", "config", "train_time_s")
# Model keys newer than some checkpoints, each with the value that builds the model such a
# checkpoint holds: a saved config without the key predates the option, which was then off.
MODEL_KEYS_ADDED = {"embed_norm": False, "layer_lambdas": False, "smear": False, "backout": False,
                    "value_embeds": False, "init": "speedrun"}


class RunError(RuntimeError):
    """The run cannot go on (a failed checkpoint write, a diverged run): one line for the user, no traceback."""


class NonFiniteLoss(RunError):
    """A nan or inf loss or max logit: the run stops, and nothing is saved over the last verified checkpoint."""


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in run_dir, oldest first."""
    found = []
    for path in run_dir.glob("ckpt_*.pt"):
        step = path.stem.removeprefix("ckpt_")
        if step.isdigit():
            found.append((int(step), path))
    return sorted(found)


def read_checkpoint(path: Path, flag: str = "--resume") -> dict:
    """A checkpoint train.py wrote, its saved config completed with the model keys it predates
    (MODEL_KEYS_ADDED), or a ConfigError naming `flag` and what is wrong with the file."""
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such checkpoint file")
    try:  # mmap: reading the config does not load a GB of weights
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ConfigError(f"{flag} {path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ConfigError(f"{flag} {path}: a torch file, but not one of train.py's checkpoints (it lacks "
                          f"{', '.join(missing)}); checkpoints are the ckpt_NNNNNN.pt files in a train.run_dir")
    model_keys = checkpoint["config"].setdefault("model", {})
    for key, value in MODEL_KEYS_ADDED.items():
        model_keys.setdefault(key, value)
    return checkpoint


# ----------------------------------------------------------------------------------------------
# Resuming


RESUME_MODES = ("auto", "latest")


def resolve_resume(resume: str | None, run_dir: Path, announce: bool) -> Path | None:
    """The checkpoint that --resume names: a path as given; "latest" the newest checkpoint in
    run_dir that reads whole (skipping, and naming, newer ones cut short), a ConfigError if there
    is none; "auto" the same, or None (a fresh start) if there is none."""
    if resume is None or resume not in RESUME_MODES:
        return Path(resume) if resume else None
    for step, path in reversed(checkpoints(run_dir)):
        try:
            read_checkpoint(path)
            return path
        except ConfigError as e:
            if announce:
                print(f"skipping {path.name} (step {step}): {str(e).removeprefix(f'--resume {path}: ')}",
                      file=sys.stderr)
    if resume == "latest":
        raise ConfigError(f"--resume latest: no readable checkpoint (ckpt_*.pt) in train.run_dir = {run_dir}; "
                          "--resume auto starts the run when there is none (a metrics.jsonl left there is kept "
                          "aside, not overwritten)")
    return None


# What a resumed run may change and still repeat the original run's numbers exactly.
REPEATABLE_CHANGES = ("log.", "train.checkpoint_every", "train.target_val_loss", "train.compile_warmup_steps",
                      "train.dist_timeout_s")


def continues_run(changes: list[tuple[str, object, object]]) -> bool:
    """Whether a run resumed with these config changes since its checkpoint (config.config_changes) is
    the run that wrote it, going on: the same run dir, and nothing changed that changes the numbers."""
    return all(key.startswith(REPEATABLE_CHANGES) for key, _, _ in changes)


def resume_command(checkpoint: Path, world_size: int) -> str:
    """The command line that resumes this run from checkpoint (which holds its config)."""
    if world_size == 1:
        return f"python train.py --resume {shlex.quote(str(checkpoint))}"
    # A worker cannot see torchrun's own flags (--nnodes, rendezvous): the user reuses them.
    return f"the same torchrun launch, with train.py --resume {shlex.quote(str(checkpoint))} (or --resume auto)"


def restart_store(world_size: int, timeout: datetime.timedelta):
    """The process group's store under torchrun, with keys of their own for each restart of the
    group. torchrun's rendezvous store outlives a worker group it restarts, and with it the dead
    group's addresses: a new rank that reads a dead peer's address before its successor has
    written over it cannot connect ("connectFullMesh failed"). None outside torchrun."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        return None
    hosts = os.environ["RANK"] == "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=hosts,
                          timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"train.py/restart_{restart}", store)


# ----------------------------------------------------------------------------------------------
# Checkpoints, and which of them are known to be good


class Checkpoints:
    """Rank 0's checkpoints of this run, and which of them are verified.

    A step's training loss is computed from the weights before its update, so the newest
    checkpoint is unverified until a finite loss has come from its weights (verify()); if the run
    diverges first, that checkpoint holds the update that led there (diverged())."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir, self.enabled = run_dir, enabled
        self.verified: tuple[int, Path] | None = None
        self.unverified: tuple[int, Path] | None = (checkpoints(run_dir) or [None])[-1] if enabled else None

    def save(self, step: int, state: dict) -> None:
        path = self.run_dir / f"ckpt_{step:06d}.pt"
        try:
            write_atomically(path, lambda f: torch.save(state, f))  # never half a checkpoint
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            kept = f"{self.unverified[1]} (step {self.unverified[0]})" if self.unverified else "none"
            raise RunError(f"could not write the checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                           f"nothing was left half-written; the latest checkpoint is {kept}") from None
        self.unverified = (step, path)

    def verify(self) -> None:
        """A finite loss came from the newest checkpoint's weights: it is good."""
        if self.unverified:
            self.verified, self.unverified = self.unverified, None

    def diverged(self, what: str, newest_is_to_blame: bool = True) -> NonFiniteLoss:
        """The error for a non-finite value, naming the checkpoint to resume. With newest_is_to_blame,
        the unverified checkpoint holds the weights that produced it: it is renamed *.pt.nonfinite,
        so that --resume auto takes the verified one."""
        kept = (f"the last good checkpoint is {self.verified[1]} (step {self.verified[0]})" if self.verified
                else "no checkpoint had been written" if not self.unverified else "no checkpoint is known to be good")
        if self.unverified and newest_is_to_blame:
            step, path = self.unverified
            renamed = path.with_name(path.name + ".nonfinite")
            os.replace(path, renamed)
            kept += f"; {path.name} (step {step}) holds the update that led here and was renamed {renamed.name}"
        return NonFiniteLoss(f"{what}; stopped without saving this state; {kept}")


def seed_rngs(seed: int) -> None:
    """Python's, numpy's and torch's generators from one seed: what a checkpoint saves (rng_state) is
    then the same in every run of a config, however often it was stopped and resumed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------
# The run dir: one trainer at a time, never over another run's files


@contextmanager
def claimed_run_dir(run_dir: Path, resume_step: int | None, rank: int, world_size: int):
    """run_dir as this run's for as long as the block runs. Rank 0 makes it so: writable, locked
    against a second trainer, cleared of temporary files that a killed writer left, and holding
    nothing a fresh run would write over; the other ranks wait to hear that it succeeded. A run
    refused with a ConfigError inside the block leaves no run dir it created behind."""
    if rank != 0:
        if world_size > 1 and not _tell_ranks(claimed=True):
            raise ConfigError("rank 0 could not take train.run_dir (its error says why)")
        yield
        return
    try:
        lock = _claim_run_dir(run_dir, resume_step)
    except ConfigError:
        if world_size > 1:
            _tell_ranks(claimed=False)
        raise
    if world_size > 1:
        _tell_ranks(claimed=True)
    refused = False
    try:
        yield
    except ConfigError:
        refused = True
        raise
    finally:
        _release_run_dir(lock, wrote_nothing=refused)


def _tell_ranks(claimed: bool) -> bool:
    """Rank 0's claimed, on every rank."""
    flag = [claimed]
    dist.broadcast_object_list(flag, src=0)
    return flag[0]


def _claim_run_dir(run_dir: Path, resume_step: int | None):
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / ".lock", "a+")
    except OSError as e:
        raise ConfigError(f"train.run_dir = {run_dir}: cannot write there ({e.strerror or e})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise ConfigError(f"train.run_dir = {run_dir} is in use by another trainer ({holder}); wait for it "
                          "to end, or set another train.run_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    lock.created_run_dir = created  # so a run refused before it wrote anything leaves no folder behind
    try:
        check_run_dir(run_dir, resume_step)
    except ConfigError:
        _release_run_dir(lock, wrote_nothing=True)
        raise
    # Only a lock holder writes checkpoints here, so every temporary checkpoint file is a dead writer's.
    for stale in run_dir.glob(".ckpt_*.tmp"):
        print(f"removing {stale}: a checkpoint that a killed run was writing ({stale.stat().st_size:,} bytes)")
        stale.unlink()
    return lock


def _release_run_dir(lock, wrote_nothing: bool) -> None:
    """Unlock; a run dir this run created and left empty (a config error found late) is removed."""
    path = Path(lock.name)
    lock.close()
    if wrote_nothing and lock.created_run_dir and [p.name for p in path.parent.iterdir()] == [".lock"]:
        path.unlink()
        path.parent.rmdir()


def check_run_dir(run_dir: Path, resume_step: int | None) -> None:
    """Refuse to write over another run's files: a fresh run needs a run dir without checkpoints, a
    resumed one a run dir without checkpoints after its step. The metrics of a run that stopped
    before its first checkpoint (nothing to resume) are kept aside as metrics.N.jsonl."""
    later = [path.name for step, path in checkpoints(run_dir) if resume_step is None or step > resume_step]
    if later:
        what = "already holds a run" if resume_step is None else f"holds checkpoints after step {resume_step}"
        raise ConfigError(f"train.run_dir = {run_dir} {what} ({', '.join(later[:3])}); resume it with "
                          "--resume auto, or set another train.run_dir")
    metrics = run_dir / "metrics.jsonl"
    if resume_step is None and metrics.exists():
        kept = next(run_dir / f"metrics.{n}.jsonl" for n in range(1, 10**6) if not (run_dir / f"metrics.{n}.jsonl").exists())
        os.rename(metrics, kept)
        print(f"{run_dir} holds a run that stopped before its first checkpoint: its {metrics.name} is kept as "
              f"{kept.name}, and this run starts over")


# ----------------------------------------------------------------------------------------------
# Stopping: when the ranks disagree, and on a signal


def check_gradients_match_across_ranks(model: torch.nn.Module) -> None:
    """Every rank must hold a gradient for the same parameters. One that only some ranks train (a
    branch taken on some ranks' data) gets different updates on each, and the replicas drift
    apart without an error: stop the run instead, naming the parameter."""
    names, params = zip(*model.named_parameters())
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has_grad)
    world = dist.get_world_size()
    uneven = [(name, n) for name, n in zip(names, has_grad.tolist()) if 0 < n < world]
    if uneven:
        listed = ", ".join(f"{name} ({n} of {world} ranks)" for name, n in uneven[:5])
        raise RunError(f"parameters with a gradient on some ranks only: {listed}; every rank must use every "
                       "trained parameter in each step, or the ranks' weights drift apart")


class StopSignals:
    """SIGTERM (a scheduler's preemption notice) and SIGINT (Ctrl-C) ask the run to stop: it finishes
    the step, writes a checkpoint, ends the W&B run and exits with 128 + the signal's number. The
    first signal puts the previous handlers back, so a second one acts at once (KeyboardInterrupt,
    or the default SIGTERM kill)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool = True):
        self.received, self.previous, self.announce = None, {}, announce  # announce: one rank prints

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        self.received = signum
        self.restore()
        if not self.announce:
            return
        # torchrun also sends SIGTERM to the survivors when one worker fails: their step cannot
        # finish then, and the group restarts (--max-restarts) from the last checkpoint.
        under_torchrun = signum == signal.SIGTERM and "TORCHELASTIC_RUN_ID" in os.environ
        print(f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint"
              + (" (or, if torchrun sent it because a worker failed, restarting from the last one)" if under_torchrun
                 else " (send it again to stop at once)"), file=sys.stderr, flush=True)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __exit__(self, *exc):
        self.restore()
