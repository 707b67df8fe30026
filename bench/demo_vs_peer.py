"""The demo against its yardstick (bench/peer.py: a plain GPT with torch.optim.Muon), side by side.

    python -m bench.demo_vs_peer                      # quality and speed, ~12 min on 2 CPU cores
    python -m bench.demo_vs_peer --skip-quality       # speed only, ~5 min
    python -m bench.demo_vs_peer --skip-speed         # quality only, ~7 min
    python -m bench.demo_vs_peer --peer-lr 0.008 --runs 3 --speed-steps 100

Quality: `python train.py --config configs/demo.toml` as a user runs it (600 steps, MuonClip on),
and the peer at --peer-lr (the best of its sweep, 0.004 / 0.008 / 0.016), on the same demo shards,
batches and val tokens; the final val loss of each.

Speed: the whole process, start to exit, of --speed-steps steps of each, --runs times in turn
(so a busy machine slows all alike), median seconds. Three rows: ours; the peer as it is; and the
peer with torch.optim.Muon's Newton-Schulz patched from its fixed bf16 to fp32 (bench.peer
--fp32-newton-schulz), because on a CPU without native bf16 (AVX2-only) bf16 matmuls run ~50x
slower than fp32 and would otherwise be all the peer's time (on one with AVX512-BF16 the two peer
rows are alike). Both processes run with W&B off. Prints a table last.
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench.muon_vs_adamw import device_name
from data.demo import ensure_demo_shards

DEMO = ["train.py", "--config", "configs/demo.toml", "--log.wandb", "disabled"]
PEER = ["-m", "bench.peer"]


def run(args: list[str]) -> tuple[float, str]:
    """(seconds, stdout) of one Python process."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return seconds, result.stdout


def final_val_loss(stdout: str) -> float:
    return float(re.findall(r"val loss ([\d.]+)", stdout)[-1])


def print_quality(quality: dict) -> None:
    if quality:
        print("\n| run (600 steps x 4,096 tokens, val on 32,768 tokens) | final val loss | process s |\n|---|---:|---:|")
        for name, (loss, seconds) in quality.items():
            print(f"| {name} | {loss:.4f} | {seconds:.0f} |")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-lr", type=float, default=0.008)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--speed-steps", type=int, default=100)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args(argv)
    if args.skip_quality and args.skip_speed:
        parser.error("--skip-quality and --skip-speed together leave nothing to run")
    ensure_demo_shards()  # built once, outside every timing
    print(f"device: {device_name(torch.device('cpu'))}, torch {torch.__version__}", flush=True)

    quality = {}
    if not args.skip_quality:
        with tempfile.TemporaryDirectory() as run_dir:
            seconds, out = run(DEMO + ["--train.run_dir", run_dir])
        quality["ours: python train.py --config configs/demo.toml"] = (final_val_loss(out), seconds)
        seconds, out = run(PEER + ["--lr", str(args.peer_lr)])
        quality[f"peer: python -m bench.peer --lr {args.peer_lr:g}"] = (final_val_loss(out), seconds)
        for name, (loss, seconds) in quality.items():
            print(f"  {name}: val loss {loss:.4f} ({seconds:.0f}s)", flush=True)

    if args.skip_speed:
        print_quality(quality)
        return dict(quality=quality)
    steps = str(args.speed_steps)
    commands = {
        "ours (configs/demo.toml)": DEMO + ["--schedule.steps", steps, "--log.val_every", steps,
                                            "--log.sample_every", steps],
        "peer, torch.optim.Muon as it is (bf16 NS)": PEER + ["--steps", steps, "--eval-every", steps],
        "peer, its NS patched to fp32": PEER + ["--steps", steps, "--eval-every", steps, "--fp32-newton-schulz"],
    }
    times = {name: [] for name in commands}
    for i in range(args.runs):
        for name, command in commands.items():
            if command[0] == "train.py":
                with tempfile.TemporaryDirectory() as run_dir:
                    seconds, _ = run(command + ["--train.run_dir", run_dir])
            else:
                seconds, _ = run(command)
            times[name].append(seconds)
            print(f"  run {i + 1}: {name}: {seconds:.1f}s", flush=True)

    print_quality(quality)
    ours = statistics.median(times["ours (configs/demo.toml)"])
    print(f"\n| {args.speed_steps} steps, whole process, median of {args.runs} | seconds | ours / this |\n|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {ours / median:.2f}x |")
    return dict(quality=quality, times=times)


if __name__ == "__main__":
    main()
