"""Time one optimizer step on a GPT-2-small parameter set: ours against torch.optim.Muon + AdamW.

    python -m bench.optimizer_step                       # CUDA if present, else CPU
    python -m bench.optimizer_step --layers 2 --compile  # a quick look on a CPU, eager and compiled
    python -m bench.optimizer_step --options             # also each of Muon's options alone, eager

The parameter set is GPT-2-small's (d=768): per layer four 768x768 attention matrices, a
3072x768 and a 768x3072 MLP matrix (Muon), plus token and position embeddings, an untied
output head and the norm gains (AdamW). Gradients are random and fixed; every optimizer sees
the same ones.

Besides the time, the first table counts what one step of muon.Muon asks of the host: the ATen
operations it dispatches (on a GPU each is a kernel launch and host time spent issuing it; a
compiled graph dispatches only the matmuls it leaves to BLAS, its fused kernels run inside the
graph) and the step's host milliseconds. On a CPU every "ms" is the step's whole time; on a GPU
the second table's are device time (bench.timing). Prints the tables last.
"""

import argparse
import time

import torch

import config
import muon
from bench.newton_schulz import stacked_by_shape
from bench.timing import median_ms


def gpt2_small_params(layers: int, d: int, vocab: int, device) -> tuple[list, list]:
    """(hidden matrices, everything else) as leaf tensors with random gradients."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def param(*shape):
        p = torch.nn.Parameter(torch.randn(*shape, generator=g).mul_(0.02).to(device))
        p.grad = torch.randn(*shape, generator=g).to(device)
        return p

    matrices = []
    for _ in range(layers):
        matrices += [param(d, d) for _ in range(4)] + [param(4 * d, d), param(d, 4 * d)]
    others = [param(vocab, d), param(1024, d), param(vocab, d)] + [param(d) for _ in range(2 * layers + 1)]
    return matrices, others


def ops_per_step(step) -> int:
    """ATen operations one step dispatches, nested ones (aten::linear's aten::mm) not counted twice."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.events()
    return sum(1 for e in events if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def host_ms(step, warmup: int, iters: int) -> float:
    """Median wall milliseconds for the Python call alone (on a GPU: issuing, not running, the work)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - start))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def ns_one_at_a_time(matrices, coefficients):
    for p in matrices:
        muon.newton_schulz(p.grad, coefficients)


def ns_batched(matrices, coefficients):
    for stack in stacked_by_shape([p.grad for p in matrices]):
        muon.newton_schulz(stack, coefficients)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time ours with compile=True (one graph a bucket)")
    parser.add_argument("--options", action="store_true",
                        help="also time ours (eager) with NorMuon, cautious weight decay, per-head blocks, and all three")
    parser.add_argument("--heads", type=int, default=12, help="attention heads, for the per-head blocks")
    parser.add_argument("--ns-dtype", choices=list(config.NS_DTYPES), default="auto",
                        help="ours' Newton-Schulz dtype, as optim.ns_dtype (torch.optim.Muon's is always bf16)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ns_dtype = config.ns_dtype(args.ns_dtype, device)
    matrices, others = gpt2_small_params(args.layers, args.d, args.vocab, device)
    n_matrix = sum(p.numel() for p in matrices)
    n_other = sum(p.numel() for p in others)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, Newton-Schulz in {ns_dtype}")
    print(f"{len(matrices)} hidden matrices ({n_matrix / 1e6:.1f}M), {len(others)} other tensors ({n_other / 1e6:.1f}M)")

    def ours(compile):
        opt = muon.Muon([dict(params=matrices), dict(params=others, use_muon=False)],
                        lr=1e-3, weight_decay=0.0, ns_dtype=ns_dtype, compile=compile)
        return opt.step

    modes = [("eager", ours(False))] + ([("compiled", ours(True))] if args.compile else [])
    counts = []
    for mode, step in modes:
        step()  # compiles, in the compiled mode, and creates the state
        counts.append((mode, ops_per_step(step), host_ms(step, args.warmup, args.iters)))

    torch_muon = torch.optim.Muon(matrices, lr=1e-3, weight_decay=0.0)
    torch_adamw = torch.optim.AdamW(others, lr=1e-3, weight_decay=0.0, fused=True)

    def reference():
        torch_muon.step()
        torch_adamw.step()

    rows = [
        ("torch.optim.Muon + fused AdamW", median_ms(reference, args.warmup, args.iters)),
        ("fused AdamW alone (the non-matrix part)", median_ms(torch_adamw.step, args.warmup, args.iters)),
        ("NS classic, one matrix at a time", median_ms(lambda: ns_one_at_a_time(matrices, "classic"), args.warmup, args.iters)),
        ("NS classic, batched by shape", median_ms(lambda: ns_batched(matrices, "classic"), args.warmup, args.iters)),
    ] + [(f"muon.Muon step (classic), {mode}", median_ms(step, args.warmup, args.iters)) for mode, step in modes]
    print("\n| muon.Muon step | ATen ops dispatched | host ms (median) |\n|---|---:|---:|")
    for mode, ops, ms in counts:
        print(f"| {mode} | {ops} | {ms:.2f} |")
    baseline = rows[0][1]
    print("\n| what | ms per step | vs torch.optim.Muon + AdamW |\n|---|---:|---:|")
    for what, ms in rows:
        print(f"| {what} | {ms:.2f} | {baseline / ms:.1f}x |")
    options = option_rows(matrices, others, ns_dtype, args) if args.options else []
    if options:
        print("\n| muon.Muon step (eager, weight decay 0.1) with | ms per step | vs no option |\n|---|---:|---:|")
        for what, ms in options:
            print(f"| {what} | {ms:.2f} | {ms / options[0][1]:.2f}x |")
    return dict(counts=counts, rows=rows, options=options)


def option_rows(matrices, others, ns_dtype, args) -> list[tuple[str, float]]:
    """An eager muon.Muon step with each option: per-head blocks cut each layer's first three
    attention matrices (q, k, v) by rows and the fourth (the output) by columns into args.heads."""
    blocks = []
    for _ in range(args.layers):
        blocks += [(args.heads, 1)] * 3 + [(1, args.heads)] + [(1, 1), (1, 1)]
    settings = {"none": {}, "normuon": dict(normuon=True), "cautious weight decay": dict(cautious_weight_decay=True),
                "per-head blocks": dict(blocks=True), "all three": dict(normuon=True, cautious_weight_decay=True, blocks=True)}
    rows = []
    for what, options in settings.items():
        options = dict(options)
        group = dict(params=matrices, blocks=blocks if options.pop("blocks", False) else None)
        opt = muon.Muon([group, dict(params=others, use_muon=False)], lr=1e-3, weight_decay=0.1, ns_dtype=ns_dtype,
                        **options)
        rows.append((what, median_ms(opt.step, args.warmup, args.iters)))
    return rows


if __name__ == "__main__":
    main()
