"""Train a GPT with Muon (+ AdamW for embeddings, head and gains) and MuonClip, on CPU, one GPU or many.

    python train.py --config configs/demo.toml                       # small model, CPU, minutes, no download
    python train.py --config configs/gpu.toml                        # 124M MLA on one GPU
    torchrun --standalone --nproc_per_node=8 train.py --config configs/speedrun.toml   # to val loss 3.28
    # several nodes: run this on every node, HOST being the first node's address
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py --config configs/speedrun.toml

Any config key can be set on the command line, after or instead of the TOML value:

    python train.py --config configs/gpu.toml --optim.lr=0.03 --schedule.steps 2000 --train.compile=false
    python train.py --config configs/gpu.toml --log.prompts '["Once upon a time", "The capital of France is"]'

Values are parsed to the key's type (bool: true/false, lists as TOML arrays); an unknown key or a
wrong type stops the run before any work, naming the key and listing the valid ones.

Resume (the same loss curve as an uninterrupted run):

    python train.py --config configs/gpu.toml --resume latest        # newest checkpoint in train.run_dir
    python train.py --resume runs/gpu/ckpt_001000.pt                 # config saved in the checkpoint
    python train.py --resume runs/gpu/ckpt_001000.pt --schedule.steps 4000   # ... with a change

Everything a run writes goes to train.run_dir: ckpt_NNNNNN.pt (model, optimizer, step, loader
position, RNG states, config), metrics.jsonl (every logged scalar, one JSON object per line; after
a resume, keep the last row of a step) and wandb/ (log.wandb = "auto": online when logged in, else
offline; "disabled" turns it off; W&B failures never stop training). Only rank 0 prints and
writes. Under torchrun every rank runs this file; gradient accumulation keeps train.batch_tokens
per optimizer step whatever the number of ranks.
"""

import copy
import dataclasses
import datetime
import fcntl
import socket
import inspect
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import threading
import time
import tomllib
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import muon
from data.demo import ensure_demo_shards
from data.loader import TrainLoader, ValLoader
from data.shard import read_shard, write_atomically
from data.tokenizer import TOKENIZERS, TokenizerDownloadError, get_tokenizer
from model import CONFIGS, GPT, GPTConfig
from runlog import RunLog

# ----------------------------------------------------------------------------------------------
# Config: typed sections, read from TOML, then command-line overrides. The defaults are configs/gpu.toml.

# [model]: a named model.CONFIGS entry, then any GPTConfig field to change in it. Built from
# GPTConfig itself so the two never drift; None means "the preset's value". vocab_size is not
# a key: it comes from the tokenizer.
ModelConfig = dataclasses.make_dataclass("ModelConfig", [("preset", str, field(default="gpt124m-mla"))] + [
    (f.name, f.type, field(default=None)) for f in fields(GPTConfig) if f.name != "vocab_size"
])


@dataclass
class DataConfig:
    dir: str = "data/cache/fineweb10B"        # folder of shard files
    train_files: str = "fineweb_train_*.bin"  # glob inside dir
    val_files: str = "fineweb_val_*.bin"      # glob inside dir
    demo: bool = False                        # build data.demo's byte-level shards in dir on first use
    tokenizer: str = "gpt2"                   # "gpt2" or "bytes": the shards' tokenizer; sets the vocab
    tokenizer_file: str = ""                  # local r50k_base.tiktoken, for "gpt2" without network
    seq_len: int = 1024
    val_tokens: int = 10_485_760              # validate on the first this-many val tokens


@dataclass
class OptimConfig:
    optimizer: str = "muon"        # hidden matrices: "muon", or "adamw" (the baseline)
    lr: float = 0.05               # hidden matrices
    weight_decay: float = 0.0      # hidden matrices
    lr_rule: str = "original"      # Muon's per-shape lr: "original" or "match_rms_adamw" (see muon.py)
    momentum: float = 0.95         # Muon's, after [schedule] momentum warmup
    nesterov: bool = True
    ns_coefficients: str = "classic"  # Newton-Schulz: "classic" or "polar_express"
    ns_steps: int = 5
    ns_dtype: str = "auto"         # Newton-Schulz matmuls: "auto" (bf16 on CUDA, fp32 on CPU), "bfloat16", "float32"
    embed_lr: float = 0.6          # token embedding (AdamW)
    head_lr: float = 0.008         # output head (AdamW)
    scalar_lr: float = 0.04        # norm gains (AdamW)
    adamw_weight_decay: float = 0.0  # embedding, head and gains
    adamw_beta1: float = 0.8
    adamw_beta2: float = 0.95
    adamw_eps: float = 1e-10
    grad_clip: float = 0.0         # max global gradient norm; 0 = off (the norm is logged either way)
    muon_clip: bool = True         # MuonClip: after every step, QK-clip each head whose max logit > tau
    muon_clip_tau: float = 100.0


@dataclass
class ScheduleConfig:
    steps: int = 3200              # optimizer steps
    warmup_steps: int = 0          # linear lr warmup from 0
    cooldown_frac: float = 0.4     # linear lr cooldown over this last fraction of the steps ...
    min_lr_frac: float = 0.0       # ... down to this fraction of the lr
    momentum_start: float = 0.85   # Muon momentum goes linearly from this to optim.momentum ...
    momentum_warmup_steps: int = 300  # ... over these steps


@dataclass
class TrainConfig:
    run_dir: str = "runs/gpu"      # checkpoints, metrics.jsonl, wandb/
    batch_tokens: int = 524_288    # global batch per optimizer step, in tokens, whatever the world size
    micro_batch_size: int = 32     # sequences per rank per forward pass
    seed: int = 0                  # weight init and data order
    compile: bool = True           # torch.compile the model and Muon's Newton-Schulz
    compile_warmup_steps: int = 3  # steps on random tokens before the clock starts, then undone
    bf16: bool = True              # bf16 autocast
    checkpoint_every: int = 500    # steps; 0 = only at the end; a multiple of log.every
    target_val_loss: float = 0.0   # stop once val loss <= this and report the time; 0 = off
    dist_timeout_s: int = 600      # torch.distributed: seconds a collective may wait before the job fails


@dataclass
class LogConfig:
    every: int = 10                # steps per console line / W&B point
    val_every: int = 125           # steps; 0 = only at the end
    heatmap_every: int = 250       # steps per layer x head max-logit picture; 0 = off; a multiple of every
    spectrum_every: int = 0        # steps per momentum-spectrum measurement; 0 = off; a multiple of every
    spectrum_matrices: list[str] = field(default_factory=lambda: ["attn.wo", "mlp.fc", "mlp.proj"])  # in every block
    sample_every: int = 500        # steps per prompt completions; 0 = only at the end
    prompts: list[str] = field(default_factory=lambda: ["The capital of France is", "Once upon a time,",
                                                        "The meaning of life is"])
    sample_mode: str = "both"      # "greedy", "sampled" or "both"
    max_new_tokens: int = 32
    temperature: float = 0.8       # sampled completions
    top_k: int = 50                # sampled completions; 0 = the whole vocabulary
    wandb: str = "auto"            # "auto" (online if logged in, else offline), "online", "offline", "disabled"
    wandb_project: str = ""        # "" = $WANDB_PROJECT, else "muon-speedrun"
    wandb_name: str = ""           # "" = $WANDB_NAME, else the run dir's name
    wandb_entity: str = ""         # "" = $WANDB_ENTITY, else your default entity
    wandb_group: str = ""          # "" = $WANDB_RUN_GROUP, else none
    wandb_tags: list[str] = field(default_factory=list)  # [] = $WANDB_TAGS (comma-separated), else none
    wandb_notes: str = ""          # "" = $WANDB_NOTES, else none
    peak_flops: float = 989e12     # per device, for MFU: H100 bf16 dense


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


class ConfigError(ValueError):
    """Bad config or command line: raised before any work starts."""


SECTIONS = {f.name: f.type for f in fields(Config)}


def key_type(section: str, key: str, source: str) -> type:
    if section not in SECTIONS:
        raise ConfigError(f"{source}: unknown section [{section}]; valid sections: {', '.join(SECTIONS)}")
    hints = typing.get_type_hints(SECTIONS[section])
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {section}.{key}; valid keys in [{section}]: {', '.join(hints)}")
    return hints[key]


def checked(value, typ: type, key: str, source: str):
    """value if it has type typ (an int is a float too), else a ConfigError naming key and type."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: is_number and isinstance(value, int), float: is_number,
          str: isinstance(value, str)}.get(typ)
    if ok is None:  # list[str], the only other type in use
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        raise ConfigError(f"{source}: {key} = {value!r} is {type(value).__name__}; expected {type_name(typ)}")
    if typ is float and not math.isfinite(value):
        raise ConfigError(f"{source}: {key} = {value!r}: expected a finite number")
    return float(value) if typ is float else value


def type_name(typ: type) -> str:
    return "a list of strings" if typ == list[str] else typ.__name__


def parse_text(text: str | None, typ: type, key: str):
    """A command-line value converted to typ; a bare --flag means true for a bool key."""
    if text is None and typ is bool:
        return True
    try:
        if text is None:
            raise ValueError
        if typ is bool and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if typ in (int, float, str):
            return typ(text)
        if typ == list[str]:
            return tomllib.loads(f"value = {text}")["value"]
        raise ValueError
    except (ValueError, tomllib.TOMLDecodeError):
        example = {bool: "true or false", list[str]: 'a TOML array like ["a", "b"]'}.get(typ, type_name(typ))
        raise ConfigError(f"command line: --{key}={text if text is not None else ''}: expected {example}") from None


def build_config(raw: dict, source: str, overrides: list[tuple[str, str | None]]) -> Config:
    """The Config of a TOML-shaped dict with command-line overrides on top, the model preset resolved."""
    for name, values in raw.items():
        if name not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"{source}: {name!r} is not a section; valid sections: {', '.join(SECTIONS)}")
    raw = {name: dict(values) for name, values in raw.items()}
    for dotted, text in overrides:
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})[key] = parse_text(text, key_type(section, key, "command line"), dotted)
    source += " + command line" if overrides else ""
    sections = {}
    for name, values in raw.items():
        for key, value in values.items():
            values[key] = checked(value, key_type(name, key, source), f"{name}.{key}", source)
        sections[name] = SECTIONS[name](**values)
    cfg = Config(**sections)
    if cfg.model.preset not in CONFIGS:
        raise ConfigError(f"{source}: model.preset = {cfg.model.preset!r}; expected one of {', '.join(CONFIGS)}")
    preset = CONFIGS[cfg.model.preset]
    for f in fields(cfg.model):
        if getattr(cfg.model, f.name) is None:
            setattr(cfg.model, f.name, getattr(preset, f.name))
    return cfg


def gpt_config(cfg: Config, vocab_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, **{k: v for k, v in asdict(cfg.model).items() if k != "preset"})


def require(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: expected {expected}")


def validate_tokenizer_keys(cfg: Config) -> None:
    """The checks that must come before the tokenizer loads: a demo run with gpt2 is a config error,
    not a failed download."""
    d = cfg.data
    require(d.tokenizer in TOKENIZERS, "data.tokenizer", d.tokenizer, f"one of {TOKENIZERS}")
    require(not d.demo or d.tokenizer == "bytes", "data.tokenizer", d.tokenizer,
            '"bytes" with data.demo = true (the demo shards are byte-level)')


def validate(cfg: Config, world_size: int, vocab_size: int) -> int:
    """Check every value and how they fit together; returns the gradient accumulation steps."""
    d, o, s, t, lg = cfg.data, cfg.optim, cfg.schedule, cfg.train, cfg.log
    try:
        model_cfg = gpt_config(cfg, vocab_size)
    except ValueError as e:
        raise ConfigError(f"[model] {e}") from None
    validate_tokenizer_keys(cfg)
    require(0 < d.seq_len <= model_cfg.block_size, "data.seq_len", d.seq_len,
            f"1 .. model.block_size = {model_cfg.block_size}")
    for key in ("lr", "weight_decay", "embed_lr", "head_lr", "scalar_lr", "adamw_weight_decay", "grad_clip"):
        require(getattr(o, key) >= 0, f"optim.{key}", getattr(o, key), ">= 0")
    require(o.optimizer in ("muon", "adamw"), "optim.optimizer", o.optimizer, '"muon" or "adamw"')
    require(o.lr_rule in muon.LR_RULES, "optim.lr_rule", o.lr_rule, f"one of {muon.LR_RULES}")
    require(o.ns_coefficients in muon.NS_COEFFICIENTS, "optim.ns_coefficients", o.ns_coefficients,
            f"one of {tuple(muon.NS_COEFFICIENTS)}")
    try:
        muon.ns_schedule(o.ns_coefficients, o.ns_steps)
    except ValueError as e:
        raise ConfigError(f"optim.ns_steps: {e}") from None
    require(o.ns_dtype in NS_DTYPES, "optim.ns_dtype", o.ns_dtype, f"one of {tuple(NS_DTYPES)}")
    for key in ("momentum", "adamw_beta1", "adamw_beta2"):
        require(0 <= getattr(o, key) < 1, f"optim.{key}", getattr(o, key), "in [0, 1)")
    require(o.adamw_eps > 0 and o.muon_clip_tau > 0, "optim.adamw_eps / optim.muon_clip_tau",
            (o.adamw_eps, o.muon_clip_tau), "both > 0")
    require(s.steps > 0, "schedule.steps", s.steps, "> 0")
    require(0 <= s.cooldown_frac <= 1, "schedule.cooldown_frac", s.cooldown_frac, "in [0, 1]")
    require(0 <= s.warmup_steps <= s.steps - round(s.cooldown_frac * s.steps), "schedule.warmup_steps",
            s.warmup_steps, "0 .. schedule.steps minus the cooldown steps (warmup and cooldown must not overlap)")
    require(0 <= s.min_lr_frac <= 1, "schedule.min_lr_frac", s.min_lr_frac, "in [0, 1]")
    require(0 <= s.momentum_start < 1, "schedule.momentum_start", s.momentum_start, "in [0, 1)")
    require(s.momentum_warmup_steps >= 0, "schedule.momentum_warmup_steps", s.momentum_warmup_steps, ">= 0")
    require(t.micro_batch_size > 0, "train.micro_batch_size", t.micro_batch_size, "> 0")
    require(t.compile_warmup_steps >= 0, "train.compile_warmup_steps", t.compile_warmup_steps, ">= 0")
    require(t.dist_timeout_s > 0, "train.dist_timeout_s", t.dist_timeout_s, "> 0 seconds")
    per_micro_step = world_size * t.micro_batch_size * d.seq_len
    require(t.batch_tokens > 0 and t.batch_tokens % per_micro_step == 0, "train.batch_tokens", t.batch_tokens,
            f"a multiple of world_size {world_size} x train.micro_batch_size {t.micro_batch_size} x data.seq_len "
            f"{d.seq_len} = {per_micro_step}")
    require(d.val_tokens > 0 and d.val_tokens % per_micro_step == 0, "data.val_tokens", d.val_tokens,
            f"a multiple of world_size x train.micro_batch_size x data.seq_len = {per_micro_step}")
    require(lg.every > 0, "log.every", lg.every, "> 0")
    require(t.checkpoint_every >= 0 and t.checkpoint_every % lg.every == 0, "train.checkpoint_every",
            t.checkpoint_every, f"0 or a multiple of log.every = {lg.every} (a checkpoint follows a finite-loss check)")
    require(lg.heatmap_every >= 0 and lg.heatmap_every % lg.every == 0, "log.heatmap_every", lg.heatmap_every,
            f"0 or a multiple of log.every = {lg.every} (the max logits are measured on logged steps)")
    require(lg.spectrum_every >= 0 and lg.spectrum_every % lg.every == 0, "log.spectrum_every", lg.spectrum_every,
            f"0 or a multiple of log.every = {lg.every}")
    for key in ("val_every", "sample_every", "top_k"):
        require(getattr(lg, key) >= 0, f"log.{key}", getattr(lg, key), ">= 0")
    require(all(lg.prompts), "log.prompts", lg.prompts, "non-empty strings")
    require(lg.sample_mode in ("greedy", "sampled", "both"), "log.sample_mode", lg.sample_mode,
            '"greedy", "sampled" or "both"')
    require(lg.max_new_tokens > 0 and lg.temperature > 0, "log.max_new_tokens / log.temperature",
            (lg.max_new_tokens, lg.temperature), "both > 0")
    require(lg.wandb in ("auto", "online", "offline", "disabled"), "log.wandb", lg.wandb,
            '"auto", "online", "offline" or "disabled"')
    require(lg.peak_flops > 0, "log.peak_flops", lg.peak_flops, "> 0")
    return t.batch_tokens // per_micro_step


def config_help() -> str:
    """Every config key with its type, default and the comment beside it in the source: --help's table."""
    lines = ["Config keys (--section.key=value; the defaults are configs/gpu.toml's):"]
    for section, cls in SECTIONS.items():
        source = GPTConfig if cls is ModelConfig else cls  # ModelConfig is built from GPTConfig's fields
        comments = dict(re.findall(r"^    (\w+):[^#\n]*#\s*(.*)$", inspect.getsource(source), flags=re.M))
        comments["preset"] = f"a model.CONFIGS name ({', '.join(CONFIGS)}); the keys below change it"
        defaults = asdict(cls()) if cls is not ModelConfig else asdict(CONFIGS[ModelConfig().preset])
        defaults["preset"] = ModelConfig().preset
        lines.append(f"  [{section}]")
        for key, typ in typing.get_type_hints(cls).items():
            typ = typing.get_args(typ)[0] if typing.get_args(typ) and type(None) in typing.get_args(typ) else typ
            default = f"{defaults[key]:g}" if isinstance(defaults[key], float) else json.dumps(defaults[key])
            lines.append(f"    {section}.{key}: {type_name(typ)} = {default}" + (f"  # {comments[key]}" if key in comments else ""))
    return "\n".join(lines)


def split_argv(argv: list[str]) -> tuple[dict[str, str], list[tuple[str, str | None]]]:
    """({"config": ..., "resume": ...}, [("section.key", text or None)]) from the command line."""
    flags, overrides, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__ + "\n" + config_help())
            sys.exit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected {arg!r}; expected --config FILE, --resume CHECKPOINT|latest "
                              "or --section.key=value")
        name, has_value, text = arg[2:].partition("=")
        if not has_value:  # --key value, or a bare --flag
            has_next = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            text = argv[i + 1] if has_next else None
            i += has_next
        i += 1
        if name in ("config", "resume"):
            if text is None:
                raise ConfigError(f"command line: --{name} needs a value")
            if name in flags:
                raise ConfigError(f"command line: --{name} given twice ({flags[name]!r} and {text!r}); give it once")
            flags[name] = text
        elif "." in name:
            overrides.append((name, text))
        else:
            raise ConfigError(f"command line: unknown option --{name}; expected --config, --resume or --section.key")
    return flags, overrides


def read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None


def load_run_config(argv: list[str]) -> tuple[Config, Path | None]:
    """The run's Config and the checkpoint to resume from, if any."""
    flags, overrides = split_argv(argv)
    resume = flags.get("resume")
    if "config" in flags:
        cfg = build_config(read_toml(flags["config"]), flags["config"], overrides)
    elif resume and resume != "latest":
        cfg = build_config(read_checkpoint(Path(resume))["config"], f"{resume} (its saved config)", overrides)
    else:
        raise ConfigError("command line: --config FILE is required (or --resume CHECKPOINT, which brings its config)")
    if resume == "latest":
        found = checkpoints(Path(cfg.train.run_dir))
        if not found:
            raise ConfigError(f"--resume latest: no checkpoint (ckpt_*.pt) in train.run_dir = {cfg.train.run_dir}; "
                              "the same command without --resume starts the run over (a metrics.jsonl left "
                              "there is kept aside, not overwritten)")
        return cfg, found[-1][1]
    return cfg, Path(resume) if resume else None


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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return device


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
# Model FLOPs, optimizers, schedule


def flops_per_token(model_cfg: GPTConfig, n_params: int, seq_len: int) -> int:
    """Training FLOPs per token: 6 per weight of every matmul, plus attention's QK^T and AV.

    n_params is every parameter but the token embedding (a lookup); the head counts, as the tied
    wte does in nanoGPT. Attention is counted over the full T x T like nanoGPT's 12 L H Q T, with
    MLA's q/k width (nope + rope) and v width: 2 FLOPs x 3 (fwd + bwd) x T x H x (qk + v) per layer.
    """
    if model_cfg.attention == "mla":
        qk, v = model_cfg.qk_nope_head_dim + model_cfg.qk_rope_head_dim, model_cfg.v_head_dim
    else:
        qk = v = model_cfg.head_dim
    return 6 * n_params + 6 * model_cfg.n_layer * model_cfg.n_head * seq_len * (qk + v)


# Off the GPU, "auto" is fp32: CPUs without native bf16 (AVX2-only) run bf16 matmuls tens of times
# slower than fp32 (50x on one of our 2-core machines), and fp32 gives a CPU run the same numbers on
# every CPU. CPUs with AVX512-BF16 or AMX run bf16 faster (4.5x on a Zen 4 EPYC): set "bfloat16".
NS_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


def ns_dtype(name: str, device: torch.device) -> torch.dtype:
    if NS_DTYPES[name] is not None:
        return NS_DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_optimizer(cfg: Config, model: GPT) -> muon.Muon:
    """One muon.Muon: hidden matrices (Muon, or AdamW for the baseline), then AdamW groups for the
    embedding, the head and the gains, whose good learning rates are orders of magnitude apart."""
    o = cfg.optim
    hidden, others = muon.hybrid_param_groups(model, adamw_names=("lm_head",))
    embed = [(n, p) for n, p in others["params"] if n.startswith("wte.")]
    head = [(n, p) for n, p in others["params"] if n.startswith("lm_head.")]
    gains = [(n, p) for n, p in others["params"] if not n.startswith(("wte.", "lm_head."))]

    def adamw(params, lr, weight_decay):
        return dict(params=params, use_muon=False, base_lr=lr, lr=lr, weight_decay=weight_decay,
                    betas=(o.adamw_beta1, o.adamw_beta2), eps=o.adamw_eps)
    matrices = (dict(params=hidden["params"], use_muon=True, base_lr=o.lr) if o.optimizer == "muon"
                else adamw(hidden["params"], o.lr, o.weight_decay))
    groups = [matrices, adamw(embed, o.embed_lr, o.adamw_weight_decay), adamw(head, o.head_lr, o.adamw_weight_decay),
              adamw(gains, o.scalar_lr, o.adamw_weight_decay)]
    return muon.Muon([g for g in groups if g["params"]], lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
                     nesterov=o.nesterov, ns_steps=o.ns_steps, ns_coefficients=o.ns_coefficients,
                     lr_rule=o.lr_rule, ns_dtype=ns_dtype(o.ns_dtype, model.lm_head.weight.device),
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
    clipped = (muon.qk_clip_(raw_model.attention_heads(), max_logits, cfg.optim.muon_clip_tau, check_finite=False,
                             compile=cfg.train.compile)
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
# The run: config -> data -> model -> optimizer -> loop


def main(argv: list[str]) -> int:
    """Run train.py with these arguments; returns the exit code (0 done, 128 + N stopped by signal N)."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cfg, resume_path = load_run_config(argv)
    validate_tokenizer_keys(cfg)
    tokenizer = load_tokenizer(cfg)
    grad_accum = validate(cfg, world_size, tokenizer.n_vocab)
    checkpoint = read_checkpoint(resume_path) if resume_path else None
    # Rank 0 alone writes: it takes the run dir (lock, checks, clean-up) before any data or model is built.
    run_dir_lock = claim_run_dir(cfg, checkpoint["step"] if checkpoint else None) if rank == 0 else None
    device = setup_device(world_size, cfg.train.dist_timeout_s)
    refused = False
    try:
        with StopSignals() as signals:
            exit_code = run(cfg, tokenizer, grad_accum, checkpoint, resume_path, device, rank, world_size, signals)
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


def run(cfg, tokenizer, grad_accum, checkpoint, resume_path, device, rank, world_size, signals) -> int:
    train_loader, val_loader = build_loaders(cfg, rank, world_size, device, tokenizer.n_vocab)
    model_cfg = gpt_config(cfg, tokenizer.n_vocab)
    torch.manual_seed(cfg.train.seed)
    raw_model = GPT(model_cfg).to(device)
    attention = raw_model.choose_attention(torch.bfloat16 if cfg.train.bf16 else torch.float32)
    optimizer = build_optimizer(cfg, raw_model)
    unknown = set(cfg.log.spectrum_matrices) - set(spectrum_names(raw_model))
    if cfg.log.spectrum_every and unknown:
        raise ConfigError(f"log.spectrum_matrices: {sorted(unknown)} are not matrices of a block; "
                          f"valid names: {', '.join(spectrum_names(raw_model))}")
    step, train_time = 0, 0.0
    if checkpoint:
        config_groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in optimizer.param_groups]
        try:
            raw_model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            train_loader.load_state_dict(checkpoint["loader"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"--resume {resume_path} does not fit this config's model, optimizer or data: {e}") from None
        for group, values in zip(optimizer.param_groups, config_groups):
            group.update(values)  # the config sets hyperparameters; the checkpoint brings the state
        set_rng_state(checkpoint["rng"], device)
        step, train_time = checkpoint["step"], checkpoint["train_time_s"]
    compiled = torch.compile(raw_model) if cfg.train.compile else raw_model
    model = data_parallel(compiled, optimizer, device) if world_size > 1 else compiled

    n_params = raw_model.num_params(non_embedding=True)
    flops = flops_per_token(model_cfg, n_params, cfg.data.seq_len)
    run_config = {**asdict(cfg), "world_size": world_size, "grad_accum": grad_accum, "params": raw_model.num_params(),
                  "params_non_embedding": n_params, "flops_per_token": flops, "sdpa_backend": attention,
                  "resumed_from": str(resume_path) if resume_path else ""}
    log = RunLog(cfg, rank == 0, run_config, checkpoint, continues=repeats_checkpoint_run(checkpoint, cfg))
    log.print(f"{cfg.model.preset}: {raw_model.num_params() / 1e6:.2f}M parameters ({n_params / 1e6:.2f}M non-embedding), "
              f"{flops / 1e6:.0f} MFLOP/token | {device} x {world_size}, {grad_accum} micro-steps of "
              f"{cfg.train.micro_batch_size} x {cfg.data.seq_len} per step | attention: {attention} | {cfg.train.run_dir}")
    per_pass, reads = train_loader.tokens_per_pass(), cfg.schedule.steps * cfg.train.batch_tokens
    log.print(f"train data: {per_pass:,} tokens a pass over {len(train_loader.files)} shard file(s); "
              f"{cfg.schedule.steps} steps read {reads:,} tokens, {reads / per_pass:.2f} passes")
    if checkpoint:
        log.print(f"resumed from {resume_path} at step {step}")
        changed = {k: (a, b) for k, (a, b) in zip_flat(checkpoint["config"], asdict(cfg)) if a != b}
        for key, (before, after) in changed.items():
            log.print(f"  config changed since the checkpoint: {key}: {before!r} -> {after!r}")
    if cfg.train.compile_warmup_steps:
        seconds = warm_up(model, compiled, raw_model, optimizer, cfg, grad_accum, device, step)
        log.print(f"compile warm-up: {cfg.train.compile_warmup_steps} steps and a validation batch on random tokens "
                  f"in {seconds:.1f}s, then weights, optimizer state and RNG put back (not counted as training)")
    exit_code = 1
    try:
        exit_code = train_loop(cfg, model, compiled, raw_model, optimizer, train_loader, val_loader, tokenizer, log,
                               device, grad_accum, flops, world_size, step, train_time, signals)
    finally:
        log.finish(exit_code)
    return exit_code


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


def warm_up(model, compiled, raw_model: GPT, optimizer: muon.Muon, cfg: Config, grad_accum: int,
            device: torch.device, step: int) -> float:
    """Train train.compile_warmup_steps steps and evaluate one batch, all on random tokens, then put
    the weights, the optimizer state and the RNG back as they were: torch.compile builds its graphs
    (forward with and without the probe, backward, evaluation, Newton-Schulz) before the clock
    starts, as modded-nanogpt times its records. Returns the seconds it took."""
    clock = TrainClock(device, 0.0)
    clock.start()
    saved = copy.deepcopy({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                           "rng": rng_state(device)})
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len)

    def random_batches():  # inputs and targets two tensors, as the loaders give: compile guards on aliasing
        while True:
            yield (torch.randint(raw_model.config.vocab_size, shape, device=device, generator=generator),
                   torch.randint(raw_model.config.vocab_size, shape, device=device, generator=generator))

    batches = random_batches()
    for i in range(cfg.train.compile_warmup_steps):
        # Without MuonClip only logged steps probe: alternate, so both forward graphs get built.
        train_step(model, raw_model, optimizer, batches, cfg, step, grad_accum,
                   probe=cfg.optim.muon_clip or i % 2 == 1, measure_grad_norm=i % 2 == 1)
    evaluate(compiled, [next(batches)], cfg, device)
    raw_model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"], device)
    clock.stop()
    return clock.total


def zip_flat(a: dict, b: dict, prefix: str = ""):
    """(dotted key, (a's value, b's value)) for every key of two nested config dicts."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            yield from zip_flat(x, y, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", (x, y)


def train_loop(cfg, model, compiled, raw_model, optimizer, train_loader, val_loader, tokenizer, log,
               device, grad_accum, flops, world_size, step, train_time, signals) -> int:
    """Train from step to schedule.steps; returns the process exit code (0, or 128 + a stop signal's number).

    At a step that validates, samples and checkpoints, they happen in that order, so a checkpoint's
    step has been evaluated: a run resumed from it starts training at once."""
    s, lg, t = cfg.schedule, cfg.log, cfg.train
    run_dir = Path(t.run_dir)
    clock, wall_start = TrainClock(device, train_time), time.perf_counter()
    # A checkpoint is good once a finite training loss has been computed from its weights: the
    # loss check sees losses from before each update, so the latest save is unvouched until then.
    good, unvouched = None, (checkpoints(run_dir) or [None])[-1] if log.enabled else None  # (step, path), rank 0
    target_reached, resumed_at, stop_signal = False, step if step else None, None
    # This log interval's losses, max logits and clipped heads stay on the device until it ends.
    losses, max_logits, clipped = [], None, None
    interval_start = (step, clock.total)

    def save():
        nonlocal unvouched
        clock.stop()
        if step == resumed_at:  # the checkpoint this run started from
            return
        optimizer_state = optimizer.state_dict()  # every rank: a collective under Muon's owner sharding
        if log.enabled:
            path = run_dir / f"ckpt_{step:06d}.pt"
            state = {"step": step, "model": raw_model.state_dict(), "optimizer": optimizer_state,
                     "loader": train_loader.state_dict(), "rng": rng_state(device), "config": asdict(cfg),
                     "train_time_s": clock.total, **log.state_dict()}
            try:
                write_atomically(path, lambda f: torch.save(state, f))  # never half a checkpoint
            except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
                kept = f"{unvouched[1]} (step {unvouched[0]})" if unvouched else "none"
                raise RunError(f"could not write the checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                               f"nothing was left half-written; the latest checkpoint is {kept}") from None
            unvouched = (step, path)

    while True:
        finished, stopping = step == s.steps, stop_signal is not None
        last = finished or stopping
        evaluated = step == resumed_at  # before its checkpoint was written
        if ((lg.val_every and step % lg.val_every == 0) or finished) and not evaluated:
            clock.stop()
            started = time.perf_counter()
            val_loss = evaluate(compiled, val_loader, cfg, device)
            if not math.isfinite(val_loss):  # the weights of this step diverged: nothing of them is saved
                raise NonFiniteLoss(non_finite_message(f"step {step}: val loss is {val_loss}", good, None))
            log.scalars(step, {"val/loss": val_loss})
            log.print(f"step {step:5d}/{s.steps} | val loss {val_loss:.4f} ({time.perf_counter() - started:.1f}s)")
            if t.target_val_loss and val_loss <= t.target_val_loss:
                log.print(f"target val loss {t.target_val_loss} reached at step {step}: {clock.total:.1f}s of training "
                          f"(validation, completions and checkpoints excluded; compilation "
                          f"{'warmed up before, excluded' if t.compile_warmup_steps else 'included'}), "
                          f"{time.perf_counter() - wall_start:.1f}s wall")
                log.summary({"target/step": step, "target/train_time_s": clock.total})
                finished = last = target_reached = True
        if ((lg.sample_every and step % lg.sample_every == 0 and step > 0) or finished) and not evaluated:
            clock.stop()
            log.completions_table(step, complete_prompts(raw_model, tokenizer, cfg, device) if log.enabled else [])
        if last or (t.checkpoint_every and step % t.checkpoint_every == 0 and step > 0):
            save()
        if last:
            if stop_signal is not None:
                if log.enabled and unvouched:
                    log.print(f"stopped by {signal.Signals(stop_signal).name} at step {step}, checkpoint saved; "
                              f"resume with: {resume_command(unvouched[1], world_size)}")
                elif log.enabled:  # stopped before a step: the checkpoint it resumed from is the latest
                    log.print(f"stopped by {signal.Signals(stop_signal).name} at step {step}, before training")
                return 128 + stop_signal
            if t.target_val_loss and not target_reached:
                log.print(f"target val loss {t.target_val_loss} not reached in {s.steps} steps")
            log.print(f"done: step {step}, {clock.total:.1f}s of training, {time.perf_counter() - wall_start:.1f}s wall")
            return 0

        clock.start()
        # One process stops at the step a signal arrives; ranks agree on it at the next log line.
        flush = (step + 1) % lg.every == 0 or step + 1 == s.steps or (world_size == 1 and signals.received is not None)
        # Without MuonClip the probe runs on logged steps only, which then report their own max logits.
        loss, grad_norm, step_max, step_clipped = train_step(
            model, raw_model, optimizer, train_loader, cfg, step, grad_accum,
            probe=cfg.optim.muon_clip or flush, measure_grad_norm=flush)
        step += 1
        losses.append(loss)
        if step_max is not None:
            max_logits = step_max if max_logits is None else torch.maximum(max_logits, step_max)
        if step_clipped is not None:
            clipped = step_clipped if clipped is None else clipped + step_clipped
        if not flush:
            continue

        clock.stop()
        # The interval's losses and this rank's stop request, in one transfer (and one all-reduce).
        values = torch.cat([torch.stack(losses), torch.tensor([float(signals.received or 0)], device=device)])
        if world_size > 1:  # so every rank sees the same losses and stops at the same step
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values[:-1] /= world_size
        *values, signal_sum = values.tolist()  # the one wait for the device per log interval
        if signal_sum:  # a signal on any rank stops every rank here
            stop_signal = signals.received or signal.SIGTERM
        grad_norm = grad_norm.item()
        first_bad, fault = first_non_finite(values, grad_norm, max_logits, step)
        if first_bad != 0 and unvouched:  # the interval's first loss came from the saved weights
            good, unvouched = unvouched, None
        if fault:
            raise NonFiniteLoss(non_finite_message(fault, good, unvouched))
        steps_done, seconds = step - interval_start[0], clock.total - interval_start[1]
        tokens_per_s = steps_done * t.batch_tokens / seconds
        mfu = flops * tokens_per_s / (lg.peak_flops * world_size)
        lr = optimizer.param_groups[0]["lr"]  # the hidden matrices'
        row = {"train/loss": sum(values) / len(values), "train/lr": lr, "train/grad_norm": grad_norm,
               "train/tokens_per_s": tokens_per_s, "train/mfu": mfu, "train/time_s": clock.total,
               **attention_metrics(max_logits, clipped)}
        if lg.spectrum_every and step % lg.spectrum_every == 0 and log.enabled:
            row.update(spectrum_metrics(raw_model, optimizer, lg.spectrum_matrices))
        log.scalars(step, row)
        log.print(f"step {step:5d}/{s.steps} | loss {row['train/loss']:.4f} | lr {lr:.2e} | "
                  f"{tokens_per_s / 1e3:.1f}K tok/s | MFU {100 * mfu:.1f}% | max logit {row['attn/max_logit']:.1f}"
                  + (f" ({row['attn/clipped_heads']} clipped)" if clipped is not None else "")
                  + f" | ETA {duration((s.steps - step) * seconds / steps_done)}")
        if lg.heatmap_every and step % lg.heatmap_every == 0:
            log.heatmap(step, max_logits)
        losses, max_logits, clipped = [], None, None
        interval_start = (step, clock.total)


def resume_command(checkpoint: Path, world_size: int) -> str:
    """The command line that resumes this run from checkpoint (which holds its config)."""
    launcher = "python" if world_size == 1 else f"torchrun --nproc_per_node={world_size}"
    return f"{launcher} train.py --resume {shlex.quote(str(checkpoint))}"


class StopSignals:
    """SIGTERM (a scheduler's preemption notice) and SIGINT (Ctrl-C) ask the run to stop: it finishes
    the step, writes a checkpoint, ends the W&B run and exits with 128 + the signal's number. The
    first signal puts the previous handlers back, so a second one acts at once (KeyboardInterrupt,
    or the default SIGTERM kill)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        self.received = signum
        self.restore()
        print(f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __exit__(self, *exc):
        self.restore()


class RunError(RuntimeError):
    """The run cannot go on (a failed checkpoint write, a diverged run): one line for the user, no traceback."""


class NonFiniteLoss(RunError):
    """A nan or inf training loss or max logit: the run stops, and nothing is saved over the last good checkpoint."""


def non_finite_message(what: str, good: tuple[int, Path] | None, unvouched: tuple[int, Path] | None) -> str:
    """What went non-finite, and which checkpoint to resume. unvouched, a checkpoint saved just
    before the first bad value, holds the weights that produced it: it is renamed *.pt.nonfinite,
    so that --resume latest takes the good one."""
    kept = (f"the last good checkpoint is {good[1]} (step {good[0]})" if good
            else "no checkpoint had been written" if not unvouched else "no checkpoint is known to be good")
    if unvouched:
        poisoned = unvouched[1].with_name(unvouched[1].name + ".nonfinite")
        os.replace(unvouched[1], poisoned)
        kept += (f"; {unvouched[1].name} (step {unvouched[0]}) holds the update that led here and was renamed "
                 f"{poisoned.name}")
    return f"{what}; stopped without saving this state; {kept}"


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


def attention_metrics(max_logits: torch.Tensor, clipped: torch.Tensor | None) -> dict:
    """The largest attention logit overall, per layer and per head, and how many heads MuonClip clipped."""
    per_head = max_logits.tolist()
    per_layer = [max(heads) for heads in per_head]
    row = {"attn/max_logit": max(per_layer), **{f"attn/max_logit/layer_{i}": v for i, v in enumerate(per_layer)},
           **{f"attn/max_logit/layer_{i}/head_{h}": v for i, heads in enumerate(per_head) for h, v in enumerate(heads)}}
    if clipped is not None:  # summed over the interval's steps
        row["attn/clipped_heads"] = int(clipped)
    return row


def spectrum(matrix: torch.Tensor, top: int = 3) -> tuple[float, float]:
    """(stable rank ||M||_F^2 / ||M||_2^2, share of ||M||_F^2 in the `top` largest singular values).
    The stable rank is 1 for a rank-one matrix and min(A, B) for an orthogonal one."""
    energy = torch.linalg.svdvals(matrix.float()).square()
    return (energy.sum() / energy[0]).item(), (energy[:top].sum() / energy.sum()).item()


def spectrum_names(raw_model: GPT) -> list[str]:
    """The hidden matrices of a block, as log.spectrum_matrices names them ("attn.wo", "mlp.fc", ...)."""
    return [name.removesuffix(".weight") for name, p in raw_model.blocks[0].named_parameters() if p.ndim == 2]


def spectrum_metrics(raw_model: GPT, optimizer: muon.Muon, names: list[str]) -> dict:
    """For the named matrices of every block: the stable rank and top-3 energy share of the
    optimizer's first moment (Muon's momentum buffer; AdamW's exp_avg for the baseline) and, under
    Muon, the stable rank of the orthogonalised momentum NS(M), what Muon steps along."""
    groups = {p: group for group in optimizer.param_groups for p in group["params"]}
    row = {}
    for i, block in enumerate(raw_model.blocks):
        for name in names:
            p = block.get_parameter(f"{name}.weight")
            state = optimizer.state.get(p, {})
            moment = state.get("momentum_buffer", state.get("exp_avg"))
            if moment is None or not moment.any():  # no gradient yet (zero-initialised neighbours)
                continue
            key = f"spectrum/layer_{i}/{name}"
            row[f"{key}/moment_stable_rank"], row[f"{key}/moment_top3_energy"] = spectrum(moment)
            group = groups[p]
            if group["use_muon"]:
                update = muon.newton_schulz(moment, group["ns_coefficients"], group["ns_steps"], dtype=group["ns_dtype"])
                row[f"{key}/update_stable_rank"] = spectrum(update)[0]
    return row


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


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


# ----------------------------------------------------------------------------------------------
# Checkpoints: written atomically, only by rank 0, never over a later step's.


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in run_dir, oldest first."""
    found = []
    for path in run_dir.glob("ckpt_*.pt"):
        step = path.stem.removeprefix("ckpt_")
        if step.isdigit():
            found.append((int(step), path))
    return sorted(found)


CHECKPOINT_KEYS = ("step", "model", "optimizer", "loader", "rng", "config", "train_time_s")


def read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--resume {path}: no such checkpoint file")
    try:  # mmap: reading the config does not load a GB of weights
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ConfigError(f"--resume {path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ConfigError(f"--resume {path}: a torch file, but not one of train.py's checkpoints (it lacks "
                          f"{', '.join(missing)}); checkpoints are the ckpt_NNNNNN.pt files in a train.run_dir")
    return checkpoint


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


def claim_run_dir(cfg: Config, resume_step: int | None):
    """Make train.run_dir this run's: writable, locked against a second trainer, cleared of
    temporary files that a killed writer left, and holding nothing a fresh run would write over.
    Returns the open lock file; the lock holds until release_run_dir or the process's end."""
    run_dir = Path(cfg.train.run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / ".lock", "a+")
    except OSError as e:
        raise ConfigError(f"train.run_dir = {cfg.train.run_dir}: cannot write there ({e.strerror or e})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise ConfigError(f"train.run_dir = {cfg.train.run_dir} is in use by another trainer ({holder}); wait for it "
                          "to end, or set another train.run_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    lock.created_run_dir = created  # so a run refused before it wrote anything leaves no folder behind
    try:
        check_run_dir(cfg, resume_step)
    except ConfigError:
        release_run_dir(lock, wrote_nothing=True)
        raise
    # Only a lock holder writes checkpoints here, so every temporary checkpoint file is a dead writer's.
    for stale in run_dir.glob(".ckpt_*.tmp"):
        print(f"removing {stale}: a checkpoint that a killed run was writing ({stale.stat().st_size:,} bytes)")
        stale.unlink()
    return lock


def release_run_dir(lock, wrote_nothing: bool) -> None:
    """Unlock; a run dir this run created and left empty (a config error found late) is removed."""
    path = Path(lock.name)
    lock.close()
    if wrote_nothing and lock.created_run_dir and [p.name for p in path.parent.iterdir()] == [".lock"]:
        path.unlink()
        path.parent.rmdir()


def check_run_dir(cfg: Config, resume_step: int | None) -> None:
    """Refuse to write over another run's files: a fresh run needs a run dir without checkpoints, a
    resumed one a run dir without checkpoints after its step. The metrics of a run that stopped
    before its first checkpoint (nothing to resume) are kept aside as metrics.N.jsonl."""
    run_dir = Path(cfg.train.run_dir)
    later = [path.name for step, path in checkpoints(run_dir) if resume_step is None or step > resume_step]
    if later:
        what = "already holds a run" if resume_step is None else f"holds checkpoints after step {resume_step}"
        raise ConfigError(f"train.run_dir = {cfg.train.run_dir} {what} ({', '.join(later[:3])}); resume it with "
                          "--resume latest, or set another train.run_dir")
    metrics = run_dir / "metrics.jsonl"
    if resume_step is None and metrics.exists():
        kept = next(run_dir / f"metrics.{n}.jsonl" for n in range(1, 10**6) if not (run_dir / f"metrics.{n}.jsonl").exists())
        os.rename(metrics, kept)
        print(f"{run_dir} holds a run that stopped before its first checkpoint: its {metrics.name} is kept as "
              f"{kept.name}, and this run starts over")


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ConfigError, RunError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
