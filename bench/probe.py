"""Time the max-logit probe against the attention it watches, one layer of the 124M models, on a GPU.

    python -m bench.probe
    python -m bench.probe --batch 8     # a smaller GPU

For B=32, H=12, T=1024 in bf16 and q/k, v widths (96, 64) (gpt124m-mla) and (64, 64)
(gpt124m-mha): fwd+bwd of F.scaled_dot_product_attention (causal, default backend), and the
probe's forward (it runs under no_grad, so it has no backward) as chunked torch ops, eager and
compiled, and as the fused Triton kernel, eager and inside torch.compile. q and k are transposed
views of (B, T, H, D), as in the model. First checks that the kernel gives the chunked probe's
maxima on the same inputs in fp32. Prints a table last: ms per layer, and the probe as a
percentage of attention fwd+bwd (the goal: probe and MuonClip under 5% of a training step).
"""

import argparse
import sys

import torch
import torch.nn.functional as F

import kernels
from model import GPTConfig
from bench.timing import median_ms

WIDTHS = {"gpt124m-mla": (96, 64), "gpt124m-mha": (64, 64)}  # q/k width, v width per head


def heads(B: int, T: int, H: int, D: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf (B, T, H, D) bf16 requiring grad, and its (B, H, T, D) view as attention takes it."""
    leaf = torch.randn(B, T, H, D, device="cuda", generator=generator).bfloat16().requires_grad_()
    return leaf, leaf.transpose(1, 2)


def check_kernel(q: torch.Tensor, k: torch.Tensor, scale: float, chunk_size: int) -> None:
    """The kernel on bf16 and on fp32 inputs against the chunked probe in fp32 (bf16 products are
    exact in fp32, so only summation order differs)."""
    expected = kernels.chunked_max_causal_logits(q.float(), k.float(), scale, chunk_size)
    for inputs in ((q, k), (q.float(), k.float())):
        torch.testing.assert_close(kernels.triton_max_causal_logits(*inputs, scale), expected, rtol=1e-5, atol=0,
                                   msg=lambda m: f"Triton probe, {inputs[0].dtype} inputs, against chunked fp32: {m}")


def time_layer(B: int, H: int, T: int, qk_dim: int, v_dim: int, warmup: int, iters: int) -> list[tuple[str, float]]:
    """(what, ms) for attention fwd+bwd and each way of running the probe."""
    g = torch.Generator(device="cuda").manual_seed(0)
    (q_leaf, q), (k_leaf, k), (v_leaf, v) = (heads(B, T, H, D, g) for D in (qk_dim, qk_dim, v_dim))
    scale = qk_dim ** -0.5
    chunk_size = GPTConfig().probe_chunk_size
    dy = torch.randn(B, H, T, v_dim, device="cuda", generator=g).bfloat16()
    check_kernel(q.detach(), k.detach(), scale, chunk_size)

    def attention():
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        torch.autograd.grad(y, (q_leaf, k_leaf, v_leaf), dy)

    chunked_compiled = torch.compile(kernels.chunked_max_causal_logits)
    triton_compiled = torch.compile(kernels.triton_max_causal_logits, fullgraph=True)
    return [
        ("attention fwd+bwd (SDPA, default backend)", median_ms(attention, warmup, iters)),
        (f"probe: chunked (chunk {chunk_size}), eager",
         median_ms(lambda: kernels.chunked_max_causal_logits(q, k, scale, chunk_size), warmup, iters)),
        (f"probe: chunked (chunk {chunk_size}), compiled",
         median_ms(lambda: chunked_compiled(q, k, scale, chunk_size), warmup, iters)),
        ("probe: Triton kernel, eager", median_ms(lambda: kernels.triton_max_causal_logits(q, k, scale), warmup, iters)),
        ("probe: Triton kernel, in torch.compile", median_ms(lambda: triton_compiled(q, k, scale), warmup, iters)),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.probe times GPU kernels and needs CUDA: torch.cuda.is_available() is False here")
    if kernels.triton is None:
        sys.exit("bench.probe times the probe's Triton kernel and needs Triton: pip install triton")
    torch.set_float32_matmul_precision("highest")  # the fp32 reference of check_kernel must not use TF32
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {kernels.triton.__version__}")
    print(f"B={args.batch}, H={args.heads}, T={args.seq}, bf16, causal; "
          f"median of {args.iters} after {args.warmup} warm-up calls")
    tables = {name: time_layer(args.batch, args.heads, args.seq, *widths, args.warmup, args.iters)
              for name, widths in WIDTHS.items()}
    print("\n| layer | q/k, v | what | ms per layer | % of attention fwd+bwd |\n|---|---|---|---:|---:|")
    for name, rows in tables.items():
        attention_ms = rows[0][1]
        for what, ms in rows:
            qk_dim, v_dim = WIDTHS[name]
            print(f"| {name} | {qk_dim}, {v_dim} | {what} | {ms:.3f} | {100 * ms / attention_ms:.1f}% |")


if __name__ == "__main__":
    main()
