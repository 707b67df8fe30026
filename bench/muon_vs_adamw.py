"""Muon against AdamW on the hidden matrices: the same MLA model, data and steps, each at its best lr.

    python -m bench.muon_vs_adamw --demo                # CPU: configs/demo.toml's model and data, ~25 min on 2 cores
    python -m bench.muon_vs_adamw                       # CUDA: ~30M-parameter MLA on .devdata/corpus, ~8 min on an H100
    python -m bench.muon_vs_adamw --smoke               # CPU: tiny MLA on the byte-level demo data, seconds
    python -m bench.muon_vs_adamw --data-dir DIR --out bench/results/muon_vs_adamw.png

Four optimizers on the hidden matrices: ours (muon.Muon) as the Muon of 2024, ours with the
options the demo adopts (OPTIONS, measured by bench.optimizer_options), AdamW, and
torch.optim.Muon as the reference implementation of Muon (PyTorch's, with the same lr rule,
momentum, Nesterov and weight decay; it runs Newton-Schulz in bf16 whatever the device, which on
a CPU without native bf16 (AVX2-only) is ~50x slower than fp32, so its time axis there shows
that, not Muon). The embedding, head and gains take our AdamW groups in all four, at the
recipe's lrs: only what the optimizer choice changes is swept. For each optimizer, short runs at
three hidden-matrix lrs pick the one with the lowest final val loss; then each runs the full
length at its pick. MuonClip is
off, so the comparison is the optimizer alone. AdamW gets a 5% linear warmup and beta1 0.9.

--demo builds each run from configs/demo.toml (the byte-level demo data, the demo recipe). The
GPU default is model.CONFIGS["gpt124m-mla"] cut to d=384, 6 layers, 6 heads, on a folder of GPT-2
token shards, train_*.bin and val_*.bin (.devdata/corpus: a copy of a ~25M-token corpus).

Training goes through train.py's own build_optimizer, train_step and evaluate, so what is measured
is what `python train.py` runs. Wall time is runlog.TrainClock's: training only, validation left
out, compilation (with --compile) included. Writes a two-panel plot (val loss against tokens and
against seconds) and prints a table last, with the tokens each Muon needs to reach AdamW's final
val loss (Moonlight, arXiv 2502.16982, reports ~0.52x of AdamW's compute at its scale).
"""

import argparse
import math
import platform
import re
from pathlib import Path

import torch

import muon
import train
from bench.figure import plt, save
from config import Config, build_config, gpt_config, read_toml, validate
from data.demo import ensure_demo_shards
from data.tokenizer import GPT2_EOT_ID, bytes_tokenizer
from model import GPT
from runlog import TrainClock

# No tokenizer is loaded (the benchmark never decodes), so gpt2 needs no rank file.
VOCAB_SIZES = {"gpt2": GPT2_EOT_ID + 1, "bytes": bytes_tokenizer().n_vocab}

# "muon_options": ours with the options configs/demo.toml adopts (bench/optimizer_options measured
# them); "muon" and torch_muon run with them off, as the Muon of 2024.
OPTIONS = dict(normuon=True)

# The full-size run: sized so that 6 sweep runs and 2 full runs fit ~8 minutes of an H100 (eager, bf16).
FULL = dict(
    model=dict(preset="gpt124m-mla", n_layer=6, n_head=6, n_embd=384, kv_lora_rank=128),
    seq_len=1024, micro_batch_size=32, batch_tokens=65536, val_tokens=786432,
    sweep_steps=80, steps=300, eval_every=25,
    lrs={"muon": [0.02, 0.04, 0.08], "adamw": [1e-3, 2e-3, 4e-3], "torch_muon": [0.02, 0.04, 0.08],
         "muon_options": [0.02, 0.04, 0.08]},
)
# CPU: configs/demo.toml as it is, at half its length, sized to fit ~25 minutes on 2 cores.
DEMO = dict(
    base="configs/demo.toml", batch_tokens=4096, val_tokens=32768, seq_len=128,
    sweep_steps=80, steps=300, eval_every=25,
    lrs={"muon": [0.004, 0.008, 0.016], "adamw": [2e-3, 4e-3, 8e-3], "torch_muon": [0.008, 0.016],
         "muon_options": [0.004, 0.008, 0.016]},
)
# CPU smoke: the tiny preset on the demo bytes, a handful of steps.
SMOKE = dict(
    model=dict(preset="tiny-mla", block_size=64),
    seq_len=64, micro_batch_size=8, batch_tokens=512, val_tokens=2048,
    sweep_steps=4, steps=12, eval_every=4,
    lrs={"muon": [0.02, 0.05], "adamw": [3e-3, 1e-2], "torch_muon": [0.02, 0.05], "muon_options": [0.02, 0.05]},
)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the threads torch uses, for the tables' headers."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    models = re.findall(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), flags=re.M) \
        if Path("/proc/cpuinfo").exists() else []
    return f"CPU {models[0] if models else platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def make_config(plan: dict, data_dir: str, tokenizer: str, optimizer: str, lr: float, steps: int,
                compile: bool, device: torch.device, muon_clip: bool = False, tau: float = 100.0) -> Config:
    """A Config built the way a TOML file is, so presets and checks are train.py's. With
    plan["base"], that TOML file's recipe, else train.py's defaults with the plan's model and data.
    optimizer "torch_muon" is configured as "muon": train_run(torch_muon=True) swaps in torch.optim.Muon."""
    adamw = optimizer == "adamw"
    options = OPTIONS if optimizer == "muon_options" else dict.fromkeys(OPTIONS, False)
    optim = dict(optimizer="adamw" if adamw else "muon", lr=lr, muon_clip=muon_clip, muon_clip_tau=tau,
                 **options, **(dict(weight_decay=0.1, adamw_beta1=0.9) if adamw else {}))
    # Warmup helps AdamW, and short runs need the momentum warmup short too.
    schedule = dict(steps=steps, warmup_steps=max(1, steps // 20) if adamw else 0,
                    momentum_warmup_steps=min(300, steps // 4))
    train_keys = dict(batch_tokens=plan["batch_tokens"], compile=compile, bf16=device.type == "cuda")
    if "base" in plan:
        raw = read_toml(plan["base"])
        raw["data"].update(dir=data_dir, val_tokens=plan["val_tokens"])
    else:
        raw = {"model": dict(plan["model"]),
               "data": dict(dir=data_dir, train_files="train_*.bin", val_files="val_*.bin", tokenizer=tokenizer,
                            seq_len=plan["seq_len"], val_tokens=plan["val_tokens"]),
               "train": dict(micro_batch_size=plan["micro_batch_size"])}
    for section, values in (("optim", optim), ("schedule", schedule), ("train", train_keys),
                            ("log", dict(wandb="disabled"))):
        raw.setdefault(section, {}).update(values)
    return build_config(raw, "bench", [])


class TorchMuonReference:
    """torch.optim.Muon on the hidden matrices and our AdamW groups on the rest, stepped as one
    optimizer: train.set_schedule sets both kinds of group, train.train_step steps both."""

    def __init__(self, cfg: Config, model: GPT):
        ours = train.build_optimizer(cfg, model, model.lm_head.weight.device)
        hidden = [g for g in ours.param_groups if g["use_muon"]]
        o = cfg.optim
        self.muon = torch.optim.Muon([dict(params=g["params"], base_lr=g["base_lr"], use_muon=True) for g in hidden],
                                     lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum, nesterov=o.nesterov,
                                     adjust_lr_fn=o.lr_rule)
        self.adamw = muon.Muon([g for g in ours.param_groups if not g["use_muon"]])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)


def train_run(cfg: Config, device: torch.device, eval_every: int, probe_every: int = 0,
              probe: bool = False, on_step=None, torch_muon: bool = False) -> dict:
    """Train cfg from scratch with train.py's functions; returns the curves.

    val: [(step, tokens, train seconds, val loss)] every eval_every steps and at the end;
    train_loss, max_logit (the step's largest attention logit, measured before the step; only with
    probe or MuonClip) and clipped_heads (only with MuonClip): one value per step. on_step(step, model,
    batches, optimizer) runs after each optimizer step, off the clock, with that step's micro-batches.
    """
    vocab_size = VOCAB_SIZES[cfg.data.tokenizer]
    grad_accum = validate(cfg, 1, vocab_size)
    train_loader, val_loader = train.build_loaders(cfg, 0, 1, device, vocab_size)
    torch.manual_seed(cfg.train.seed)
    raw_model = GPT(gpt_config(cfg, vocab_size)).to(device)
    raw_model.choose_attention(torch.bfloat16 if cfg.train.bf16 else torch.float32)  # as train.py does
    optimizer = TorchMuonReference(cfg, raw_model) if torch_muon else train.build_optimizer(cfg, raw_model, device)
    model = torch.compile(raw_model) if cfg.train.compile else raw_model
    batches = RememberingLoader(train_loader)
    clock = TrainClock(device)
    val, losses, max_logits, clipped = [], [], [], []
    for step in range(cfg.schedule.steps + 1):
        if step % eval_every == 0 or step == cfg.schedule.steps:
            clock.stop()
            val.append((step, step * cfg.train.batch_tokens, clock.total, train.evaluate(model, val_loader, cfg, device)))
        if step == cfg.schedule.steps:
            break
        clock.start()
        batches.seen.clear()
        loss, _, step_max, step_clipped = train.train_step(model, raw_model, optimizer, batches, cfg, step, grad_accum,
                                                probe=probe or cfg.optim.muon_clip, measure_grad_norm=False)
        losses.append(loss)  # device tensors: one sync at the end, not one per step
        if step_max is not None:
            max_logits.append(step_max.max())
        if step_clipped is not None:
            clipped.append(step_clipped)
        if on_step is not None:
            clock.stop()
            on_step(step, raw_model, batches.seen, optimizer)
    clock.stop()
    return dict(cfg=cfg, val=val, train_loss=torch.stack(losses).tolist(),
                max_logit=torch.stack(max_logits).tolist() if max_logits else [],
                clipped_heads=torch.stack(clipped).tolist() if clipped else [], train_s=clock.total,
                params=raw_model.num_params(), params_non_embedding=raw_model.num_params(non_embedding=True))


class RememberingLoader:
    """The train loader, keeping the micro-batches handed out since seen was last cleared."""

    def __init__(self, loader):
        self.loader, self.seen = loader, []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loader)
        self.seen.append(batch)
        return batch


def tokens_to_reach(val: list, target: float) -> float:
    """Tokens at which a val curve first reaches target, linearly interpolated; nan if never."""
    for (_, t0, _, l0), (_, t1, _, l1) in zip(val, val[1:]):
        if l1 <= target:
            return t1 if l0 == l1 else t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return math.nan


def sweep(plan, args, device, optimizer: str) -> tuple[float, list]:
    """(best lr, [(lr, final val loss)]) from short runs; a diverged run counts as +inf."""
    results = []
    for lr in plan["lrs"][optimizer]:
        cfg = make_config(plan, args.data_dir, args.tokenizer, optimizer, lr, plan["sweep_steps"], args.compile, device)
        final = train_run(cfg, device, eval_every=plan["sweep_steps"], torch_muon=optimizer == "torch_muon")["val"][-1][3]
        final = final if math.isfinite(final) else math.inf  # nan: diverged
        print(f"  sweep {optimizer} lr {lr:g}: val loss {final:.4f}", flush=True)
        results.append((lr, final))
    return min(results, key=lambda r: r[1])[0], results


def plot(runs: dict, out: Path, title: str) -> None:
    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        _, tokens, seconds, losses = zip(*run["val"])
        label = f"{name} (lr {run['cfg'].optim.lr:g})"
        by_tokens.plot([t / 1e6 for t in tokens], losses, marker=".", label=label)
        by_time.plot(seconds, losses, marker=".", label=label)
    by_tokens.set(xlabel="training tokens (M)", ylabel="val loss")
    by_time.set(xlabel="training seconds (validation excluded)", ylabel="val loss")
    for ax in (by_tokens, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save(fig, out)


NAMES = {"muon": "ours (muon.Muon)", "adamw": "AdamW", "torch_muon": "torch.optim.Muon",
         "muon_options": "ours + " + " + ".join(OPTIONS)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--demo", action="store_true", help="configs/demo.toml's model and data (CPU, ~25 min)")
    preset.add_argument("--smoke", action="store_true", help="tiny model, demo data, a few steps (CPU)")
    parser.add_argument("--data-dir", default=None, help="shards train_*.bin, val_*.bin (default .devdata/corpus; "
                                                         "--demo, --smoke: data.demo's shards)")
    parser.add_argument("--steps", type=int, default=None, help="full-run steps (default: the plan's)")
    parser.add_argument("--sweep-steps", type=int, default=None)
    parser.add_argument("--optimizers", default="muon,adamw,torch_muon,muon_options",
                        help="which of muon, adamw, torch_muon, muon_options (ours with OPTIONS on)")
    parser.add_argument("--compile", action="store_true", help="torch.compile (each run compiles anew)")
    parser.add_argument("--out", default="bench/results/muon_vs_adamw.png")
    args = parser.parse_args(argv)
    plan = dict(DEMO if args.demo else SMOKE if args.smoke else FULL)
    plan["steps"] = args.steps or plan["steps"]
    plan["sweep_steps"] = args.sweep_steps or plan["sweep_steps"]
    names = args.optimizers.split(",")
    if "muon" not in names or "adamw" not in names or not set(names) <= set(NAMES):
        parser.error(f"--optimizers {args.optimizers}: muon and adamw, and any of torch_muon, muon_options")
    args.tokenizer = "gpt2" if not (args.demo or args.smoke) else "bytes"
    args.data_dir = args.data_dir or (str(ensure_demo_shards()) if args.demo or args.smoke else ".devdata/corpus")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")

    lrs = {name: plan["lrs"][name] for name in names}
    n_sweep = sum(len(v) for v in lrs.values())
    print(f"device: {device_name(device)}, torch {torch.__version__}")
    print(f"model: {plan.get('base') or plan['model']} | data: {args.data_dir} ({args.tokenizer}) | batch "
          f"{plan['batch_tokens']:,} tokens of seq {plan['seq_len']}")
    print(f"plan: sweep {n_sweep} runs x {plan['sweep_steps']} steps "
          f"({plan['sweep_steps'] * plan['batch_tokens']:,} tokens each): {lrs}; then {len(names)} runs x "
          f"{plan['steps']} steps ({plan['steps'] * plan['batch_tokens']:,} tokens each), val loss on "
          f"{plan['val_tokens']:,} tokens every {plan['eval_every']} steps; "
          f"{(n_sweep * plan['sweep_steps'] + len(names) * plan['steps']) * plan['batch_tokens']:,} training tokens in all",
          flush=True)

    best, sweeps, runs = {}, {}, {}
    for name in names:
        best[name], sweeps[name] = sweep(dict(plan, lrs=lrs), args, device, name)
    for name in names:
        cfg = make_config(plan, args.data_dir, args.tokenizer, name, best[name], plan["steps"], args.compile, device)
        runs[name] = train_run(cfg, device, eval_every=plan["eval_every"], torch_muon=name == "torch_muon")
        print(f"  full {name} lr {best[name]:g}: val loss {runs[name]['val'][-1][3]:.4f} "
              f"in {runs[name]['train_s']:.1f}s", flush=True)

    adamw = runs["adamw"]
    adamw_final, adamw_tokens = adamw["val"][-1][3], adamw["val"][-1][1]
    reach = {name: tokens_to_reach(run["val"], adamw_final) if name != "adamw" else adamw_tokens
             for name, run in runs.items()}
    out = Path(args.out)
    plot({NAMES[name]: run for name, run in runs.items()}, out,
         f"{device_name(device)}: {adamw['params'] / 1e6:.2f}M-parameter MLA, {plan['batch_tokens']:,} tokens/step")
    print(f"plot: {out}")
    print(f"\nmodel: {adamw['params'] / 1e6:.2f}M parameters ({adamw['params_non_embedding'] / 1e6:.2f}M without the "
          f"token embedding) | device: {device_name(device)}")
    print("\n| optimizer | lrs swept (final val loss) | best lr | final val loss | training s | tokens to AdamW's "
          "final val loss | vs AdamW |\n|---|---|---:|---:|---:|---:|---:|")
    for name, run in runs.items():
        swept = ", ".join(f"{lr:g} ({loss:.3f})" for lr, loss in sweeps[name])
        reached = f"{reach[name]:,.0f}" if math.isfinite(reach[name]) else "not reached"
        ratio = f"{reach[name] / adamw_tokens:.2f}x" if math.isfinite(reach[name]) else "-"
        print(f"| {NAMES[name]} | {swept} | {best[name]:g} | {run['val'][-1][3]:.4f} | {run['train_s']:.1f} | "
              f"{reached} | {ratio} |")
    ratio = reach["muon"] / adamw_tokens
    return dict(runs=runs, sweeps=sweeps, best=best, ratio=ratio, reach=reach, out=out)


if __name__ == "__main__":
    main()
