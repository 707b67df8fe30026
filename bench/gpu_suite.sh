#!/usr/bin/env bash
# Every GPU benchmark in one command, for a session that has a GPU for a few minutes.
#
#   bash bench/gpu_suite.sh                 # logs and plots to bench/results/gpu/ (or $OUT if set)
#
# Needs CUDA, the ~25M-token GPT-2 corpus in .devdata/corpus (train_*.bin, val_*.bin) and GPT-2's
# rank file at .devdata/r50k_base.tiktoken (no network is assumed). Each benchmark runs under its
# own time limit, its output kept in LOG_DIR/NAME.log, so one that fails or runs long costs only
# itself. The budget is ~9 minutes on one H100 (unmeasured: no GPU has run it yet). The last thing
# printed is one table: device, date, and each figure against its goal.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${OUT:-bench/results/gpu}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
CORPUS=.devdata/corpus
RANKS=.devdata/r50k_base.tiktoken

run() {  # run NAME SECONDS COMMAND...: the command's output to LOG_DIR/NAME.log, and its exit status noted
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
    echo "exit $?" >>"$LOG_DIR/$name.log"
    tail -n 3 "$LOG_DIR/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG_DIR/device.txt"
run optimizer_step 60 python -m bench.optimizer_step --compile
run probe 60 python -m bench.probe
run newton_schulz 60 python -m bench.newton_schulz --out "$LOG_DIR/newton_schulz.png"
run train_throughput 150 python -m bench.train_throughput --data.tokenizer_file="$RANKS" --steps 8 --warmup 3
run memory 60 python -m bench.memory --out "$LOG_DIR/memory.png"
# train.py itself: 50 steps of configs/gpu.toml on the corpus, compiled; recompiles are logged.
run train_gpu 120 env TORCH_LOGS=recompiles python train.py --config configs/gpu.toml --data.dir "$CORPUS" \
    --data.train_files 'train_*.bin' --data.val_files 'val_*.bin' --data.val_tokens 524288 \
    --data.tokenizer_file "$RANKS" --schedule.steps 50 --log.val_every 0 --log.sample_every 0 \
    --log.heatmap_every 0 --log.hellaswag_every 0 --train.checkpoint_every 0 --train.run_dir "$LOG_DIR/run_gpu" \
    --log.wandb disabled
run muonclip 90 python -m bench.muonclip --data-dir "$CORPUS" --steps 150 --out "$LOG_DIR/muonclip.png"
run muon_vs_adamw 150 python -m bench.muon_vs_adamw --data-dir "$CORPUS" --steps 150 --sweep-steps 40 \
    --out "$LOG_DIR/muon_vs_adamw.png"

python - "$LOG_DIR" <<'PY'
"""The figures against their goals, read back from the logs."""
import datetime, pathlib, re, sys

logs = pathlib.Path(sys.argv[1])
def text(name):
    path = logs / f"{name}.log"
    return path.read_text() if path.exists() else ""

def cell(pattern, name, group=1):
    match = re.search(pattern, text(name), flags=re.M)
    return float(match.group(group).replace(",", "")) if match else None

step_ms = cell(r"^\| muon\.Muon step \(classic\), compiled \| ([\d.]+) \|", "optimizer_step")
torch_ms = cell(r"^\| torch\.optim\.Muon \+ fused AdamW \| ([\d.]+) \|", "optimizer_step")
tokens = cell(r"^probe off\s+[\d.]+\s+([\d,]+)\s", "train_throughput")
mfu = cell(r"^probe off\s+[\d.]+\s+[\d,]+\s+([\d.]+)%", "train_throughput")
clip = cell(r"^probe \+ MuonClip\s+.*?([+-][\d.]+)%$", "train_throughput")
recompiles = text("train_gpu").count("Recompiling function")
backend = re.search(r"attention: (\w+)", text("train_gpu"))
rows = [
    ("optimizer step, 124M-size matrices + AdamW (ms)", step_ms, "<= 8", step_ms is not None and step_ms <= 8),
    ("torch.optim.Muon + fused AdamW, same step (ms)", torch_ms, "reference", None),
    ("124M MLA training, probe off (tokens/s)", tokens, ">= 515,000", tokens is not None and tokens >= 515_000),
    ("124M MLA training, probe off (MFU %)", mfu, ">= 45", mfu is not None and mfu >= 45),
    ("probe + MuonClip cost (% of a step)", clip, "<= 5", clip is not None and clip <= 5),
    ("train.py gpu.toml 50 steps: recompiles after warm-up", recompiles, "0", recompiles == 0),
    ("train.py gpu.toml: attention backend", backend.group(1) if backend else None, "cudnn", bool(backend) and backend.group(1) == "cudnn"),
]
device = (logs / "device.txt").read_text().strip() if (logs / "device.txt").exists() else "unknown"
print(f"\ndevice: {device} | date: {datetime.date.today()}")
print("| figure | measured | goal | met |\n|---|---:|---|---|")
for name, value, goal, met in rows:
    shown = "not measured" if value is None else (f"{value:,.2f}" if isinstance(value, float) else str(value))
    print(f"| {name} | {shown} | {goal} | {'-' if met is None else 'yes' if met else 'no'} |")
PY
