"""Is momentum almost low-rank? The spectrum of what each optimizer steps along, during one demo run each.

    python -m bench.spectrum                     # CPU: configs/demo.toml with Muon, then with AdamW, ~10 min on 2 cores
    python -m bench.spectrum --smoke             # CPU: a few steps of a tiny model, seconds
    python -m bench.spectrum --steps 300 --every 25 --out bench/results/spectrum.png

Every --every steps, for every hidden matrix of the model (24 in the demo: 4 layers x wq, wkv_a,
wkv_b, wo, fc, proj), train.spectrum measures the stable rank ||M||_F^2 / ||M||_2^2 (1 for a
rank-one matrix, min(A, B) for an orthogonal one) and the share of ||M||_F^2 in the top 3
singular values, of: Muon's momentum buffer M; Muon's orthogonalised momentum NS(M), the
direction it steps along (the update itself adds Nesterov's gradient term, which is gone by the
time the step has ended); and, in a second run with optim.optimizer = "adamw", AdamW's first
moment exp_avg. The claim under test (Keller Jordan's Muon write-up, and Moonlight, arXiv
2502.16982): gradient and momentum matrices of transformers have a very low stable rank, a few
directions dominating, and orthogonalisation spreads the step over all of them. Writes a plot of
the stable rank over training (median over the matrices) and prints a table last, per matrix
kind at the last measurement (mean over layers).
"""

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import torch

import muon
import runlog
import train
from bench.figure import plt, save
from bench.muon_vs_adamw import device_name, train_run
from config import Config, build_config, read_toml
from data.demo import ensure_demo_shards


def demo_config(optimizer: str, lr: float, steps: int, smoke: bool) -> Config:
    overrides = [("optim.optimizer", optimizer), ("optim.lr", str(lr)), ("schedule.steps", str(steps)),
                 ("log.wandb", "disabled"), ("data.dir", str(ensure_demo_shards()))]
    if smoke:
        overrides += [("model.n_layer", "2"), ("model.n_embd", "64"), ("data.seq_len", "32"),
                      ("train.batch_tokens", "256"), ("train.micro_batch_size", "8"), ("data.val_tokens", "256")]
    return build_config(read_toml("configs/demo.toml"), "configs/demo.toml", overrides)


def recorder(every: int, rows: list):
    """An on_step hook: the spectra of every hidden matrix's first moment (and NS of it, for Muon)."""

    @torch.no_grad()
    def record(step, model, batches, optimizer):
        if (step + 1) % every:
            return
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}  # value embeddings
        for group in optimizer.param_groups:
            if group.get("param_names") is None or not any(n.startswith("blocks.") for n in group["param_names"]):
                continue
            for name, p in zip(group["param_names"], group["params"]):
                state = optimizer.state.get(p, {})
                moment = state.get("momentum_buffer", state.get("exp_avg"))
                if p.ndim != 2 or id(p) in embeddings or moment is None or not moment.any():  # gains; no gradient yet
                    continue
                kind = name.split(".")[-2]  # blocks.3.attn.wkv_b.weight -> wkv_b
                rank, top3 = runlog.spectrum(moment)
                row = dict(step=step + 1, kind=kind, shape=tuple(p.shape), moment_rank=rank, moment_top3=top3)
                if group["use_muon"]:
                    ns = muon.newton_schulz(moment, group["ns_coefficients"], group["ns_steps"], dtype=group["ns_dtype"])
                    row["update_rank"] = runlog.spectrum(ns)[0]
                rows.append(row)
    return record


def plot(curves: dict, out: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        steps = sorted(points)
        ax.plot(steps, [statistics.median(points[s]) for s in steps], marker=".", label=label)
    ax.set(xlabel="step", ylabel="stable rank ||M||_F^2 / ||M||_2^2 (median over matrices)", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save(fig, out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny model for a few steps (CPU, seconds)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the demo's 600; smoke 8)")
    parser.add_argument("--every", type=int, default=None, help="steps between measurements (default 50; smoke 4)")
    parser.add_argument("--muon-lr", type=float, default=None, help="default: configs/demo.toml's")
    parser.add_argument("--adamw-lr", type=float, default=4e-3, help="AdamW lr; 2e-3 and 4e-3 tie in the demo sweep (README)")
    parser.add_argument("--out", default="bench/results/spectrum.png")
    args = parser.parse_args(argv)
    steps = args.steps or (8 if args.smoke else 600)
    every = args.every or (4 if args.smoke else 50)
    muon_lr = args.muon_lr or read_toml("configs/demo.toml")["optim"]["lr"]
    device = torch.device("cpu")
    print(f"device: {device_name(device)}, torch {torch.__version__}")

    rows = {}
    for optimizer, lr in (("muon", muon_lr), ("adamw", args.adamw_lr)):
        cfg = demo_config(optimizer, lr, steps, args.smoke)
        print(f"run: configs/demo.toml with optim.optimizer = {optimizer}, lr {lr:g}, {steps} steps, spectra every "
              f"{every}", flush=True)
        rows[optimizer] = []
        run = train_run(cfg, device, eval_every=steps, on_step=recorder(every, rows[optimizer]))
        print(f"  final val loss {run['val'][-1][3]:.4f}", flush=True)

    curves = defaultdict(lambda: defaultdict(list))
    for label, optimizer, key in (("AdamW first moment", "adamw", "moment_rank"),
                                  ("Muon momentum M", "muon", "moment_rank"),
                                  ("Muon orthogonalised NS(M)", "muon", "update_rank")):
        for row in rows[optimizer]:
            curves[label][row["step"]].append(row[key])
    out = Path(args.out)
    plot(curves, out, f"{device_name(device)}: stable rank of each optimizer's step direction, configs/demo.toml")
    print(f"plot: {out}")

    last = {opt: max(r["step"] for r in rows[opt]) for opt in rows}
    kinds = list(dict.fromkeys(r["kind"] for r in rows["muon"]))
    mean = lambda opt, kind, key: statistics.mean(r[key] for r in rows[opt] if r["kind"] == kind and r["step"] == last[opt])
    print(f"\nstep {last['muon']} (mean over layers) | device: {device_name(device)}")
    print("| matrix | shape | full rank | AdamW m1 stable rank | Muon M stable rank | Muon M top-3 energy | "
          "Muon NS(M) stable rank |\n|---|---|---:|---:|---:|---:|---:|")
    table = []
    for kind in kinds:
        shape = next(r["shape"] for r in rows["muon"] if r["kind"] == kind)
        row = dict(kind=kind, shape=shape, full=min(shape), adamw=mean("adamw", kind, "moment_rank"),
                   momentum=mean("muon", kind, "moment_rank"), top3=mean("muon", kind, "moment_top3"),
                   update=mean("muon", kind, "update_rank"))
        table.append(row)
        print(f"| {kind} | {shape[0]}x{shape[1]} | {row['full']} | {row['adamw']:.1f} | {row['momentum']:.1f} | "
              f"{row['top3']:.2f} | {row['update']:.1f} |")
    return dict(rows=rows, table=table, out=out)


if __name__ == "__main__":
    main()
