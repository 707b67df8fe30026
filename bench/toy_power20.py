"""Why orthogonalise: a 2x2 linear model where one squared error is raised to the 10th power.

    python -m bench.toy_power20                                   # also writes bench/results/toy_power20.png
    python -m bench.toy_power20 --out /tmp/toy.png

A 2x2 matrix W fits four 2-D points, y = W_true x. Three points pay the usual squared error;
the first pays it to the 10th power, (squared error)^10 = (error)^20. From W = 0 that point's
gradient is ~10^7 times the others', so plain gradient descent either takes one giant step
and overflows to inf (then NaN) within two steps (lr >= 1e-6), or, with an lr small enough to
stay finite, barely moves the other three points and stalls far from W_true. An orthogonalised
step, W -= lr * NS(G), keeps the direction of G in its singular vectors but sets every
singular value to ~1: the step length no longer depends on the gradient's scale, and the same
loss is solved in under 100 steps. CPU, float64, a second or two.
"""

import argparse
import math
from pathlib import Path

import torch

import muon
from bench.figure import plt, save

POINTS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
W_TRUE = torch.tensor([[2.0, -1.0], [0.5, 1.5]], dtype=torch.float64)
POWER = 10  # applied to the first point's squared error


def loss_fn(W: torch.Tensor) -> torch.Tensor:
    squared_errors = (POINTS @ W.T - POINTS @ W_TRUE.T).pow(2).sum(dim=1)
    return squared_errors[0] ** POWER + squared_errors[1:].sum()


def train(method: str, lr: float, steps: int) -> dict:
    """Run `steps` steps from W = 0; stop at the first non-finite loss. curve: the loss before each step."""
    W = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    curve = []
    for step in range(steps):
        loss = loss_fn(W)
        curve.append(loss.item())
        if not torch.isfinite(loss):
            return dict(method=method, lr=lr, steps=step, loss=loss.item(), distance=float("nan"), curve=curve)
        (grad,) = torch.autograd.grad(loss, W)
        with torch.no_grad():
            if method == "gradient descent":
                W -= lr * grad
            else:  # a fixed step length would circle the target; decay it linearly to zero
                W -= lr * (1 - step / steps) * muon.newton_schulz(grad, "polar_express", dtype=torch.float64)
    final = loss_fn(W).item()
    return dict(method=method, lr=lr, steps=steps, loss=final, distance=(W - W_TRUE).norm().item(), curve=curve + [final])


def plot(rows: list, out: Path) -> None:
    """Loss against step, log y; a run that turned inf or nan ends in an x at its last finite loss."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        finite = [v for v in r["curve"] if math.isfinite(v)]
        style = "-" if r["method"] == "orthogonalised" else "--"
        line, = ax.plot(range(len(finite)), finite, style, label=f"{r['method']}, lr {r['lr']:g}, {r['steps']} steps")
        if len(finite) < len(r["curve"]):
            ax.plot(len(finite) - 1, finite[-1], "x", color=line.get_color(), markersize=10, mew=2)
            ax.annotate(f"then {r['curve'][len(finite)]:g}", (len(finite) - 1, finite[-1]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points", color=line.get_color())
    ax.set(xscale="symlog", yscale="log", xlabel="step (symlog)", ylabel="loss",
           title="(squared error)^10 on one point: gradient descent vs orthogonalised steps")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="bench/results/toy_power20.png")
    args = parser.parse_args(argv)
    rows = [train("gradient descent", lr, args.steps) for lr in (1e-7, 1e-6, 1e-4, 1e-2)]
    rows.append(train("gradient descent", 1e-7, 100 * args.steps))
    rows += [train("orthogonalised", lr, args.steps) for lr in (0.05, 0.1, 0.2)]
    plot(rows, Path(args.out))
    print(f"plot: {args.out}\n")
    print("| method | lr | steps run | final loss | distance to W_true |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['lr']:g} | {r['steps']} | {r['loss']:.3g} | {r['distance']:.3g} |")


if __name__ == "__main__":
    main()
