"""Newton-Schulz: what 1..5 steps do to singular values, and how fast the 124M matrices go through it.

    python -m bench.newton_schulz                     # plot + table; the speed part needs CUDA
    python -m bench.newton_schulz --out ns.png

Part 1 (any device): the plot shows, per schedule, what 1..5 steps do to a singular value in
(0, 1] (the scalar polynomial, exact), with the 5-step outputs of a real 768x768 matrix in bf16
on top; the table gives, for that matrix (singular values log-uniform over [1e-3, 1] before NS
divides it by its Frobenius norm), the band its singular values reach after each step.
Part 2 (CUDA): the GPT-2-small hidden matrices (12 x {4 x 768x768, 3072x768, 768x3072}) through
5 steps, one matrix at a time and batched by shape, against the bf16 matmul ceiling measured on
one large square matmul; TFLOP/s counts the NS matmuls only.
"""

import argparse

import torch

import muon
from bench.timing import median_ms


def singular_value_paths(coefficients: str, n: int = 768, steps: int = 5, device="cpu"):
    """Input singular values (normalised) and the singular values after each of 1..steps steps."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(-3, 0, n, dtype=torch.float64)
    s = s / s.norm()  # what NS sees: the Frobenius norm is 1, the largest value < 1
    G = (U * s) @ V.T
    paths = []
    for k in range(1, steps + 1):
        out = muon.newton_schulz(G.float().to(device), coefficients, steps=k).double().cpu()
        paths.append(torch.diagonal(U.T @ out @ V))  # in G's own singular bases
    return s, paths


def scalar_paths(coefficients: str, x, steps: int = 5):
    """What 1..steps steps do to a singular value x, exactly: NS is an odd polynomial in X."""
    x = x / muon.NS_NORM_HEADROOM[coefficients]
    paths = []
    for a, b, c in muon.ns_schedule(coefficients, steps):
        x = a * x + b * x**3 + c * x**5
        paths.append(x)
    return paths


def plot(results: dict, path: str) -> None:
    from bench.figure import plt, save

    x = torch.logspace(-4, 0, 2000, dtype=torch.float64)
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), sharey=True)
    for ax, (name, (s, paths)) in zip(axes, results.items()):
        for k, out in enumerate(scalar_paths(name, x), start=1):
            ax.semilogx(x, out, label=f"{k} step{'s' if k > 1 else ''}")
        ax.semilogx(s, paths[-1], ".", ms=2, color="black", label="5 steps, 768x768 in bf16")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set(title=name, xlabel="input singular value (after the Frobenius normalisation)")
        ax.legend()
    axes[0].set_ylabel("output singular value")
    fig.tight_layout()
    save(fig, path)
    print(f"wrote {path}")


def stacked_by_shape(matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    """The matrices on their wide side, stacked by shape: one batch for each Newton-Schulz call."""
    by_shape = {}
    for m in matrices:
        by_shape.setdefault(tuple(muon.as_wide(m).shape), []).append(muon.as_wide(m))
    return [torch.stack(batch) for batch in by_shape.values()]


def speed_rows():
    device = torch.device("cuda")
    shapes = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
    grads = [torch.randn(s, device=device) for _ in range(12) for s in shapes]
    flops = sum(muon.ns_flops(tuple(g.shape), 5) for g in grads)
    stacks = stacked_by_shape(grads)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    rows = [("bf16 matmul 8192^3 (the ceiling)", median_ms(lambda: a @ a), 2 * 8192**3)]
    for name in ("classic", "polar_express"):
        rows.append((f"NS {name}, one matrix at a time",
                     median_ms(lambda: [muon.newton_schulz(g, name) for g in grads]), flops))
        rows.append((f"NS {name}, batched by shape",
                     median_ms(lambda: [muon.newton_schulz(s, name) for s in stacks]), flops))
    compiled = torch.compile(muon.newton_schulz)
    rows.append(("NS classic, batched, torch.compile",
                 median_ms(lambda: [compiled(s, "classic") for s in stacks]), flops))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/newton_schulz.png")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {name: singular_value_paths(name, device=device) for name in muon.NS_COEFFICIENTS}
    plot(results, args.out)
    s = results["classic"][0]
    print(f"\ninput singular values after normalisation: {s.min():.1e} .. {s.max():.3f}")
    print("| schedule | steps | output sv, min over inputs >= 3e-3 | output sv, max | output for the smallest input |")
    print("|---|---:|---:|---:|---:|")
    for name, (s, paths) in results.items():
        for k, out in enumerate(paths, start=1):
            print(f"| {name} | {k} | {out[s >= 3e-3].min():.3f} | {out.max():.3f} | {out[0]:.3f} |")
    if device != "cuda":
        print("\n(speed table skipped: it times CUDA kernels and this machine has no CUDA device)")
        return
    print(f"\ndevice {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| what | ms | TFLOP/s |\n|---|---:|---:|")
    for name, ms, flops in speed_rows():
        print(f"| {name} | {ms:.2f} | {flops / ms / 1e9:.0f} |")


if __name__ == "__main__":
    main()
