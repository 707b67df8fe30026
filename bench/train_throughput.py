"""Tokens/s and MFU of train.py's real training step, with the max-logit probe off, on, and with MuonClip.

    python -m bench.train_throughput                          # configs/gpu.toml: 124M MLA, seq 1024, compile, bf16
    python -m bench.train_throughput --data.tokenizer_file=.devdata/r50k_base.tiktoken              # offline
    python -m bench.train_throughput --config configs/demo.toml --steps 3 --warmup 1                # CPU smoke check
    python -m bench.train_throughput --train.micro_batch_size=64                                    # any config key

One process on one device (CUDA if present). Each mode runs --warmup untimed steps (torch.compile
compiles each probe variant there), then --steps timed steps of train.train_step: the config's
global batch through gradient accumulation, bf16 autocast, Muon, and for the last mode
muon.qk_clip_ after every step. Batches are random tokens made up front, so the data loader is
not timed. MFU counts FLOPs as train.py does (6 x non-embedding parameters + attention) over
log.peak_flops; the probe's own work is not counted, so its cost shows as lower MFU.
"""

import argparse
import dataclasses
import time

import torch

import train
from config import ConfigError, gpt_config, validate


def timed_steps(model, raw_model, optimizer, batches, cfg, grad_accum, probe, warmup, steps, device) -> float:
    """Seconds for `steps` training steps after `warmup` untimed ones."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step in range(warmup + steps):
        if step == warmup:
            sync()
            start = time.perf_counter()
        train.train_step(model, raw_model, optimizer, batches, cfg, step, grad_accum, probe=probe,
                         measure_grad_norm=False)
    sync()
    return time.perf_counter() - start


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Other --section.key=value arguments override the config, as in train.py.")
    parser.add_argument("--config", default="configs/gpu.toml")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode, compilation included")
    args, overrides = parser.parse_known_args(argv)
    cfg, _ = train.load_run_config(["--config", args.config] + overrides)
    vocab_size = train.load_tokenizer(cfg).n_vocab
    grad_accum = validate(cfg, world_size=1, vocab_size=vocab_size)
    device = train.setup_device(world_size=1, timeout_s=cfg.train.dist_timeout_s)

    model_cfg = gpt_config(cfg, vocab_size)
    torch.manual_seed(cfg.train.seed)
    raw_model = train.GPT(model_cfg).to(device)
    raw_model.choose_attention(torch.bfloat16 if cfg.train.bf16 else torch.float32)  # as train.py does
    optimizer = train.build_optimizer(cfg, raw_model, device)
    model = torch.compile(raw_model) if cfg.train.compile else raw_model
    B, T = cfg.train.micro_batch_size, cfg.data.seq_len
    sequences = [torch.randint(0, vocab_size, (B, T + 1), device=device) for _ in range(grad_accum)]
    micro_batches = [(seq[:, :-1], seq[:, 1:]) for seq in sequences]

    def batches():
        while True:
            yield from micro_batches

    n_params = raw_model.num_params(non_embedding=True)
    flops = raw_model.flops_per_token(T)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__} | {cfg.model.preset}: {raw_model.num_params() / 1e6:.1f}M parameters "
          f"({n_params / 1e6:.1f}M non-embedding), {flops / 1e6:.0f} MFLOP/token | {grad_accum} micro-steps of "
          f"{B} x {T} per step | compile {cfg.train.compile}, bf16 {cfg.train.bf16} | "
          f"MuonClip tau {cfg.optim.muon_clip_tau}")
    modes = [("probe off", False, False), ("probe on", True, False), ("probe + MuonClip", True, True)]
    results = []
    for label, probe, clip in modes:
        mode_cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, muon_clip=clip))
        seconds = timed_steps(model, raw_model, optimizer, batches(), mode_cfg, grad_accum, probe,
                              args.warmup, args.steps, device)
        tokens_per_s = args.steps * cfg.train.batch_tokens / seconds
        results.append((label, 1000 * seconds / args.steps, tokens_per_s, flops * tokens_per_s / cfg.log.peak_flops))
        print(f"  {label}: done", flush=True)

    base_ms = results[0][1]
    print(f"\n{'mode':<18} {'ms/step':>9} {'tokens/s':>11} {'MFU':>7} {'overhead':>9}")
    for label, ms, tokens_per_s, mfu in results:
        overhead = "-" if ms is base_ms else f"{100 * (ms / base_ms - 1):+.1f}%"
        print(f"{label:<18} {ms:9.1f} {tokens_per_s:11,.0f} {100 * mfu:6.1f}% {overhead:>9}")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    return results


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
