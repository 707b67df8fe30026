"""Train a GPT with Muon (+ AdamW for embeddings, head and gains) and MuonClip, on CPU, one GPU or many.

    python train.py --config configs/demo.toml --resume auto         # small model, CPU, minutes, no download
    python train.py --config configs/gpu.toml --resume auto          # 124M MLA on one GPU
    torchrun --standalone --nproc_per_node=8 train.py --config configs/speedrun.toml --resume auto
    # several nodes: on every node, HOST the first node's address, train.run_dir on a shared filesystem
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py --config configs/speedrun.toml
    python train.py --config configs/gpu.toml --optim.lr=0.03 --schedule.steps 2000   # any key, typed

--resume auto continues from the newest good checkpoint in train.run_dir, or starts the run if there
is none, and exits at once if the run has finished: a job requeued or restarted with the same
command (SLURM --requeue, torchrun --max-restarts) picks up where it stopped. --resume latest
insists on a checkpoint; --resume PATH takes one and its saved config. A resumed run repeats the
uninterrupted run's losses bit for bit, and its record (metrics.jsonl, W&B) holds every value once.
Everything a run writes goes to train.run_dir, from rank 0 only (checkpoint.py, runlog.py). Under
torchrun every rank runs this file; gradient accumulation keeps train.batch_tokens per optimizer
step whatever the number of ranks.

Reading order: main (command line, device, run dir); run (build, then the loop: validate, score
HellaSwag, complete prompts, checkpoint, train a step, log); then what the loop calls.
"""

import copy
import datetime
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
import muon
from checkpoint import (RESUME_MODES, Checkpoints, RunError, StopSignals, check_gradients_match_across_ranks,
                        claimed_run_dir, continues_run, read_checkpoint, resolve_resume, restart_store,
                        resume_command, rng_state, seed_rngs, set_rng_state)
from config import (Config, ConfigError, ScheduleConfig, build_config, config_changes, config_help, gpt_config,
                    muon_options, read_toml, split_argv, validate, validate_tokenizer_keys)
from data.demo import ensure_demo_shards
from data.loader import TrainLoader, ValLoader, largest_token_ids
from data.tokenizer import TokenizerDownloadError, get_tokenizer
from model import GPT
from runlog import RunLog, TrainClock, attention_metrics, duration, spectrum_metrics, spectrum_names
from sample import complete


def main(argv: list[str]) -> int:
    """Train with these command-line arguments; returns the exit code (0 done, 128 + N stopped by signal N)."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cfg, resume_path = load_run_config(argv)
    tokenizer = load_tokenizer(cfg)
    grad_accum = validate(cfg, world_size, tokenizer.n_vocab)
    resumed = read_checkpoint(resume_path) if resume_path else None
    if resumed and resumed["step"] >= cfg.schedule.steps:
        if rank == 0:
            print(f"{resume_path} is step {resumed['step']} of schedule.steps = {cfg.schedule.steps}: the run "
                  "has finished, nothing to do (raise schedule.steps to train on)")
        return 0
    # Every rank joins the group before rank 0's disk work, so a group torchrun restarts meets in time.
    device = setup_device(world_size, cfg.train.dist_timeout_s)
    try:
        with claimed_run_dir(Path(cfg.train.run_dir), resumed["step"] if resumed else None, rank, world_size), \
                StopSignals(announce=rank == 0) as signals:
            exit_code = run(cfg, tokenizer, grad_accum, resumed, resume_path, device, rank, world_size, signals)
        if dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing: a rank that tears down early can abort its peers
        return exit_code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(cfg: Config, tokenizer, grad_accum: int, resumed: dict | None, resume_path: Path | None,
        device: torch.device, rank: int, world_size: int, signals: StopSignals) -> int:
    """Build the run (data, model, optimizer, log, warm-up), then train it; returns the exit code."""
    train_loader, val_loader = build_loaders(cfg, rank, world_size, device, tokenizer.n_vocab)
    seed_rngs(cfg.train.seed)
    model = GPT(gpt_config(cfg, tokenizer.n_vocab)).to(device)  # the weights: sampling, MuonClip, checkpoints
    attention = model.choose_attention(torch.bfloat16 if cfg.train.bf16 else torch.float32)
    optimizer = build_optimizer(cfg, model, device)
    unknown = set(cfg.log.spectrum_matrices) - set(spectrum_names(model))
    if cfg.log.spectrum_every and unknown:
        raise ConfigError(f"log.spectrum_matrices: {sorted(unknown)} are not matrices of a block; "
                          f"valid names: {', '.join(spectrum_names(model))}")
    hellaswag_items = load_hellaswag(cfg) if cfg.log.hellaswag_every else []
    changes = config_changes(resumed["config"], asdict(cfg)) if resumed else []
    step, clock = 0, TrainClock(device)
    if resumed:
        restore(resumed, resume_path, changes, cfg, model, optimizer, train_loader, device)
        step, clock.total = resumed["step"], resumed["train_time_s"]
    compiled = torch.compile(model) if cfg.train.compile else model  # evaluation
    train_model = data_parallel(compiled, optimizer, device) if world_size > 1 else compiled  # training steps
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    run_config = {**asdict(cfg), "world_size": world_size, "grad_accum": grad_accum, "params": model.num_params(),
                  "params_non_embedding": model.num_params(non_embedding=True), "flops_per_token": flops_per_token,
                  "sdpa_backend": attention, "resumed_from": str(resume_path) if resume_path else ""}
    log = RunLog(cfg, rank == 0, run_config, resumed, continues=resumed is not None and continues_run(changes))
    exit_code = 1
    try:
        log.print(f"{cfg.model.preset}: {model.num_params() / 1e6:.2f}M parameters "
                  f"({model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding), {flops_per_token / 1e6:.0f} "
                  f"MFLOP/token | {device} x {world_size}, {grad_accum} micro-steps of {cfg.train.micro_batch_size} "
                  f"x {cfg.data.seq_len} per step | attention: {attention} | {cfg.train.run_dir}")
        per_pass, reads = train_loader.tokens_per_pass(), cfg.schedule.steps * cfg.train.batch_tokens
        log.print(f"train data: {per_pass:,} tokens a pass over {len(train_loader.files)} shard file(s); "
                  f"{cfg.schedule.steps} steps read {reads:,} tokens, {reads / per_pass:.2f} passes")
        if resumed:
            log.print(f"resumed from {resume_path} at step {step}")
            for key, before, after in changes:
                log.print(f"  config changed since the checkpoint: {key}: {before!r} -> {after!r}")
        if cfg.train.compile_warmup_steps:
            seconds = warm_up(cfg, model, compiled, train_model, optimizer, grad_accum, step, device)
            log.print(f"compile warm-up: {cfg.train.compile_warmup_steps} steps and a validation batch on random "
                      f"tokens in {seconds:.1f}s, then weights, optimizer state and RNG put back (not counted as training)")
        checkpoints = Checkpoints(Path(cfg.train.run_dir), log.enabled)

        # The loop. At a step, in this order: validate, score HellaSwag, complete the prompts, write the
        # checkpoint (so every value of a step is logged before its checkpoint, and a run resumed from
        # it starts with training), then train one step; every log.every steps, check and log the interval.
        steps, target = cfg.schedule.steps, cfg.train.target_val_loss
        resumed_at, stop_signal, target_reached = step if resumed else None, None, False
        interval, wall_start = Interval(step, clock.total), time.perf_counter()
        while True:
            at_end, stopping = step == steps, stop_signal is not None
            before_its_checkpoint = step == resumed_at  # the run that wrote the checkpoint did this step's part
            if not before_its_checkpoint and (at_end or due(step, cfg.log.val_every)):
                clock.stop()
                started = time.perf_counter()
                val_loss = evaluate(compiled, val_loader, cfg, device)
                if not math.isfinite(val_loss):  # the weights of this step diverged: nothing of them is saved
                    raise checkpoints.diverged(f"step {step}: val loss is {val_loss}", newest_is_to_blame=False)
                log.scalars(step, {"val/loss": val_loss})
                log.print(f"step {step:5d}/{steps} | val loss {val_loss:.4f} ({time.perf_counter() - started:.1f}s)")
                if target and val_loss <= target:
                    at_end = target_reached = True
                    log.print(f"target val loss {target} reached at step {step}: {clock.total:.1f}s of training "
                              "(validation, completions and checkpoints excluded; compilation "
                              f"{'warmed up before, excluded' if cfg.train.compile_warmup_steps else 'included'}), "
                              f"{time.perf_counter() - wall_start:.1f}s wall")
                    log.summary({"target/step": step, "target/train_time_s": clock.total})
            if not before_its_checkpoint and hellaswag_items and (at_end or step and due(step, cfg.log.hellaswag_every)):
                clock.stop()
                started = time.perf_counter()
                acc, acc_norm, total = hellaswag.score(model, tokenizer, hellaswag_items, bf16=cfg.train.bf16)
                log.scalars(step, {"eval/hellaswag_acc": acc, "eval/hellaswag_acc_norm": acc_norm})
                log.print(f"step {step:5d}/{steps} | hellaswag acc {acc:.4f}, acc_norm {acc_norm:.4f} over {total:,} "
                          f"items ({time.perf_counter() - started:.1f}s)")
            if not before_its_checkpoint and (at_end or step and due(step, cfg.log.sample_every)):
                clock.stop()
                log.completions_table(step, complete_prompts(model, tokenizer, cfg) if log.enabled else [])
            if not before_its_checkpoint and (at_end or stopping or step and due(step, cfg.train.checkpoint_every)):
                clock.stop()
                optimizer_state = optimizer.state_dict()  # every rank: a collective under Muon's owner sharding
                if log.enabled:
                    checkpoints.save(step, {"step": step, "model": model.state_dict(), "optimizer": optimizer_state,
                                            "loader": train_loader.state_dict(), "rng": rng_state(device),
                                            "config": asdict(cfg), "train_time_s": clock.total, **log.state_dict()})
            if at_end or stopping:
                break

            clock.start()
            # One process stops at the step a signal arrives; several ranks agree on it at the next log line.
            ends_interval = (due(step + 1, cfg.log.every) or step + 1 == steps
                             or (world_size == 1 and signals.received is not None))
            # Without MuonClip the probe runs on the steps that end an interval, which report their max logits.
            interval.add(*train_step(train_model, model, optimizer, train_loader, cfg, step, grad_accum,
                                     probe=cfg.optim.muon_clip or ends_interval, measure_grad_norm=ends_interval))
            step += 1
            if not ends_interval:
                continue

            clock.stop()
            losses, grad_norm, stop_requested = interval.read(signals, world_size)
            first_bad, fault = first_non_finite(losses, grad_norm, interval.max_logits, step)
            if first_bad is None or first_bad > 0:  # the interval's first loss came from the newest checkpoint
                checkpoints.verify()
            if fault:
                raise checkpoints.diverged(fault)
            steps_done, seconds = step - interval.start_step, clock.total - interval.start_time
            tokens_per_s = steps_done * cfg.train.batch_tokens / seconds
            mfu = flops_per_token * tokens_per_s / (cfg.log.peak_flops * world_size)
            lr = optimizer.param_groups[0]["lr"]  # the hidden matrices'
            row = {"train/loss": sum(losses) / len(losses), "train/lr": lr, "train/grad_norm": grad_norm,
                   "train/tokens_per_s": tokens_per_s, "train/mfu": mfu, "train/time_s": clock.total,
                   **attention_metrics(interval.max_logits, interval.clipped)}
            if due(step, cfg.log.spectrum_every) and log.enabled:
                row.update(spectrum_metrics(model, optimizer, cfg.log.spectrum_matrices))
            log.scalars(step, row)
            log.print(f"step {step:5d}/{steps} | loss {row['train/loss']:.4f} | lr {lr:.2e} | "
                      f"{tokens_per_s / 1e3:.1f}K tok/s | MFU {100 * mfu:.1f}% | max logit {row['attn/max_logit']:.1f}"
                      + (f" ({row['attn/clipped_heads']} clipped)" if interval.clipped is not None else "")
                      + f" | ETA {duration((steps - step) * seconds / steps_done)}")
            if due(step, cfg.log.heatmap_every):
                log.heatmap(step, interval.max_logits)
            if stop_requested:
                stop_signal = signals.received or signal.SIGTERM
            interval = Interval(step, clock.total)

        exit_code = 0
        if stop_signal is not None:
            exit_code = 128 + stop_signal
            name = signal.Signals(stop_signal).name
            if log.enabled and checkpoints.unverified:
                log.print(f"stopped by {name} at step {step}, checkpoint saved; "
                          f"resume with: {resume_command(checkpoints.unverified[1], world_size)}")
            elif log.enabled:  # stopped before a step: the checkpoint it resumed from is the latest
                log.print(f"stopped by {name} at step {step}, before training")
        elif target and not target_reached:
            log.print(f"target val loss {target} not reached in {steps} steps")
        if exit_code == 0:
            log.print(f"done: step {step}, {clock.total:.1f}s of training, {time.perf_counter() - wall_start:.1f}s wall")
        return exit_code
    finally:
        log.finish(exit_code)


# ----------------------------------------------------------------------------------------------
# Command line, device, data


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
    return cfg, resolve_resume(resume, Path(cfg.train.run_dir), announce=int(os.environ.get("RANK", 0)) == 0)


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


def load_tokenizer(cfg: Config):
    validate_tokenizer_keys(cfg)  # a demo run with gpt2 is a config error, not a failed download
    try:
        return get_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_file or None)
    except (ValueError, OSError, RuntimeError) as e:
        hint = ("; pass it with --data.tokenizer_file /path/to/r50k_base.tiktoken (or data.tokenizer_file in the config)"
                if isinstance(e, TokenizerDownloadError) else "")
        raise ConfigError(f"data.tokenizer = {cfg.data.tokenizer!r}, data.tokenizer_file = "
                          f"{cfg.data.tokenizer_file!r}: {e}{hint}") from None


def load_hellaswag(cfg: Config) -> list[hellaswag.Item]:
    """The items log.hellaswag_every scores, read (or fetched) before any training."""
    lg = cfg.log
    try:
        items = hellaswag.read_items(Path(lg.hellaswag_file)) if lg.hellaswag_file else hellaswag.validation_items()
    except OSError as e:
        raise ConfigError(f"log.hellaswag_file = {lg.hellaswag_file!r}: {e.strerror or e}") from None
    except ConfigError as e:
        raise ConfigError(f"log.hellaswag_every = {lg.hellaswag_every}: {e} (or --log.hellaswag_every 0 to train "
                          "without it)") from None
    return items[:lg.hellaswag_items] if lg.hellaswag_items else items


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
    for path, largest in largest_token_ids(train, val):
        if largest >= vocab_size:
            raise ConfigError(f"data: {path} holds token id {largest}, but data.tokenizer = {d.tokenizer!r} has "
                              f"{vocab_size} tokens (ids 0..{vocab_size - 1}); were the shards made with another tokenizer?")
    return train, val


# ----------------------------------------------------------------------------------------------
# Model, optimizer, schedule


def build_optimizer(cfg: Config, model: GPT, device: torch.device) -> muon.Muon:
    """One muon.Muon over muon.param_groups: the hidden matrices (Muon, or AdamW for the baseline),
    then an AdamW group each for the embeddings, the head and the scalars, each with its lr."""
    o = cfg.optim
    adamw = dict(use_muon=False, weight_decay=o.adamw_weight_decay)
    head_blocks = model.head_blocks() if o.per_head else {}
    groups = muon.param_groups(model, matrices=dict(base_lr=o.lr, use_muon=o.optimizer == "muon"),
                               embeddings=dict(adamw, base_lr=o.embed_lr), head=dict(adamw, base_lr=o.head_lr),
                               scalars=dict(adamw, base_lr=o.scalar_lr))
    for group in groups:
        group["lr"] = group["base_lr"]
        if group["use_muon"]:
            group["blocks"] = [head_blocks.get(name, (1, 1)) for name, _ in group["params"]]
    return muon.Muon(groups, **muon_options(cfg, device))


def lr_factor(step: int, s: ScheduleConfig) -> float:
    """The trapezoid: linear warmup, constant, linear cooldown over the last cooldown_frac down to
    min_lr_frac. Where warmup and cooldown overlap (a short run), the lower of the two lines."""
    warmup = (step + 1) / s.warmup_steps if step < s.warmup_steps else 1.0
    cooldown_steps = round(s.cooldown_frac * s.steps)
    steps_left = s.steps - step  # this one included
    if steps_left > cooldown_steps:
        return warmup
    return min(warmup, s.min_lr_frac + (1 - s.min_lr_frac) * steps_left / cooldown_steps)


def muon_momentum(step: int, cfg: Config) -> float:
    """Linear from schedule.momentum_start up to optim.momentum over the momentum warmup; with
    schedule.momentum_cooldown, also linear from optim.momentum down to it over the lr cooldown
    (nanochat's 0.85 -> 0.97 -> 0.90). Where the two overlap (a short run), the lower of the two:
    the momentum rises, then falls, without a jump."""
    s, peak = cfg.schedule, cfg.optim.momentum
    warmed = min(step / s.momentum_warmup_steps, 1.0) if s.momentum_warmup_steps else 1.0
    momentum = s.momentum_start + (peak - s.momentum_start) * warmed
    cooldown_steps = round(s.cooldown_frac * s.steps)
    cooled = (step - (s.steps - cooldown_steps)) / cooldown_steps if cooldown_steps else 0.0
    if s.momentum_cooldown >= 0 and cooled > 0:
        momentum = min(momentum, peak + (s.momentum_cooldown - peak) * cooled)
    return momentum


def set_schedule(optimizer: muon.Muon, cfg: Config, step: int) -> None:
    """Every group's lr for this step; Muon's momentum, and its weight decay on a cosine to 0 with
    schedule.weight_decay_cosine."""
    s = cfg.schedule
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(step, s)
        if group["use_muon"]:
            group["momentum"] = muon_momentum(step, cfg)
            if s.weight_decay_cosine:
                group["weight_decay"] = cfg.optim.weight_decay * 0.5 * (1 + math.cos(math.pi * step / s.steps))


def restore(checkpoint: dict, path: Path, changes: list, cfg: Config, model: GPT, optimizer: muon.Muon,
            train_loader: TrainLoader, device: torch.device) -> None:
    """The checkpoint's weights, optimizer state, data position and RNG, under this config's hyperparameters."""
    hyperparameters = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in optimizer.param_groups]
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        train_loader.load_state_dict(checkpoint["loader"])
    except (RuntimeError, ValueError, KeyError) as e:
        what = "; ".join(f"{key}: checkpoint {before!r}, config {after!r}" for key, before, after in changes
                         if key.startswith("model.")) or str(e).strip().splitlines()[0]
        raise ConfigError(f"--resume {path} does not fit this config's model, optimizer or data: {what}") from None
    for group, values in zip(optimizer.param_groups, hyperparameters):
        group.update(values)  # the config sets hyperparameters; the checkpoint brings the state
    set_rng_state(checkpoint["rng"], device)


def data_parallel(compiled: torch.nn.Module, optimizer: muon.Muon, device: torch.device) -> DDP:
    """DDP for the AdamW parameters only: the Muon matrices' gradients stay each rank's own, for
    Muon's reduce-scatter to their owners (muon.Muon), instead of an all-reduce of twice the bytes."""
    muon_params = {id(p) for group in optimizer.param_groups if group["use_muon"] for p in group["params"]}
    ignored = [name for name, p in compiled.named_parameters() if id(p) in muon_params]
    DDP._set_params_and_buffers_to_ignore_for_model(compiled, ignored)
    return DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------------
# A training step, evaluation, prompts


def autocast(cfg: Config, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16)


def train_step(model, raw_model: GPT, optimizer: muon.Muon, batches, cfg: Config, step: int, grad_accum: int,
               probe: bool, measure_grad_norm: bool):
    """One optimizer step over grad_accum micro-batches, then MuonClip. Returns device tensors (no sync):
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
    # check_finite=False: no device sync per step; the loop checks the max logits every log interval.
    clipped = (muon.qk_clip_(raw_model.attention_heads(), max_logits, cfg.optim.muon_clip_tau,
                             alpha=cfg.optim.muon_clip_alpha, check_finite=False, compile=cfg.train.compile)
               if cfg.optim.muon_clip else None)
    return loss_sum / grad_accum, grad_norm, max_logits, clipped


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
def complete_prompts(model: GPT, tokenizer, cfg: Config) -> list[tuple[str, str, str]]:
    """(prompt, mode, completion) for every prompt of log.prompts and mode, from the uncompiled model;
    a prompt's greedy and sampled completions decode as one batch."""
    lg = cfg.log
    modes = ["greedy", "sampled"] if lg.sample_mode == "both" else [lg.sample_mode]
    rows = []
    model.eval()
    for prompt in lg.prompts:
        try:
            completions = complete(model, tokenizer, prompt, [mode == "greedy" for mode in modes], lg.max_new_tokens,
                                   lg.temperature, lg.top_k, cfg.train.bf16)
        except ValueError as e:  # diverged weights: the loss checks stop the run at the next log line
            completions = [f"[no completion: {e}]"] * len(modes)
        rows.extend((prompt, mode, completion) for mode, completion in zip(modes, completions))
    model.train()
    return rows


def warm_up(cfg: Config, model: GPT, compiled, train_model, optimizer: muon.Muon, grad_accum: int, step: int,
            device: torch.device) -> float:
    """Train train.compile_warmup_steps steps and evaluate one batch, all on random tokens, then put
    the weights, the optimizer state and the RNG back as they were: torch.compile builds its graphs
    (forward with and without the probe, backward, evaluation, Newton-Schulz) before the clock
    starts, as modded-nanogpt times its records. Returns the seconds it took."""
    clock = TrainClock(device)
    clock.start()
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(device)})
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len)

    def random_batches():  # inputs and targets two tensors, as the loaders give: compile guards on aliasing
        while True:
            yield (torch.randint(model.config.vocab_size, shape, device=device, generator=generator),
                   torch.randint(model.config.vocab_size, shape, device=device, generator=generator))

    batches = random_batches()
    for i in range(cfg.train.compile_warmup_steps):
        # Without MuonClip only the steps that end a log interval probe: alternate, so both forward graphs get built.
        train_step(train_model, model, optimizer, batches, cfg, step, grad_accum,
                   probe=cfg.optim.muon_clip or i % 2 == 1, measure_grad_norm=i % 2 == 1)
    evaluate(compiled, [next(batches)], cfg, device)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"], device)
    clock.stop()
    return clock.total


# ----------------------------------------------------------------------------------------------
# What the log lines check


def due(step: int, every: int) -> bool:
    """Whether something done every `every` steps (0: never) falls on this step."""
    return every > 0 and step % every == 0


class Interval:
    """One log interval's training losses, max logits and clipped heads, kept on the device
    (no sync per step) until the loop reads them at the interval's end."""

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

    def read(self, signals: StopSignals, world_size: int) -> tuple[list[float], float, bool]:
        """(the losses averaged over ranks, the last step's grad norm, whether any rank was asked to
        stop): the one wait for the device per interval, one all-reduce, so every rank sees the same
        losses and stops at the same step."""
        device = self.losses[0].device
        values = torch.cat([torch.stack(self.losses), torch.tensor([float(signals.received or 0)], device=device),
                            self.grad_norm.reshape(1).float()])
        if world_size > 1:
            shared = values[:-1]  # the grad norm stays this rank's own: Muon's gradients are not averaged yet
            dist.all_reduce(shared, op=dist.ReduceOp.SUM)
            shared[:-1] /= world_size
        *losses, stop_requests, grad_norm = values.tolist()
        return losses, grad_norm, bool(stop_requests)


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


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ConfigError, RunError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
