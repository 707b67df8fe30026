"""A run's configuration: typed sections read from a TOML file, then command-line overrides.

    flags, overrides = split_argv(["--config", "configs/demo.toml", "--optim.lr=0.01"])
    cfg = build_config(read_toml(flags["config"]), flags["config"], overrides)

Each key is one dataclass field below; the comment beside it is its documentation, which
`python train.py --help` prints with the value the run would use (so `--help` after a config
and overrides prints the resolved config). The defaults are the one-GPU 124M run; a TOML file
holds only what differs. An unknown section or key, a wrong type or a value out of range is a
ConfigError naming the key and what it expects, raised before any work starts.
"""

import dataclasses
import inspect
import json
import math
import re
import tomllib
import typing
from dataclasses import asdict, dataclass, field, fields

import torch

import muon
from data.tokenizer import TOKENIZERS
from model import CONFIGS, GPTConfig

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
    momentum: float = 0.97         # Muon's, after [schedule] momentum warmup
    nesterov: bool = True
    ns_coefficients: str = "classic"  # Newton-Schulz: "classic" or "polar_express"
    ns_steps: int = 5
    ns_dtype: str = "auto"         # Newton-Schulz matmuls: "auto" (bf16 on CUDA, fp32 elsewhere), "bfloat16", "float32"
    embed_lr: float = 0.6          # token embedding (AdamW)
    head_lr: float = 0.008         # output head (AdamW)
    scalar_lr: float = 0.04        # norm gains (AdamW)
    adamw_weight_decay: float = 0.0  # embedding, head and gains
    adamw_beta1: float = 0.8
    adamw_beta2: float = 0.95
    adamw_eps: float = 1e-10
    normuon: bool = True           # NorMuon: normalise each neuron of Muon's update by its running RMS (muon.normuon_)
    normuon_beta2: float = 0.95    # NorMuon's second-moment decay
    normuon_eps: float = 1e-8      # NorMuon's guard in O / (sqrt(v) + eps)
    normuon_axis: str = "rows"     # NorMuon's neurons: "rows" of W (the paper) or the "larger" side (modded-nanogpt)
    cautious_weight_decay: bool = False  # decay only where update and weight share a sign (Muon and AdamW)
    per_head: bool = False         # Muon orthogonalises each attention head's block of q, k/v and wo on its own
    grad_clip: float = 0.0         # max global gradient norm; 0 = off (the norm is logged either way)
    muon_clip: bool = True         # MuonClip: after every step, QK-clip each head whose max logit > tau
    muon_clip_tau: float = 100.0
    muon_clip_alpha: float = 0.5   # a clipped head's q_nope scales by eta^alpha, k_nope by eta^(1 - alpha), q_rope by eta


@dataclass
class ScheduleConfig:
    # nanochat's schedules (its scripts/base_train.py)
    steps: int = 3200              # optimizer steps
    warmup_steps: int = 40         # linear lr warmup
    cooldown_frac: float = 0.65    # linear lr cooldown over this last fraction of the steps ...
    min_lr_frac: float = 0.05      # ... down to this fraction of the lr
    momentum_start: float = 0.85   # Muon momentum goes linearly from this to optim.momentum ...
    momentum_warmup_steps: int = 400  # ... over these steps
    momentum_cooldown: float = 0.90   # ... and linearly back down to this over the lr cooldown; -1 = held
    weight_decay_cosine: bool = True  # Muon's weight decay on a cosine from optim.weight_decay to 0 over the run


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
    hellaswag_every: int = 3200    # steps per HellaSwag accuracy (hellaswag.py), and at the end of the run; 0 = off
    hellaswag_file: str = ""       # a file in HellaSwag's format; "" = its validation split, fetched to data/cache/hellaswag
    hellaswag_items: int = 0       # score the first this-many items; 0 = all
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


# optim.ns_dtype. Off the GPU, "auto" is fp32: CPUs without native bf16 run bf16 matmuls far
# slower than fp32, and fp32 gives a CPU run the same numbers on every CPU.
NS_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


def ns_dtype(name: str, device: torch.device) -> torch.dtype:
    if NS_DTYPES[name] is not None:
        return NS_DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def muon_options(cfg: "Config", device: torch.device) -> dict:
    """muon.Muon's keyword arguments for this config, on this device."""
    o = cfg.optim
    return dict(lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum, nesterov=o.nesterov, ns_steps=o.ns_steps,
                ns_coefficients=o.ns_coefficients, lr_rule=o.lr_rule, betas=(o.adamw_beta1, o.adamw_beta2),
                eps=o.adamw_eps, ns_dtype=ns_dtype(o.ns_dtype, device), normuon=o.normuon,
                normuon_beta2=o.normuon_beta2, normuon_eps=o.normuon_eps, normuon_axis=o.normuon_axis,
                cautious_weight_decay=o.cautious_weight_decay, compile=cfg.train.compile)


# muon.Muon's names for the [optim] keys it checks under another name.
MUON_NAMES = {"betas[0]": "adamw_beta1", "betas[1]": "adamw_beta2", "eps": "adamw_eps"}


def check_muon_options(cfg: "Config") -> None:
    """What muon.Muon refuses, refused before any work and named by its [optim] key: Muon is the one
    place that knows which of its settings are valid."""
    try:
        muon.Muon([torch.zeros(1, 1, requires_grad=True)], **muon_options(cfg, torch.device("cpu")), distributed=False)
    except ValueError as e:
        name, _, rest = str(e).partition("=")
        key = MUON_NAMES.get(name, name)
        raise ConfigError(f"optim.{key} = {rest}" if hasattr(cfg.optim, key) else f"[optim]: {e}") from None


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
    require(0 < d.seq_len <= model_cfg.block_size, "data.seq_len", d.seq_len,
            f"1 .. model.block_size = {model_cfg.block_size}")
    require(o.optimizer in ("muon", "adamw"), "optim.optimizer", o.optimizer, '"muon" or "adamw"')
    require(o.ns_dtype in NS_DTYPES, "optim.ns_dtype", o.ns_dtype, f"one of {tuple(NS_DTYPES)}")
    check_muon_options(cfg)
    for key in ("embed_lr", "head_lr", "scalar_lr", "adamw_weight_decay", "grad_clip"):  # the groups Muon doesn't see here
        require(getattr(o, key) >= 0, f"optim.{key}", getattr(o, key), ">= 0")
    require(0 <= o.muon_clip_alpha <= 1, "optim.muon_clip_alpha", o.muon_clip_alpha, "in [0, 1]")
    require(o.muon_clip_tau > 0, "optim.muon_clip_tau", o.muon_clip_tau, "> 0")
    require(s.steps > 0, "schedule.steps", s.steps, "> 0")
    require(0 <= s.cooldown_frac <= 1, "schedule.cooldown_frac", s.cooldown_frac, "in [0, 1]")
    require(s.warmup_steps >= 0, "schedule.warmup_steps", s.warmup_steps, ">= 0")
    require(0 <= s.min_lr_frac <= 1, "schedule.min_lr_frac", s.min_lr_frac, "in [0, 1]")
    require(0 <= s.momentum_start < 1, "schedule.momentum_start", s.momentum_start, "in [0, 1)")
    require(s.momentum_warmup_steps >= 0, "schedule.momentum_warmup_steps", s.momentum_warmup_steps, ">= 0")
    require(s.momentum_cooldown == -1 or 0 <= s.momentum_cooldown < 1, "schedule.momentum_cooldown",
            s.momentum_cooldown, "in [0, 1), or -1 (off)")
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
    for key in ("val_every", "sample_every", "top_k", "hellaswag_every", "hellaswag_items"):
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


def config_changes(before: dict, after: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, value before, value after) for every key whose value differs between two config
    dicts (asdict(Config), or a checkpoint's saved config)."""
    changes = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append((f"{prefix}{key}", a, b))
    return changes


def config_help(cfg: Config) -> str:
    """Every config key with its type, the value cfg gives it and the comment beside it in the source."""
    lines = ["Config keys (--section.key=value), with the values this command line gives them:"]
    for section, cls in SECTIONS.items():
        source = GPTConfig if cls is ModelConfig else cls  # ModelConfig is built from GPTConfig's fields
        comments = dict(re.findall(r"^    (\w+):[^#\n]*#\s*(.*)$", inspect.getsource(source), flags=re.M))
        comments["preset"] = f"a model.CONFIGS name ({', '.join(CONFIGS)}); the keys below change it"
        values = asdict(getattr(cfg, section))
        lines.append(f"  [{section}]")
        for key, typ in typing.get_type_hints(cls).items():
            typ = typing.get_args(typ)[0] if type(None) in typing.get_args(typ) else typ
            value = f"{values[key]:g}" if isinstance(values[key], float) else json.dumps(values[key])
            lines.append(f"    {section}.{key}: {type_name(typ)} = {value}" + (f"  # {comments[key]}" if key in comments else ""))
    return "\n".join(lines)


def split_argv(argv: list[str]) -> tuple[dict[str, str], list[tuple[str, str | None]]]:
    """({"config": ..., "resume": ..., "help": ...}, [("section.key", text or None)]) from the command line."""
    flags, overrides, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            flags["help"], i = "", i + 1
            continue
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
