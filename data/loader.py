"""
Batches of tokens from shard files, for one rank of a (possibly) distributed run.

TrainLoader: an endless, seeded stream. Each shard is cut into windows of T+1
tokens that start every T tokens (a window gives one sequence's inputs
x = window[:-1] and targets y = window[1:], so every token is an input once a
pass); every epoch shuffles the shard order and the window order within each
shard, and a batch is B windows from anywhere in the shard: at step k of a shard
rank r takes windows (k*world_size + r)*B .. +B of the order, so no two ranks
ever see the same inputs. Independent windows, not one run of B*T tokens, keep
the B sequences of a batch from one stretch of one document: on small data
(the demo's 2M tokens) that alone lowers the val loss by ~0.1 at equal tokens.
Only the current shard is open, as a memmap. The position is three ints
(epoch, shard, step), the same on every rank, so resuming is exact.

ValLoader: the first num_tokens tokens of the val shards, in order, the same
batches on every call, split across ranks.
"""

import glob

import numpy as np
import torch

from data.shard import read_header, read_shard


def find_shards(pattern):
    files = sorted(glob.glob(str(pattern)))
    if not files:
        raise FileNotFoundError(f"no shard files match {pattern}")
    return files


def to_batch(tokens, batch_size, seq_len, device):
    """Inputs and targets, (B, T) int64 on device, from numpy tokens: B windows (B, T+1), or one
    run of B*T+1 tokens whose B sequences follow each other."""
    buf = torch.from_numpy(tokens.astype(np.int64))
    if device.type == "cuda":
        buf = buf.pin_memory()  # lets the copy below run asynchronously
    buf = buf.to(device, non_blocking=True)
    if buf.ndim == 2:  # contiguous, as every other batch is: torch.compile guards on strides
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
    return buf[:-1].view(batch_size, seq_len), buf[1:].view(batch_size, seq_len)


def check_rank(rank, world_size):
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


class TrainLoader:
    """next(loader) -> (x, y), each (batch_size, seq_len) int64 on device, forever.

    pattern is a glob of shard files; every rank passes the same pattern and seed.
    """

    def __init__(self, pattern, batch_size, seq_len, rank=0, world_size=1, seed=0, device="cpu"):
        check_rank(rank, world_size)
        self.files = find_shards(pattern)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.device = torch.device(device)
        # Reading every header now means a bad shard fails at start-up, not hours in.
        counts = [read_header(f) for f in self.files]
        self.windows = [max(0, n - 1) // seq_len for n in counts]
        # Steps a shard gives each rank; its last windows % (world_size * batch_size) windows are skipped.
        self.steps = [n // (world_size * batch_size) for n in self.windows]
        if not any(self.steps):
            raise ValueError(
                f"no shard matching {pattern} holds world_size * batch_size * seq_len + 1 = "
                f"{world_size * batch_size * seq_len + 1} tokens (largest: {max(counts)})"
            )
        self.load_state_dict({"epoch": 0, "shard": 0, "step": 0})

    def tokens_per_pass(self) -> int:
        """Input tokens all ranks together read in one pass over the shards (an epoch)."""
        return sum(self.steps) * self.world_size * self.batch_size * self.seq_len

    def state_dict(self):
        """Where the next batch comes from; identical on every rank."""
        return {"epoch": self.epoch, "shard": self.shard, "step": self.step}

    def load_state_dict(self, state):
        if set(state) != {"epoch", "shard", "step"}:
            raise ValueError(f"loader state must have keys epoch, shard, step; got {sorted(state)}")
        epoch, shard, step = (int(state[k]) for k in ("epoch", "shard", "step"))
        if epoch < 0 or not 0 <= shard < len(self.files):
            raise ValueError(f"loader state {state} does not fit {len(self.files)} shard files")
        file_index = self.shard_order(epoch)[shard]
        if not 0 <= step <= self.steps[file_index]:
            raise ValueError(
                f"loader state {state}: {self.files[file_index]} has only {self.steps[file_index]} steps per rank"
            )
        self.epoch, self.shard, self.step = epoch, shard, step
        self.open_shard()

    def shard_order(self, epoch):
        """File indices in the order this epoch reads them; the same on every rank."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.files)).tolist()

    def open_shard(self):
        """Memmap shard number self.shard of this epoch and shuffle its windows."""
        self.file_index = self.shard_order(self.epoch)[self.shard]
        self.tokens = read_shard(self.files[self.file_index])
        window_rng = np.random.default_rng([self.seed, self.epoch, self.file_index])
        self.window_order = window_rng.permutation(self.windows[self.file_index])

    def __iter__(self):
        return self

    def __next__(self):
        while self.step == self.steps[self.file_index]:  # this shard is used up: next shard, maybe next epoch
            self.step, self.shard = 0, self.shard + 1
            if self.shard == len(self.files):
                self.shard, self.epoch = 0, self.epoch + 1
            self.open_shard()
        first = (self.step * self.world_size + self.rank) * self.batch_size
        starts = self.window_order[first:first + self.batch_size] * self.seq_len
        self.step += 1
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]  # (B, T + 1), one gather
        return to_batch(windows, self.batch_size, self.seq_len, self.device)


class ValLoader:
    """for x, y in loader: len(loader) batches of (batch_size, seq_len) int64 on device.

    Over all ranks and batches the inputs cover exactly the first num_tokens
    tokens of the files matching pattern, which must be a multiple of
    world_size * batch_size * seq_len.
    """

    def __init__(self, pattern, num_tokens, batch_size, seq_len, rank=0, world_size=1, device="cpu"):
        check_rank(rank, world_size)
        self.step_tokens = world_size * batch_size * seq_len
        if num_tokens <= 0 or num_tokens % self.step_tokens:
            raise ValueError(
                f"val tokens ({num_tokens}) must be a positive multiple of world_size * batch_size * seq_len "
                f"= {self.step_tokens}"
            )
        self.num_tokens, self.pattern = num_tokens, pattern
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank = rank
        self.device = torch.device(device)
        # One token more than asked: the last input still needs its target.
        self.tokens = first_tokens(find_shards(pattern), num_tokens + 1, pattern, world_size, batch_size, seq_len)

    def __len__(self):
        return self.num_tokens // self.step_tokens

    def __iter__(self):
        rank_tokens = self.batch_size * self.seq_len
        for step in range(len(self)):
            start = step * self.step_tokens + self.rank * rank_tokens
            yield to_batch(self.tokens[start:start + rank_tokens + 1], self.batch_size, self.seq_len, self.device)


def first_tokens(files, count, pattern, world_size=1, batch_size=1, seq_len=1):
    """The first count tokens of files read as one stream, in memory (val sets are small). Too few is
    a ValueError that names the settings that would fit: val tokens come in whole batches of
    world_size x batch_size x seq_len, plus one token for the last target."""
    parts, have = [], 0
    for f in files:
        if have == count:
            break
        part = read_shard(f)[:count - have]
        parts.append(np.array(part))  # a copy, so the memmap can close
        have += len(part)
    if have < count:
        batch = world_size * batch_size * seq_len
        fits = (have - 1) // batch * batch  # the most val tokens these shards can give
        if fits > 0:
            hint = f"; set data.val_tokens to at most {fits} (a multiple of {batch})"
        else:  # not even one batch: name the largest micro-batch or sequence that fits, with its val tokens
            most_batch, most_seq = (have - 1) // (world_size * seq_len), (have - 1) // (world_size * batch_size)
            options = [(key, n, tokens) for key, n, tokens in
                       (("train.micro_batch_size", most_batch, world_size * most_batch * seq_len),
                        ("data.seq_len", most_seq, world_size * batch_size * most_seq)) if n > 0]
            hint = (f"; one validation batch needs {batch + 1} tokens: set "
                    + " or ".join(f"{key} to at most {n} (and data.val_tokens to {tokens})" for key, n, tokens in options)
                    if options else f"; one validation batch needs {batch + 1}: give the val set more text")
        raise ValueError(f"val shards matching {pattern} hold {have} tokens, fewer than the {count} needed "
                         f"({count - 1} val tokens + 1 for the last target){hint}")
    return np.concatenate(parts)


def largest_token_ids(train: TrainLoader, val: ValLoader) -> list[tuple[str, int]]:
    """(file, largest token id) of every train shard and of the val tokens, to check them against the
    vocabulary before training: an id past it crashes a run mid-way (on a GPU a device assert takes
    every rank down), one inside its padding trains on garbage. A memmap's max reads each shard once."""
    return [(str(f), int(read_shard(f).max(initial=0))) for f in train.files] + [(val.pattern, int(val.tokens.max()))]
