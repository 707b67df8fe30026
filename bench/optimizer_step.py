"""Time one optimizer step on a GPT-2-small parameter set: ours against torch.optim.Muon + AdamW.

    python -m bench.optimizer_step                 # CUDA if present, else CPU
    python -m bench.optimizer_step --layers 2      # a quick look on a CPU

The parameter set is GPT-2-small's (d=768): per layer four 768x768 attention matrices, a
3072x768 and a 768x3072 MLP matrix (Muon), plus token and position embeddings, an untied
output head and the norm gains (AdamW). Gradients are random and fixed; every optimizer sees
the same ones. Prints a table last.
"""

import argparse

import torch

import muon
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


def ns_one_at_a_time(matrices, coefficients):
    for p in matrices:
        muon.newton_schulz(p.grad, coefficients)


def ns_batched(matrices, coefficients):
    for bucket in muon._buckets_by_shape(matrices):
        muon.newton_schulz(torch.stack([muon._as_wide(p.grad) for p in bucket]), coefficients)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time ours with compile_ns=True")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    matrices, others = gpt2_small_params(args.layers, args.d, args.vocab, device)
    n_matrix = sum(p.numel() for p in matrices)
    n_other = sum(p.numel() for p in others)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(f"{len(matrices)} hidden matrices ({n_matrix / 1e6:.1f}M), {len(others)} other tensors ({n_other / 1e6:.1f}M)")

    def ours(compile_ns):
        opt = muon.Muon([dict(params=matrices), dict(params=others, use_muon=False)],
                        lr=1e-3, weight_decay=0.0, compile_ns=compile_ns)
        return opt.step

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
        ("muon.Muon step (classic), eager", median_ms(ours(False), args.warmup, args.iters)),
    ]
    if args.compile:
        rows.append(("muon.Muon step (classic), compile_ns", median_ms(ours(True), args.warmup, args.iters)))
    baseline = rows[0][1]
    print("\n| what | ms per step | vs torch.optim.Muon + AdamW |\n|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {baseline / ms:.1f}x |")


if __name__ == "__main__":
    main()
