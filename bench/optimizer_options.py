"""Muon's options on the demo, side by side: today's recipe, each option alone, combinations.

    python -m bench.optimizer_options                          # every variant below, seeds 0 and 1, 2 at a time
    python -m bench.optimizer_options --variants muon normuon --seeds 0
    python -m bench.optimizer_options --table-only             # the table and plot of the runs already done

Each run is `python train.py --config configs/demo.toml` plus the variant's overrides and a seed
(weight init and data order), so what is measured is what the demo runs: 600 steps, the same
train and val tokens, MuonClip on. Runs go to runs/options/<variant>-s<seed>; a run whose
metrics.jsonl already holds its last val loss is not run again. With --jobs 2 each run gets
OMP_NUM_THREADS=1 (two torch processes with a full OpenMP team each fight over the cores).
Prints a table (val loss at the last step per seed, mean, and the change from today's recipe)
and writes a plot of the val curves and the final losses.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.figure import plt, save

# name -> train.py overrides on top of configs/demo.toml. "muon" is the recipe before NorMuon
# became the default: every variant says whether NorMuon is on.
OFF = "--optim.normuon=false"
VARIANTS = {
    "muon": [OFF],
    "normuon": ["--optim.normuon"],
    "normuon-larger": ["--optim.normuon", "--optim.normuon_axis=larger"],
    "cautious": [OFF, "--optim.cautious_weight_decay"],
    "per-head": [OFF, "--optim.per_head"],
    "clip-alpha-1": [OFF, "--optim.muon_clip_alpha=1.0"],
    "normuon+cautious": ["--optim.normuon", "--optim.cautious_weight_decay"],
    "normuon+per-head": ["--optim.normuon", "--optim.per_head"],
    "all": ["--optim.normuon", "--optim.cautious_weight_decay", "--optim.per_head"],
    # NorMuon re-swept: its per-neuron normalisation changes which entries the step moves most.
    "normuon-lr0.006": ["--optim.normuon", "--optim.lr=0.006"],
    "normuon-lr0.011": ["--optim.normuon", "--optim.lr=0.011"],
    "normuon-lr0.016": ["--optim.normuon", "--optim.lr=0.016"],
    # NorMuon with Polar Express, the pair in modded-nanogpt's and nanochat's optimizers.
    "normuon+polar": ["--optim.normuon", "--optim.ns_coefficients=polar_express"],
    "normuon-larger+polar": ["--optim.normuon", "--optim.normuon_axis=larger", "--optim.ns_coefficients=polar_express"],
}


def run_dir(root: Path, name: str, seed: int) -> Path:
    return root / f"{name}-s{seed}"


def val_curve(path: Path) -> dict[int, float]:
    """step -> val loss from a run's metrics.jsonl ({} if there is none yet)."""
    curve = {}
    if (path / "metrics.jsonl").exists():
        for line in (path / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if "val/loss" in row:
                curve[row["step"]] = row["val/loss"]
    return curve


def command(name: str, overrides: list[str], seed: int, root: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "train.py", "--config", "configs/demo.toml", f"--train.seed={seed}",
            f"--train.run_dir={run_dir(root, name, seed)}", "--log.wandb=disabled", *overrides, *extra]


def run_all(jobs: list[tuple[str, int]], root: Path, steps: int, parallel: int, extra: list[str]) -> None:
    """Runs each (variant, seed) not yet finished, `parallel` at a time."""
    todo = [(n, s) for n, s in jobs if steps not in val_curve(run_dir(root, n, s))]
    env = dict(os.environ, OMP_NUM_THREADS="1") if parallel > 1 else dict(os.environ)
    running: list[tuple[subprocess.Popen, str, float]] = []
    while todo or running:
        while todo and len(running) < parallel:
            name, seed = todo.pop(0)
            out = run_dir(root, name, seed)
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "stdout.txt", "w")
            proc = subprocess.Popen(command(name, VARIANTS[name], seed, root, extra), stdout=log,
                                    stderr=subprocess.STDOUT, env=env)
            running.append((proc, f"{name} seed {seed}", time.time()))
            print(f"started {name} seed {seed}", flush=True)
        time.sleep(2)
        for entry in [r for r in running if r[0].poll() is not None]:
            proc, label, start = entry
            running.remove(entry)
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see its stdout.txt)"
            print(f"{label}: {status} in {time.time() - start:.0f} s", flush=True)


def table(names: list[str], seeds: list[int], root: Path, steps: int) -> list[dict]:
    rows = []
    for name in names:
        finals = [val_curve(run_dir(root, name, s)).get(steps) for s in seeds]
        done = [f for f in finals if f is not None]
        rows.append(dict(name=name, finals=finals, mean=sum(done) / len(done) if done else None,
                         spread=max(done) - min(done) if len(done) > 1 else None))
    # "vs muon": against muon's mean over the same seeds, so a one-seed row meets its own seed.
    base_finals = dict(zip(seeds, next((r["finals"] for r in rows if r["name"] == "muon"), [None] * len(seeds))))
    seed_cols = " | ".join(f"seed {s}" for s in seeds)
    print(f"\n| variant | overrides | {seed_cols} | mean | spread | vs muon, same seeds |")
    print("|---|---|" + "---:|" * (len(seeds) + 3))
    for r in rows:
        cells = " | ".join("—" if f is None else f"{f:.4f}" for f in r["finals"])
        mean = "—" if r["mean"] is None else f"{r['mean']:.4f}"
        spread = "—" if r["spread"] is None else f"{r['spread']:.4f}"
        pairs = [(f, base_finals[s]) for f, s in zip(r["finals"], seeds) if f is not None and base_finals[s] is not None]
        delta = f"{sum(f - b for f, b in pairs) / len(pairs):+.4f}" if pairs else "—"
        print(f"| {r['name']} | {' '.join(VARIANTS[r['name']])} | {cells} | {mean} | {spread} | {delta} |")
    return rows


def plot(names: list[str], seeds: list[int], root: Path, rows: list[dict], out: Path) -> None:
    fig, (curves, finals) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in names:
        per_seed = [val_curve(run_dir(root, name, s)) for s in seeds]
        steps = sorted(set.intersection(*(set(c) for c in per_seed))) if all(per_seed) else []
        steps = [s for s in steps if s >= 200]  # the early losses dwarf the differences
        if steps:
            curves.plot(steps, [sum(c[s] for c in per_seed) / len(per_seed) for s in steps], marker="o", label=name)
    curves.set_xlabel("step")
    curves.set_ylabel(f"val loss (mean of seeds {', '.join(map(str, seeds))})")
    if curves.lines:
        curves.legend(fontsize=8)
    for i, r in enumerate(rows):
        done = [f for f in r["finals"] if f is not None]
        finals.scatter([i] * len(done), done, color="C0")
        if r["mean"] is not None:
            finals.hlines(r["mean"], i - 0.3, i + 0.3, color="C1")
    finals.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=30, ha="right", fontsize=8)
    finals.set_ylabel("val loss at the last step (dots: seeds, bar: mean)")
    fig.suptitle("Muon's options on configs/demo.toml (600 steps, MuonClip on)")
    fig.tight_layout()
    save(fig, out)
    print(f"wrote {out}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each with OMP_NUM_THREADS=1 if > 1)")
    parser.add_argument("--root", default="runs/options", help="where the runs go")
    parser.add_argument("--steps", type=int, default=600, help="configs/demo.toml's schedule.steps")
    parser.add_argument("--out", default="bench/results/optimizer_options.png")
    parser.add_argument("--table-only", action="store_true", help="run nothing: table and plot of what is there")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more train.py overrides for every run, e.g. --extra --schedule.steps=20")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not args.table_only:
        run_all([(n, s) for n in args.variants for s in args.seeds], root, args.steps, args.jobs, args.extra)
    rows = table(args.variants, args.seeds, root, args.steps)
    plot(args.variants, args.seeds, root, rows, Path(args.out))
    return rows


if __name__ == "__main__":
    main()
