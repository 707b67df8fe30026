"""The demo's variants side by side: what bench.optimizer_options and bench.recipe both run.

Each run is `python train.py --config CONFIG` plus the variant's overrides and a seed (weight init
and data order), so what is measured is what the demo runs: the same train and val tokens, the
same steps. Runs go to <root>/<variant>-s<seed>; a run whose metrics.jsonl already holds its last
val loss is not run again. With --jobs 2 each run gets OMP_NUM_THREADS=1 (two torch processes with
a full OpenMP team each fight over the cores). Prints a table (val loss at the last step per seed,
mean, spread, and the change from the baseline variant on the same seeds) and writes a plot of the
val curves and the final losses.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.figure import plt, save


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


def command(config: str, overrides: list[str], seed: int, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "train.py", "--config", config, f"--train.seed={seed}", f"--train.run_dir={out}",
            "--log.wandb=disabled", *overrides, *extra]


def run_all(variants: dict, config: str, jobs: list[tuple[str, int]], root: Path, steps: int, parallel: int,
            extra: list[str]) -> None:
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
            proc = subprocess.Popen(command(config, variants[name], seed, out, extra), stdout=log,
                                    stderr=subprocess.STDOUT, env=env)
            running.append((proc, f"{name} seed {seed}", time.time()))
            print(f"started {name} seed {seed}", flush=True)
        time.sleep(2)
        for entry in [r for r in running if r[0].poll() is not None]:
            proc, label, start = entry
            running.remove(entry)
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see its stdout.txt)"
            print(f"{label}: {status} in {time.time() - start:.0f} s", flush=True)


def table(variants: dict, baseline: str, names: list[str], seeds: list[int], root: Path, steps: int) -> list[dict]:
    rows = []
    for name in names:
        finals = [val_curve(run_dir(root, name, s)).get(steps) for s in seeds]
        done = [f for f in finals if f is not None]
        rows.append(dict(name=name, finals=finals, mean=sum(done) / len(done) if done else None,
                         spread=max(done) - min(done) if len(done) > 1 else None))
    # "vs baseline": against the baseline's mean over the same seeds, so a one-seed row meets its own seed.
    base_finals = dict(zip(seeds, next((r["finals"] for r in rows if r["name"] == baseline), [None] * len(seeds))))
    seed_cols = " | ".join(f"seed {s}" for s in seeds)
    print(f"\n| variant | overrides | {seed_cols} | mean | spread | vs {baseline}, same seeds |")
    print("|---|---|" + "---:|" * (len(seeds) + 3))
    for r in rows:
        cells = " | ".join("—" if f is None else f"{f:.4f}" for f in r["finals"])
        mean = "—" if r["mean"] is None else f"{r['mean']:.4f}"
        spread = "—" if r["spread"] is None else f"{r['spread']:.4f}"
        pairs = [(f, base_finals[s]) for f, s in zip(r["finals"], seeds) if f is not None and base_finals[s] is not None]
        delta = f"{sum(f - b for f, b in pairs) / len(pairs):+.4f}" if pairs else "—"
        print(f"| {r['name']} | {' '.join(variants[r['name']])} | {cells} | {mean} | {spread} | {delta} |")
    return rows


def plot(names: list[str], seeds: list[int], root: Path, rows: list[dict], out: Path, title: str) -> None:
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
    fig.suptitle(title)
    fig.tight_layout()
    save(fig, out)
    print(f"wrote {out}")


def main(argv, variants: dict, baseline: str, title: str, root: str, out: str, doc: str,
         config: str = "configs/demo.toml", steps: int = 600) -> list[dict]:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(variants), default=list(variants))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each with OMP_NUM_THREADS=1 if > 1)")
    parser.add_argument("--config", default=config, help="the TOML file every run starts from")
    parser.add_argument("--root", default=root, help="where the runs go")
    parser.add_argument("--steps", type=int, default=steps, help="the config's schedule.steps")
    parser.add_argument("--out", default=out)
    parser.add_argument("--table-only", action="store_true", help="run nothing: table and plot of what is there")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more train.py overrides for every run, e.g. --extra --schedule.steps=20")
    args = parser.parse_args(argv)
    root_dir = Path(args.root)
    if not args.table_only:
        run_all(variants, args.config, [(n, s) for n in args.variants for s in args.seeds], root_dir, args.steps,
                args.jobs, args.extra)
    rows = table(variants, baseline, args.variants, args.seeds, root_dir, args.steps)
    plot(args.variants, args.seeds, root_dir, rows, Path(args.out), title)
    return rows
