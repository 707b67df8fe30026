"""Train a GPT with Muon (+ AdamW for embeddings, head and gains) and MuonClip, on CPU, one GPU or many.

    python train.py --config configs/demo.toml --resume auto         # small model, CPU, minutes, no download
    python train.py --config configs/gpu.toml --resume auto          # 124M MLA on one GPU
    torchrun --standalone --nproc_per_node=8 train.py --config configs/speedrun.toml --resume auto
    # several nodes: on every node, HOST the first node's address, train.run_dir on a shared filesystem
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py --config configs/speedrun.toml
    python train.py --config configs/gpu.toml --optim.lr=0.03 --schedule.steps 2000   # any key, typed

--resume auto continues from the newest good checkpoint in train.run_dir, or starts the run if
there is none, and exits at once if the run has finished: a job requeued or restarted with the
same command (SLURM --requeue, torchrun --max-restarts) picks up where it stopped. --resume latest
insists on a checkpoint; --resume PATH takes one and its saved config. A resumed run repeats the
uninterrupted run's losses bit for bit. Everything a run writes goes to train.run_dir, from rank 0
only (checkpoint.py, runlog.py). Under torchrun every rank runs this file; gradient accumulation
keeps train.batch_tokens per optimizer step whatever the number of ranks.
"""

import copy
import datetime
import math
import os
import shlex
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import muon
from checkpoint import (Checkpoints, RunError, StopSignals, claim_run_dir,
                        newest_readable_checkpoint, read_checkpoint, release_run_dir, rng_state, set_rng_state,
                        wait_for_run_dir)
from config import (Config, ConfigError, ScheduleConfig, build_config, config_help, gpt_config,  # noqa: F401
                    read_toml, split_argv, validate, validate_tokenizer_keys)
from data.demo import ensure_demo_shards
from data.loader import TrainLoader, ValLoader
from data.shard import read_shard
from data.tokenizer import TokenizerDownloadError, get_tokenizer
from model import GPT
from runlog import RunLog, attention_metrics, duration, spectrum_metrics, spectrum_names


def load_run_config(argv: list[str]) -> tuple[Config, Path | None]:
    """The run's Config and the checkpoint to resume from, if any. --help prints this file's usage
    and every config key with the value this command line gives it, then exits."""
    flags, overrides = split_argv(argv)
    resume = flags.get("resume")
    if "config" in flags:
        cfg = build_config(read_toml(flags["config"]), flags["config"], overrides)
    elif resume and resume not in RESUME_MODES:
        cfg = build_config(read_checkpoint(Path(resume))["config"], f"{resume} (its saved config)", overrides)
    elif "help" in flags:
        cfg = build_config({}, "the defaults", overrides)
    else:
        raise ConfigError("command line: --config FILE is required (or --resume CHECKPOINT, which brings its config)")
    if "help" in flags:
        print(__doc__ + "\n" + config_help(cfg))
        sys.exit(0)
    if resume not in RESUME_MODES:
        return cfg, Path(resume) if resume else None
    found, skipped = newest_readable_checkpoint(Path(cfg.train.run_dir))
    if int(os.environ.get("RANK", 0)) == 0:
        for line in skipped:
            print(line, file=sys.stderr)
    if found is None and resume == "latest":
        raise ConfigError(f"--resume latest: no readable checkpoint (ckpt_*.pt) in train.run_dir = {cfg.train.run_dir}; "
                          "--resume auto starts the run when there is none (a metrics.jsonl left there is kept "
                          "aside, not overwritten)")
    return cfg, found


RESUME_MODES = ("auto", "latest")


# ----------------------------------------------------------------------------------------------
# Device and data


def setup_device(world_size: int, timeout_s: int) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls left under bf16 autocast
    if world_size > 1:
        # A rank that hangs (a dead node, a stuck collective) fails the job after timeout_s, not torch's 10-30 min.
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                store=restart_store(world_size, timeout), rank=int(os.environ["RANK"]),
                                world_size=world_size, device_id=device if device.type == "cuda" else None)
    return device


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


def load_tokenizer(cfg: Config):
    try:
        return get_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_file or None)
    except (ValueError, OSError, RuntimeError) as e:
        hint = ("; pass it with --data.tokenizer_file /path/to/r50k_base.tiktoken (or data.tokenizer_file in the config)"
                if isinstance(e, TokenizerDownloadError) else "")
        raise ConfigError(f"data.tokenizer = {cfg.data.tokenizer!r}, data.tokenizer_file = "
                          f"{cfg.data.tokenizer_file!r}: {e}{hint}") from None


def build_loaders(cfg: Config, rank: int, world_size: int, device: torch.device, vocab_size: int):
    d, t = cfg.data, cfg.train
    if d.demo:
        ensure_demo_shards(d.dir)
    try:
        train = TrainLoader(Path(d.dir) / d.train_files, t.micro_batch_size, d.seq_len, rank, world_size, t.seed, device)
        val = ValLoader(Path(d.dir) / d.val_files, d.val_tokens, t.micro_batch_size, d.seq_len, rank, world_size, device)
    except (OSError, ValueError) as e:
        hint = (" (FineWeb: python -m data.fineweb --train-shards 17; your own text: python -m data.prepare FILES "
                "--out DIR; no download: python train.py --config configs/demo.toml)"
                if isinstance(e, FileNotFoundError) else "")
        raise ConfigError(f"data.dir = {d.dir!r}: {e}{hint}") from None
    # An id past the padded vocabulary crashes mid-run (on a GPU: a device assert, every rank down);
    # one between the vocabulary and its padding trains on garbage. A memmap's max reads each shard once.
    for path, largest in [(f, int(read_shard(f).max(initial=0))) for f in train.files] + [(d.val_files, int(val.tokens.max()))]:
        if largest >= vocab_size:
            raise ConfigError(f"data: {path} holds token id {largest}, but data.tokenizer = {d.tokenizer!r} has "
                              f"{vocab_size} tokens (ids 0..{vocab_size - 1}); were the shards made with another tokenizer?")
    return train, val


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule

# optim.ns_dtype. Off the GPU, "auto" is fp32: CPUs without native bf16 run bf16 matmuls far
# slower than fp32, and fp32 gives a CPU run the same numbers on every CPU.
NS_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


def ns_dtype(name: str, device: torch.device) -> torch.dtype:
    if NS_DTYPES[name] is not None:
        return NS_DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_optimizer(cfg: Config, model: GPT) -> muon.Muon:
    """One muon.Muon: the hidden matrices (Muon, or AdamW for the baseline), then an AdamW group
    each for the embedding, the head and the gains (GPT.parameter_groups)."""
    o = cfg.optim
    groups = model.parameter_groups()

    def adamw(params, lr, weight_decay):
        return dict(params=params, use_muon=False, base_lr=lr, lr=lr, weight_decay=weight_decay,
                    betas=(o.adamw_beta1, o.adamw_beta2), eps=o.adamw_eps)
    head_blocks = model.head_blocks() if o.per_head else {}
    blocks = [head_blocks.get(name, (1, 1)) for name, _ in groups["matrices"]]
    matrices = (dict(params=groups["matrices"], use_muon=True, base_lr=o.lr, blocks=blocks) if o.optimizer == "muon"
                else adamw(groups["matrices"], o.lr, o.weight_decay))
    param_groups = [matrices, adamw(groups["embedding"], o.embed_lr, o.adamw_weight_decay),
                    adamw(groups["head"], o.head_lr, o.adamw_weight_decay),
                    adamw(groups["gains"], o.scalar_lr, o.adamw_weight_decay)]
    return muon.Muon([g for g in param_groups if g["params"]], lr=o.lr, weight_decay=o.weight_decay,
                     momentum=o.momentum, nesterov=o.nesterov, ns_steps=o.ns_steps, ns_coefficients=o.ns_coefficients,
                     lr_rule=o.lr_rule, ns_dtype=ns_dtype(o.ns_dtype, model.lm_head.weight.device),
                     normuon=o.normuon, normuon_beta2=o.normuon_beta2, normuon_eps=o.normuon_eps,
                     normuon_axis=o.normuon_axis, cautious_weight_decay=o.cautious_weight_decay,
                     compile=cfg.train.compile)


def lr_factor(step: int, s: ScheduleConfig) -> float:
    """The speedrun's trapezoid: linear warmup, constant, linear cooldown over the last cooldown_frac."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    cooldown_steps = round(s.cooldown_frac * s.steps)
    steps_left = s.steps - step  # this one included
    if steps_left > cooldown_steps:
        return 1.0
    return s.min_lr_frac + (1 - s.min_lr_frac) * steps_left / cooldown_steps


def set_schedule(optimizer: muon.Muon, cfg: Config, step: int) -> None:
    """Every group's lr for this step, and Muon's warming-up momentum."""
    s = cfg.schedule
    warmed = min(step / s.momentum_warmup_steps, 1.0) if s.momentum_warmup_steps else 1.0
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(step, s)
        if group["use_muon"]:
            group["momentum"] = s.momentum_start + (cfg.optim.momentum - s.momentum_start) * warmed


# ----------------------------------------------------------------------------------------------
# One training step, validation, completions


def autocast(cfg: Config, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16)


def train_step(model, raw_model: GPT, optimizer: muon.Muon, batches, cfg: Config, step: int, grad_accum: int,
               probe: bool, measure_grad_norm: bool):
    """One optimizer step over grad_accum micro-batches. Returns device tensors (no sync):
    mean loss, grad norm (or None), max logits (n_layer, n_head) over the step (or None), clipped heads (or None)."""
    device = raw_model.lm_head.weight.device
    set_schedule(optimizer, cfg, step)
    loss_sum, max_logits = torch.zeros((), device=device), None
    for micro_step in range(grad_accum):
        x, y = next(batches)
        # DDP all-reduces the gradients in the backward of the last micro-step only.
        last = micro_step == grad_accum - 1
        with nullcontext() if last or not isinstance(model, DDP) else model.no_sync():
            with autocast(cfg, device):
                out = model(x, y, probe=probe)
            loss, micro_max = out if probe else (out, None)
            (loss / grad_accum).backward()
        loss_sum += loss.detach()
        if probe:
            max_logits = micro_max if max_logits is None else torch.maximum(max_logits, micro_max)
    if probe and dist.is_initialized():
        dist.all_reduce(max_logits, op=dist.ReduceOp.MAX)  # every rank must clip the same heads
    if measure_grad_norm and dist.is_initialized():  # on logged steps: one small all-reduce
        check_gradients_match_across_ranks(raw_model)
    params = [p for p in raw_model.parameters() if p.grad is not None]
    grad_norm = None
    if cfg.optim.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    elif measure_grad_norm:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # check_finite=False: no device sync per step; train_loop checks the max logits every log interval.
    clipped = (muon.qk_clip_(raw_model.attention_heads(), max_logits, cfg.optim.muon_clip_tau,
                             alpha=cfg.optim.muon_clip_alpha, check_finite=False, compile=cfg.train.compile)
               if cfg.optim.muon_clip else None)
    return loss_sum / grad_accum, grad_norm, max_logits, clipped


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


@torch.no_grad()
def evaluate(model, val_loader: ValLoader, cfg: Config, device: torch.device) -> float:
    """Mean loss over the fixed val tokens, averaged over ranks."""
    model.eval()
    total = torch.zeros((), device=device)
    for x, y in val_loader:
        with autocast(cfg, device):
            total += model(x, y)
    model.train()
    if dist.is_initialized():
        dist.all_reduce(total)  # a sum: gloo has no AVG
        total /= dist.get_world_size()
    return total.item() / len(val_loader)


@torch.no_grad()
def complete_prompts(raw_model: GPT, tokenizer, cfg: Config, device: torch.device) -> list[tuple[str, str, str]]:
    """(prompt, mode, completion) for every prompt and mode, from the uncompiled model. With both
    modes, a prompt's greedy and sampled completions decode as one batch of two rows (half the time)."""
    modes = ["greedy", "sampled"] if cfg.log.sample_mode == "both" else [cfg.log.sample_mode]
    greedy = torch.tensor([mode == "greedy" for mode in modes], device=device)
    rows = []
    raw_model.eval()
    for prompt in cfg.log.prompts:
        idx = torch.tensor(tokenizer.encode_ordinary(prompt), dtype=torch.long, device=device)
        try:
            with autocast(cfg, device):
                out = raw_model.generate(idx.expand(len(modes), -1), cfg.log.max_new_tokens,
                                         temperature=cfg.log.temperature, top_k=cfg.log.top_k or None, greedy=greedy)
            completions = [tokenizer.decode(row[len(idx):].tolist()) for row in out]
        except ValueError as e:  # diverged weights: the loss checks stop the run at the next log line
            completions = [f"[no completion: {e}]"] * len(modes)
        rows.extend((prompt, mode, completion) for mode, completion in zip(modes, completions))
    raw_model.train()
    return rows


# ----------------------------------------------------------------------------------------------
# The run: config -> data -> model -> optimizer -> warm-up -> loop


@dataclass
class Run:
    """What the training loop works with, built once by start_run."""
    cfg: Config
    model: GPT                    # the weights: generation, MuonClip, checkpoints
    compiled: torch.nn.Module     # model under torch.compile (or model itself): evaluation
    train_model: torch.nn.Module  # compiled, DDP-wrapped under torchrun: the training steps
    optimizer: muon.Muon
    train_loader: TrainLoader
    val_loader: ValLoader
    tokenizer: object
    log: RunLog
    saved: Checkpoints
    signals: StopSignals
    device: torch.device
    world_size: int
    grad_accum: int
    flops_per_token: int
    step: int                     # optimizer steps done
    clock: "TrainClock"


def main(argv: list[str]) -> int:
    """Run train.py with these arguments; returns the exit code (0 done, 128 + N stopped by signal N)."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cfg, resume_path = load_run_config(argv)
    validate_tokenizer_keys(cfg)
    tokenizer = load_tokenizer(cfg)
    grad_accum = validate(cfg, world_size, tokenizer.n_vocab)
    checkpoint = read_checkpoint(resume_path) if resume_path else None
    if checkpoint and checkpoint["step"] >= cfg.schedule.steps:
        if rank == 0:
            print(f"{resume_path} is step {checkpoint['step']} of schedule.steps = {cfg.schedule.steps}: the run "
                  "has finished, nothing to do (raise schedule.steps to train on)")
        return 0
    # Every rank joins the group before rank 0's disk work, so a group torchrun restarts meets in time.
    device = setup_device(world_size, cfg.train.dist_timeout_s)
    run_dir_lock, refused, exit_code = None, False, 1
    try:
        # Rank 0 alone writes: it takes the run dir (lock, checks, clean-up) before any data or model is built.
        run_dir_lock = claim_run_dir(Path(cfg.train.run_dir), checkpoint["step"] if checkpoint else None,
                                     agree=world_size > 1) if rank == 0 else wait_for_run_dir(world_size)
        with StopSignals(announce=rank == 0) as signals:
            run = start_run(cfg, tokenizer, grad_accum, checkpoint, resume_path, device, rank, world_size, signals)
            try:
                exit_code = train_loop(run)
            finally:
                run.log.finish(exit_code)
        if dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing: a rank that tears down early can abort its peers
    except ConfigError:
        refused = True
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if run_dir_lock:
            release_run_dir(run_dir_lock, wrote_nothing=refused)
    return exit_code


def start_run(cfg, tokenizer, grad_accum, checkpoint, resume_path, device, rank, world_size, signals) -> Run:
    """Data, model, optimizer and log, with a checkpoint's state loaded; the compile warm-up done."""
    train_loader, val_loader = build_loaders(cfg, rank, world_size, device, tokenizer.n_vocab)
    torch.manual_seed(cfg.train.seed)
    model = GPT(gpt_config(cfg, tokenizer.n_vocab)).to(device)
    attention = model.choose_attention(torch.bfloat16 if cfg.train.bf16 else torch.float32)
    optimizer = build_optimizer(cfg, model)
    unknown = set(cfg.log.spectrum_matrices) - set(spectrum_names(model))
    if cfg.log.spectrum_every and unknown:
        raise ConfigError(f"log.spectrum_matrices: {sorted(unknown)} are not matrices of a block; "
                          f"valid names: {', '.join(spectrum_names(model))}")
    step, train_time = 0, 0.0
    if checkpoint:
        config_groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in optimizer.param_groups]
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            train_loader.load_state_dict(checkpoint["loader"])
        except (RuntimeError, ValueError, KeyError) as e:
            changed = [f"model.{key}: checkpoint {before!r}, config {after!r}" for key, (before, after)
                       in zip_flat(checkpoint["config"]["model"], asdict(cfg.model)) if before != after]
            what = "; ".join(changed) or str(e).strip().splitlines()[0]
            raise ConfigError(f"--resume {resume_path} does not fit this config's model, optimizer or data: {what}") from None
        for group, values in zip(optimizer.param_groups, config_groups):
            group.update(values)  # the config sets hyperparameters; the checkpoint brings the state
        set_rng_state(checkpoint["rng"], device)
        step, train_time = checkpoint["step"], checkpoint["train_time_s"]
    compiled = torch.compile(model) if cfg.train.compile else model
    train_model = data_parallel(compiled, optimizer, device) if world_size > 1 else compiled

    n_params = model.num_params(non_embedding=True)
    flops = model.flops_per_token(cfg.data.seq_len)
    run_config = {**asdict(cfg), "world_size": world_size, "grad_accum": grad_accum, "params": model.num_params(),
                  "params_non_embedding": n_params, "flops_per_token": flops, "sdpa_backend": attention,
                  "resumed_from": str(resume_path) if resume_path else ""}
    log = RunLog(cfg, rank == 0, run_config, checkpoint, continues=repeats_checkpoint_run(checkpoint, cfg))
    log.print(f"{cfg.model.preset}: {model.num_params() / 1e6:.2f}M parameters ({n_params / 1e6:.2f}M non-embedding), "
              f"{flops / 1e6:.0f} MFLOP/token | {device} x {world_size}, {grad_accum} micro-steps of "
              f"{cfg.train.micro_batch_size} x {cfg.data.seq_len} per step | attention: {attention} | {cfg.train.run_dir}")
    per_pass, reads = train_loader.tokens_per_pass(), cfg.schedule.steps * cfg.train.batch_tokens
    log.print(f"train data: {per_pass:,} tokens a pass over {len(train_loader.files)} shard file(s); "
              f"{cfg.schedule.steps} steps read {reads:,} tokens, {reads / per_pass:.2f} passes")
    if checkpoint:
        log.print(f"resumed from {resume_path} at step {step}")
        for key, (before, after) in zip_flat(checkpoint["config"], asdict(cfg)):
            if before != after:
                log.print(f"  config changed since the checkpoint: {key}: {before!r} -> {after!r}")
    run = Run(cfg, model, compiled, train_model, optimizer, train_loader, val_loader, tokenizer, log,
              Checkpoints(Path(cfg.train.run_dir), log.enabled), signals, device, world_size, grad_accum, flops,
              step, TrainClock(device, train_time))
    if cfg.train.compile_warmup_steps:
        seconds = warm_up(run)
        log.print(f"compile warm-up: {cfg.train.compile_warmup_steps} steps and a validation batch on random tokens "
                  f"in {seconds:.1f}s, then weights, optimizer state and RNG put back (not counted as training)")
    return run


def warm_up(run: Run) -> float:
    """Train train.compile_warmup_steps steps and evaluate one batch, all on random tokens, then put
    the weights, the optimizer state and the RNG back as they were: torch.compile builds its graphs
    (forward with and without the probe, backward, evaluation, Newton-Schulz) before the clock
    starts, as modded-nanogpt times its records. Returns the seconds it took."""
    cfg, model, device = run.cfg, run.model, run.device
    clock = TrainClock(device, 0.0)
    clock.start()
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": run.optimizer.state_dict(),
                           "rng": rng_state(device)})
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len)

    def random_batches():  # inputs and targets two tensors, as the loaders give: compile guards on aliasing
        while True:
            yield (torch.randint(model.config.vocab_size, shape, device=device, generator=generator),
                   torch.randint(model.config.vocab_size, shape, device=device, generator=generator))

    batches = random_batches()
    for i in range(cfg.train.compile_warmup_steps):
        # Without MuonClip only logged steps probe: alternate, so both forward graphs get built.
        train_step(run.train_model, model, run.optimizer, batches, cfg, run.step, run.grad_accum,
                   probe=cfg.optim.muon_clip or i % 2 == 1, measure_grad_norm=i % 2 == 1)
    evaluate(run.compiled, [next(batches)], cfg, device)
    model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"], device)
    clock.stop()
    return clock.total


def train_loop(run: Run) -> int:
    """Train from run.step to schedule.steps; returns the process exit code (0, or 128 + a stop signal's number).

    At a step that validates, samples and checkpoints, they happen in that order, so a checkpoint's
    step has been evaluated: a run resumed from it starts training at once."""
    cfg, log = run.cfg, run.log
    s, lg, t = cfg.schedule, cfg.log, cfg.train
    wall_start = time.perf_counter()
    resumed_at = run.step if run.step else None
    target_reached, stop_signal = False, None
    interval = Interval(run.step, run.clock.total)  # this log interval's values, on the device until it ends
    while True:
        step = run.step
        finished, stopping = step == s.steps, stop_signal is not None
        evaluated = step == resumed_at  # before its checkpoint was written
        if ((lg.val_every and step % lg.val_every == 0) or finished) and not evaluated:
            if validate_now(run, wall_start):
                finished = target_reached = True
        if ((lg.sample_every and step % lg.sample_every == 0 and step > 0) or finished) and not evaluated:
            run.clock.stop()
            log.completions_table(step, complete_prompts(run.model, run.tokenizer, cfg, run.device) if log.enabled else [])
        last = finished or stopping
        if (last or (t.checkpoint_every and step % t.checkpoint_every == 0 and step > 0)) and step != resumed_at:
            save_checkpoint(run)
        if last:
            return finish(run, stop_signal, target_reached, wall_start)

        run.clock.start()
        # One process stops at the step a signal arrives; ranks agree on it at the next log line.
        flush = (step + 1) % lg.every == 0 or step + 1 == s.steps or (run.world_size == 1 and run.signals.received is not None)
        # Without MuonClip the probe runs on logged steps only, which then report their own max logits.
        interval.add(*train_step(run.train_model, run.model, run.optimizer, run.train_loader, cfg, step, run.grad_accum,
                                 probe=cfg.optim.muon_clip or flush, measure_grad_norm=flush))
        run.step += 1
        if flush:
            run.clock.stop()
            if log_interval(run, interval):
                stop_signal = run.signals.received or signal.SIGTERM
            interval = Interval(run.step, run.clock.total)


def validate_now(run: Run, wall_start: float) -> bool:
    """Evaluate and log the val loss; True when it reaches train.target_val_loss."""
    cfg, t, step = run.cfg, run.cfg.train, run.step
    run.clock.stop()
    started = time.perf_counter()
    val_loss = evaluate(run.compiled, run.val_loader, cfg, run.device)
    if not math.isfinite(val_loss):  # the weights of this step diverged: nothing of them is saved
        raise run.saved.diverged(f"step {step}: val loss is {val_loss}", blame_unvouched=False)
    run.log.scalars(step, {"val/loss": val_loss})
    run.log.print(f"step {step:5d}/{cfg.schedule.steps} | val loss {val_loss:.4f} ({time.perf_counter() - started:.1f}s)")
    if not (t.target_val_loss and val_loss <= t.target_val_loss):
        return False
    run.log.print(f"target val loss {t.target_val_loss} reached at step {step}: {run.clock.total:.1f}s of training "
                  f"(validation, completions and checkpoints excluded; compilation "
                  f"{'warmed up before, excluded' if t.compile_warmup_steps else 'included'}), "
                  f"{time.perf_counter() - wall_start:.1f}s wall")
    run.log.summary({"target/step": step, "target/train_time_s": run.clock.total})
    return True


def save_checkpoint(run: Run) -> None:
    run.clock.stop()
    optimizer_state = run.optimizer.state_dict()  # every rank: a collective under Muon's owner sharding
    if run.log.enabled:
        run.saved.save(run.step, {
            "step": run.step, "model": run.model.state_dict(), "optimizer": optimizer_state,
            "loader": run.train_loader.state_dict(), "rng": rng_state(run.device), "config": asdict(run.cfg),
            "train_time_s": run.clock.total, **run.log.state_dict()})


def finish(run: Run, stop_signal: int | None, target_reached: bool, wall_start: float) -> int:
    """The last line of a run, and its exit code."""
    log, s, t = run.log, run.cfg.schedule, run.cfg.train
    if stop_signal is not None:
        name = signal.Signals(stop_signal).name
        if log.enabled and run.saved.unvouched:
            log.print(f"stopped by {name} at step {run.step}, checkpoint saved; "
                      f"resume with: {resume_command(run.saved.unvouched[1], run.world_size)}")
        elif log.enabled:  # stopped before a step: the checkpoint it resumed from is the latest
            log.print(f"stopped by {name} at step {run.step}, before training")
        return 128 + stop_signal
    if t.target_val_loss and not target_reached:
        log.print(f"target val loss {t.target_val_loss} not reached in {s.steps} steps")
    log.print(f"done: step {run.step}, {run.clock.total:.1f}s of training, {time.perf_counter() - wall_start:.1f}s wall")
    return 0


class Interval:
    """One log interval's training losses, max logits and clipped heads, kept on the device
    (no sync per step) until log_interval reads them."""

    def __init__(self, step: int, train_time: float):
        self.start_step, self.start_time = step, train_time
        self.losses, self.max_logits, self.clipped, self.grad_norm = [], None, None, None

    def add(self, loss, grad_norm, max_logits, clipped) -> None:
        self.losses.append(loss)
        self.grad_norm = grad_norm
        if max_logits is not None:
            self.max_logits = max_logits if self.max_logits is None else torch.maximum(self.max_logits, max_logits)
        if clipped is not None:
            self.clipped = clipped if self.clipped is None else self.clipped + clipped


def log_interval(run: Run, interval: Interval) -> bool:
    """Check and log the interval that ended at run.step; True when some rank was asked to stop."""
    cfg, log, step = run.cfg, run.log, run.step
    lg = cfg.log
    # The interval's losses and this rank's stop request, in one transfer (and one all-reduce).
    values = torch.cat([torch.stack(interval.losses),
                        torch.tensor([float(run.signals.received or 0)], device=run.device)])
    if run.world_size > 1:  # so every rank sees the same losses and stops at the same step
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values[:-1] /= run.world_size
    *losses, signal_sum = values.tolist()  # the one wait for the device per log interval
    grad_norm = interval.grad_norm.item()
    first_bad, fault = first_non_finite(losses, grad_norm, interval.max_logits, step)
    if first_bad != 0:  # the interval's first loss came from the saved weights
        run.saved.vouch()
    if fault:
        raise run.saved.diverged(fault)
    steps_done, seconds = step - interval.start_step, run.clock.total - interval.start_time
    tokens_per_s = steps_done * cfg.train.batch_tokens / seconds
    mfu = run.flops_per_token * tokens_per_s / (lg.peak_flops * run.world_size)
    lr = run.optimizer.param_groups[0]["lr"]  # the hidden matrices'
    row = {"train/loss": sum(losses) / len(losses), "train/lr": lr, "train/grad_norm": grad_norm,
           "train/tokens_per_s": tokens_per_s, "train/mfu": mfu, "train/time_s": run.clock.total,
           **attention_metrics(interval.max_logits, interval.clipped)}
    if lg.spectrum_every and step % lg.spectrum_every == 0 and log.enabled:
        row.update(spectrum_metrics(run.model, run.optimizer, lg.spectrum_matrices))
    log.scalars(step, row)
    log.print(f"step {step:5d}/{cfg.schedule.steps} | loss {row['train/loss']:.4f} | lr {lr:.2e} | "
              f"{tokens_per_s / 1e3:.1f}K tok/s | MFU {100 * mfu:.1f}% | max logit {row['attn/max_logit']:.1f}"
              + (f" ({row['attn/clipped_heads']} clipped)" if interval.clipped is not None else "")
              + f" | ETA {duration((cfg.schedule.steps - step) * seconds / steps_done)}")
    if lg.heatmap_every and step % lg.heatmap_every == 0:
        log.heatmap(step, interval.max_logits)
    return bool(signal_sum)


# What a resumed run may change and still repeat the original run's numbers exactly.
REPEATABLE_CHANGES = ("log.", "train.checkpoint_every", "train.target_val_loss", "train.compile_warmup_steps",
                      "train.dist_timeout_s")


def data_parallel(compiled: torch.nn.Module, optimizer: muon.Muon, device: torch.device) -> DDP:
    """DDP for the AdamW parameters only: the Muon matrices' gradients stay each rank's own, for
    Muon's reduce-scatter to their owners (muon.Muon), instead of an all-reduce of twice the bytes."""
    muon_params = {id(p) for group in optimizer.param_groups if group["use_muon"] for p in group["params"]}
    ignored = [name for name, p in compiled.named_parameters() if id(p) in muon_params]
    DDP._set_params_and_buffers_to_ignore_for_model(compiled, ignored)
    return DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None)


def repeats_checkpoint_run(checkpoint: dict | None, cfg: Config) -> bool:
    """Whether a run resumed from checkpoint repeats, bit for bit, what its run logged after it."""
    if checkpoint is None or checkpoint["config"]["train"]["run_dir"] != cfg.train.run_dir:
        return False
    changed = [key for key, (a, b) in zip_flat(checkpoint["config"], asdict(cfg)) if a != b]
    return all(key.startswith(REPEATABLE_CHANGES) for key in changed)


def zip_flat(a: dict, b: dict, prefix: str = ""):
    """(dotted key, (a's value, b's value)) for every key of two nested config dicts."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            yield from zip_flat(x, y, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", (x, y)


def resume_command(checkpoint: Path, world_size: int) -> str:
    """The command line that resumes this run from checkpoint (which holds its config)."""
    if world_size == 1:
        return f"python train.py --resume {shlex.quote(str(checkpoint))}"
    # A worker cannot see torchrun's own flags (--nnodes, rendezvous): the user reuses them.
    return f"the same torchrun launch, with train.py --resume {shlex.quote(str(checkpoint))} (or --resume auto)"


# ----------------------------------------------------------------------------------------------
# What the log lines report


def first_non_finite(losses: list[float], grad_norm: float, max_logits: torch.Tensor | None,
                     step: int) -> tuple[int | None, str]:
    """(index into losses of the first step whose weights gave a non-finite value, or None; what it was)
    for an interval of training steps ending at step. The grad norm is the last step's; the max
    logits are the interval's maximum, so they do not date the fault."""
    first_step = step - len(losses) + 1
    for i, value in enumerate(losses):
        if not math.isfinite(value):
            return i, f"step {first_step + i}: training loss is {value}"
    if not math.isfinite(grad_norm):  # a finite loss can hide weights that have already broken
        return len(losses) - 1, f"step {step}: gradient norm is {grad_norm} (training loss {losses[-1]})"
    if max_logits is not None and not max_logits.isfinite().all():
        try:
            muon.raise_if_not_finite(max_logits)
        except ValueError as e:
            return None, f"steps {first_step}..{step}: {e}"
    return None, ""


class TrainClock:
    """Seconds spent training: validation, completions and checkpoints are left out, as the speedrun times it."""

    def __init__(self, device: torch.device, total: float):
        self.device, self.total, self.started = device, total, None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        if self.started is None:
            self._sync()
            self.started = time.perf_counter()

    def stop(self):
        if self.started is not None:
            self._sync()
            self.total += time.perf_counter() - self.started
            self.started = None


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ConfigError, RunError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
