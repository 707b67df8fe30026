"""Memory of Muon against AdamW: optimizer-state bytes and the peak of a training step.

    python -m bench.memory                  # CUDA: the 124M MLA model (gpt124m-mla), micro-batch 16 x 1024, bf16
    python -m bench.memory --smoke          # CPU: tiny-mla, optimizer-state bytes only
    python -m bench.memory --smoke --preset gpt124m-mla   # CPU: the 124M model's optimizer-state bytes
    python -m bench.memory --micro-batch-size 8 --out bench/results/memory.png

Optimizer state is the sum of every tensor in optimizer.state after the first step, when it
exists. Muon keeps one fp32 momentum buffer per hidden matrix, and with NorMuon one fp32 number
per row (optim.normuon); AdamW keeps exp_avg and exp_avg_sq (the parameter's dtype) and a scalar
step per tensor; embedding, head and gains take AdamW in every run. Cautious weight decay and
per-head blocks keep no state. The reference for GPT-2-small (one H100, measured for this project): AdamW 1.30 GB, Muon on the matrices + AdamW on the
rest 0.96 GB. Peak memory is torch.cuda.max_memory_allocated over three train.train_step calls on
random tokens (weights, gradients, activations, optimizer state and the step's temporaries);
CUDA only, so a CPU run reports state bytes alone. Writes a bar plot, prints a table last.
"""

import argparse
import gc
from pathlib import Path

import torch

import train
from bench.figure import plt, save
from bench.muon_vs_adamw import VOCAB_SIZES, device_name, make_config
from config import Config, gpt_config
from model import GPT

FULL = dict(model=dict(preset="gpt124m-mla"), seq_len=1024, micro_batch_size=16)
SMOKE = dict(model=dict(preset="tiny-mla", block_size=64), seq_len=64, micro_batch_size=4)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t))


def expected_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """What muon.Muon should hold: 4 bytes per Muon weight (and per row with NorMuon); per AdamW
    tensor two moments and a 4-byte step."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if group["use_muon"]:
                total += 4 * p.numel() + (4 * p.size(0) if group["normuon"] else 0)
            else:
                total += 2 * p.numel() * p.element_size() + 4
    return total


def random_batches(cfg: Config, vocab_size: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    while True:
        tokens = torch.randint(0, vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1), generator=g)
        tokens = tokens.to(device)
        yield tokens[:, :-1], tokens[:, 1:]


def measure(plan: dict, optimizer_name: str, device: torch.device, steps: int, compile: bool) -> dict:
    """optimizer_name: "muon", "muon+normuon" or "adamw" on the hidden matrices."""
    plan = {**plan, "batch_tokens": plan["micro_batch_size"] * plan["seq_len"], "val_tokens": plan["seq_len"]}
    adamw = optimizer_name == "adamw"
    cfg = make_config(plan, "unused", "gpt2", optimizer_name.split("+")[0], 1e-3 if adamw else 0.02,
                      steps, compile, device)
    cfg.optim.normuon = optimizer_name == "muon+normuon"
    vocab_size = VOCAB_SIZES["gpt2"]
    torch.manual_seed(0)
    raw_model = GPT(gpt_config(cfg, vocab_size)).to(device)
    raw_model.choose_attention(torch.bfloat16 if cfg.train.bf16 else torch.float32)  # as train.py does
    optimizer = train.build_optimizer(cfg, raw_model, device)
    model = torch.compile(raw_model) if compile else raw_model
    batches = random_batches(cfg, vocab_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):  # the first step creates the state; later ones show the steady peak
        train.train_step(model, raw_model, optimizer, batches, cfg, step, 1, probe=False, measure_grad_norm=False)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    result = dict(optimizer=optimizer_name, params=raw_model.num_params(), state=state_bytes(optimizer),
                  expected=expected_state_bytes(optimizer), peak=peak,
                  muon_params=sum(p.numel() for g in optimizer.param_groups if g["use_muon"] for p in g["params"]),
                  muon_tensors=sum(len(g["params"]) for g in optimizer.param_groups if g["use_muon"]))
    del model, raw_model, optimizer, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def plot(rows: list, out: Path, title: str) -> None:
    metrics = [("state", "optimizer state")] + ([("peak", "peak allocated, train step")] if rows[0]["peak"] else [])
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(metrics))]
        values = [row[key] / 1e9 for key, _ in metrics]
        bars = ax.bar(xs, values, width, label=row["optimizer"])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(range(len(metrics)), [label for _, label in metrics])
    ax.set_ylabel("GB")
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save(fig, out)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: optimizer state only")
    parser.add_argument("--preset", default=None, help="a model.CONFIGS name instead of the plan's model")
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", default="bench/results/memory.png")
    args = parser.parse_args(argv)
    plan = dict(SMOKE if args.smoke else FULL)
    plan["micro_batch_size"] = args.micro_batch_size or plan["micro_batch_size"]
    if args.preset:
        plan["model"] = dict(preset=args.preset)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    print(f"device: {device_name(device)}, torch {torch.__version__}")
    print(f"model: {plan['model']}, micro-batch {plan['micro_batch_size']} x {plan['seq_len']}, {args.steps} steps"
          + ("" if device.type == "cuda" else "; peak memory is measured on CUDA only"), flush=True)
    rows = [measure(plan, name, device, args.steps, args.compile) for name in ("muon", "muon+normuon", "adamw")]
    out = Path(args.out)
    plot(rows, out, f"{device_name(device)}: {plan['model']['preset']}, {rows[0]['params'] / 1e6:.1f}M parameters")
    print(f"plot: {out}")
    print(f"\n{rows[0]['params'] / 1e6:.2f}M parameters, {rows[0]['muon_params'] / 1e6:.2f}M of them in hidden "
          f"matrices (Muon's) | device: {device_name(device)}")
    print("\n| optimizer on hidden matrices | optimizer state (GB) | expected by formula (GB) | "
          "optimizer state (bytes) | peak allocated in a train step (GB) |\n|---|---:|---:|---:|---:|")
    for row in rows:
        peak = f"{row['peak'] / 1e9:.3f}" if row["peak"] is not None else "n/a (CUDA only)"
        print(f"| {row['optimizer']} | {row['state'] / 1e9:.4f} | {row['expected'] / 1e9:.4f} | {row['state']:,} | {peak} |")
    return rows


if __name__ == "__main__":
    main()
