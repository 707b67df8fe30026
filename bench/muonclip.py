"""MuonClip: a run whose attention logits grow (high Muon lr, no clip) against the same run with tau.

    python -m bench.muonclip                 # CUDA: the ~30M MLA of bench/muon_vs_adamw on .devdata/corpus, ~3 min on an H100
    python -m bench.muonclip --demo          # CPU: configs/demo.toml pushed (2x lr, no decay), ~8 min on 2 cores
    python -m bench.muonclip --smoke         # CPU: tiny MLA on the byte-level demo data, seconds
    python -m bench.muonclip --lr 0.5 --tau 30 --steps 400 --out bench/results/muonclip.png

Both runs are identical (seed, data order, lr, schedule) except optim.muon_clip. The lr is far
above a good one on purpose: Muon's large, full-rank updates inflate the q and k weights, and
with them the attention logits (Kimi K2, arXiv 2507.20534).

What is measured, honestly: train.train_step reports each step's max logit from the forward
pass, BEFORE the optimizer step; MuonClip then rescales every head whose logit exceeded tau, by
tau / (that pre-step logit), after the step. So every --reprobe-every steps the batch just
trained on is run again through the updated, clipped weights (off the clock): its max logit is
tau for a clipped head only if the step itself did not move the logits; the step's own change
can leave it above tau (at a high lr, by a lot). A control row isolates the clip: one step with
every lr 0 from the same initial weights and batch, tau half their max logit; re-probed, the max
logit is tau (to rounding: fp32 on CPU, bf16 on CUDA). The table gives both maxima for each run,
the final train and val loss, and how many head-clips happened. Writes a two-panel plot (max logit per
step, log y; train loss per step), prints a table last.
"""

import argparse
import math
from pathlib import Path

import torch

import train
from bench.figure import plt, save
from bench.muon_vs_adamw import DEMO as DEMO_MODEL
from bench.muon_vs_adamw import FULL as FULL_MODEL
from bench.muon_vs_adamw import SMOKE as SMOKE_MODEL
from bench.muon_vs_adamw import device_name, make_config, train_run
from config import Config
from data.demo import ensure_demo_shards

FULL = {**FULL_MODEL, "batch_tokens": 32768, "val_tokens": 262144, "steps": 400, "lr": 0.5, "tau": 30.0,
        "reprobe_every": 10}
SMOKE = {**SMOKE_MODEL, "steps": 30, "lr": 0.5, "tau": 30.0, "reprobe_every": 1}
# The demo's recipe with twice its lr and no weight decay: the logits grow well past tau unclipped.
DEMO = {**DEMO_MODEL, "steps": 300, "lr": 0.016, "weight_decay": 0.0, "tau": 30.0, "reprobe_every": 10}


def reprober(cfg: Config, device: torch.device, every: int, probed: list):
    """An on_step hook: the max logit of the step's own micro-batches through the weights after the step."""

    @torch.no_grad()
    def probe(step, model, batches, optimizer):
        if step % every:
            return
        largest = -math.inf
        for x, y in batches:
            with train.autocast(cfg, device):
                _, max_logits = model(x, y, probe=True)
            largest = max(largest, max_logits.max().item())
        probed.append((step, largest))
    return probe


def plot(runs: dict, tau: float, out: Path, title: str) -> None:
    fig, (logits, losses) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, run), color in zip(runs.items(), ("tab:red", "tab:blue")):
        logits.plot(range(1, len(run["max_logit"]) + 1), run["max_logit"], color=color,
                    label=f"{name}: before each step")
        steps, probed = zip(*run["reprobed"])
        logits.plot([s + 1 for s in steps], probed, "x", color=color, markersize=4,
                    label=f"{name}: same batch, after step (+clip)")
        losses.plot(range(1, len(run["train_loss"]) + 1), run["train_loss"], color=color, label=name)
    logits.axhline(tau, color="k", linestyle=":", label=f"tau = {tau:g}")
    logits.set(xlabel="step", ylabel="max attention logit", yscale="log")
    losses.set(xlabel="step", ylabel="train loss")
    for ax in (logits, losses):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save(fig, out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--demo", action="store_true", help="configs/demo.toml, pushed (CPU, minutes)")
    preset.add_argument("--smoke", action="store_true", help="tiny model, demo data, a few steps (CPU)")
    parser.add_argument("--data-dir", default=None, help="default .devdata/corpus; --smoke: data.demo's shards")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="Muon's lr, high on purpose")
    parser.add_argument("--tau", type=float, default=None)
    parser.add_argument("--reprobe-every", type=int, default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", default="bench/results/muonclip.png")
    args = parser.parse_args(argv)
    plan = dict(DEMO if args.demo else SMOKE if args.smoke else FULL)
    for key in ("steps", "lr", "tau", "reprobe_every"):
        plan[key] = getattr(args, key) or plan[key]
    tokenizer = "bytes" if args.smoke or args.demo else "gpt2"
    data_dir = args.data_dir or (str(ensure_demo_shards()) if args.smoke or args.demo else ".devdata/corpus")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    print(f"device: {device_name(device)}, torch {torch.__version__}")
    print(f"plan: {plan.get('base') or plan['model']} on {data_dir} ({tokenizer}), Muon lr {plan['lr']:g}, {plan['steps']} steps of "
          f"{plan['batch_tokens']:,} tokens, twice: no clip, then MuonClip tau {plan['tau']:g}; the max logit probed "
          f"every step, re-probed after the step every {plan['reprobe_every']}", flush=True)

    runs = {}
    for name, clip in (("no clip", False), (f"MuonClip tau={plan['tau']:g}", True)):
        cfg = make_config(plan, data_dir, tokenizer, "muon", plan["lr"], plan["steps"], args.compile, device,
                          muon_clip=clip, tau=plan["tau"])
        if "weight_decay" in plan:
            cfg.optim.weight_decay = plan["weight_decay"]
        probed = []
        run = train_run(cfg, device, eval_every=plan["steps"], probe=True,
                        on_step=reprober(cfg, device, plan["reprobe_every"], probed))
        runs[name] = {**run, "reprobed": probed}
        print(f"  {name}: max logit {max(run['max_logit']):.1f}, final val loss {run['val'][-1][3]:.4f}", flush=True)

    # The clip alone: one step with every lr 0, so the step moves nothing, on the no-clip run's
    # first batch and initial weights (same seed), tau half their max logit: re-probed, it is tau.
    control_tau = runs["no clip"]["max_logit"][0] / 2
    cfg = make_config(plan, data_dir, tokenizer, "muon", 0.0, 1, args.compile, device, muon_clip=True, tau=control_tau)
    cfg.optim.embed_lr = cfg.optim.head_lr = cfg.optim.scalar_lr = 0.0
    probed = []
    control = train_run(cfg, device, eval_every=1, probe=True, on_step=reprober(cfg, device, 1, probed))
    control = {**control, "reprobed": probed}

    out = Path(args.out)
    plot(runs, plan["tau"], out, f"{device_name(device)}: {next(iter(runs.values()))['params'] / 1e6:.1f}M-parameter "
                                 f"MLA, Muon lr {plan['lr']:g}")
    print(f"plot: {out}")
    last = max(1, plan["steps"] // 10)
    rounding = 1e-3 if device.type == "cpu" else 1e-2  # fp32 logits on a CPU, bf16 under CUDA autocast
    print(f"\ndevice: {device_name(device)} | final train loss: mean of the last {last} steps")
    print("| run | max logit before a step (train.py's) | max logit re-probed after step + clip | "
          f"re-probed <= tau (1 + {rounding:g})? | head clips | final train loss | final val loss |\n"
          "|---|---:|---:|---|---:|---:|---:|")
    rows = [(name, run, plan["tau"]) for name, run in runs.items()]
    rows.append((f"control: the clip alone (all lrs 0, 1 step, tau={control_tau:.3g})", control, control_tau))
    for name, run, tau in rows:
        reprobed = max(logit for _, logit in run["reprobed"])
        within = f"{'yes' if reprobed <= tau * (1 + rounding) else 'no'} ({reprobed / tau:.4f} tau)"
        clips = int(sum(run["clipped_heads"])) if run["clipped_heads"] else "-"
        before = max(run["max_logit"])
        print(f"| {name} | {before:.2f} ({before / tau:.3f} tau) | {reprobed:.2f} | {within} | {clips} | "
              f"{sum(run['train_loss'][-last:]) / len(run['train_loss'][-last:]):.4f} | {run['val'][-1][3]:.4f} |")
    return dict(runs=runs, control=control, control_tau=control_tau, tau=plan["tau"], out=out)


if __name__ == "__main__":
    main()
