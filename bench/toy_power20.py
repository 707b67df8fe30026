"""Why orthogonalise: a 2x2 linear model where one squared error is raised to the 10th power.

    python -m bench.toy_power20

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

import torch

import muon

POINTS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
W_TRUE = torch.tensor([[2.0, -1.0], [0.5, 1.5]], dtype=torch.float64)
POWER = 10  # applied to the first point's squared error


def loss_fn(W: torch.Tensor) -> torch.Tensor:
    squared_errors = (POINTS @ W.T - POINTS @ W_TRUE.T).pow(2).sum(dim=1)
    return squared_errors[0] ** POWER + squared_errors[1:].sum()


def train(method: str, lr: float, steps: int) -> dict:
    """Run `steps` steps from W = 0; stop at the first non-finite loss."""
    W = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    for step in range(steps):
        loss = loss_fn(W)
        if not torch.isfinite(loss):
            return dict(method=method, lr=lr, steps=step, loss=loss.item(), distance=float("nan"))
        (grad,) = torch.autograd.grad(loss, W)
        with torch.no_grad():
            if method == "gradient descent":
                W -= lr * grad
            else:  # a fixed step length would circle the target; decay it linearly to zero
                W -= lr * (1 - step / steps) * muon.newton_schulz(grad, "polar_express", dtype=torch.float64)
    return dict(method=method, lr=lr, steps=steps, loss=loss_fn(W).item(), distance=(W - W_TRUE).norm().item())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    rows = [train("gradient descent", lr, args.steps) for lr in (1e-7, 1e-6, 1e-4, 1e-2)]
    rows.append(train("gradient descent", 1e-7, 100 * args.steps))
    rows += [train("orthogonalised", lr, args.steps) for lr in (0.05, 0.1, 0.2)]
    print("| method | lr | steps run | final loss | distance to W_true |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['lr']:g} | {r['steps']} | {r['loss']:.3g} | {r['distance']:.3g} |")


if __name__ == "__main__":
    main()
