"""Bytes each rank sends per optimizer step, and how evenly Newton-Schulz is shared, at N ranks.

    python -m bench.communication                     # 124M MLA (gpt124m-mla), 8 ranks
    python -m bench.communication --world 4 --preset gpt124m-mha

Computed from the plans, not timed: no GPU or network is needed. Ring collectives, as NCCL runs
them for large messages: an all-reduce sends 2 (N-1)/N of the buffer from each rank, a
reduce-scatter or all-gather (N-1)/N of it.

- DDP + replicated Muon (this project before owner sharding): DDP all-reduces every gradient in
  fp32; each rank orthogonalises a ceil(n / N) share of every shape bucket and the bf16 results
  are all-gathered (shares padded to equal size); every rank keeps all of Muon's momentum.
- Owner-sharded Muon (muon.Muon now): DDP all-reduces only the AdamW gradients; the hidden
  matrices' fp32 gradients are reduce-scattered to their owners (muon.plan_owners, balanced by
  NS FLOPs) and the bf16 orthogonalised updates all-gathered; each rank keeps the momentum of
  its own matrices.
"""

import argparse
import math

import torch

import muon
from model import CONFIGS, GPT


def model_parameters(preset: str) -> tuple[list[tuple[int, int]], int]:
    """(shapes of the hidden matrices, element count of everything AdamW steps), from a meta model."""
    with torch.device("meta"):
        model = GPT(CONFIGS[preset])
    hidden, others = muon.hybrid_param_groups(model)
    return [tuple(p.shape) for _, p in hidden["params"]], sum(p.numel() for _, p in others["params"])


def replicated_plan(shapes, adamw_numel, world, steps):
    ring = (world - 1) / world
    all_reduce = 2 * ring * 4 * (sum(a * b for a, b in shapes) + adamw_numel)
    buckets: dict[tuple, list] = {}
    for s in shapes:
        buckets.setdefault(tuple(sorted(s)), []).append(s)
    gathered, flops = 0, [0] * world
    for wide, members in buckets.items():
        per_rank = math.ceil(len(members) / world)
        gathered += world * per_rank * wide[0] * wide[1] * 2  # bf16, padded shares
        for i, s in enumerate(members):
            flops[i // per_rank] += muon.ns_flops(s, steps)
    momentum = 4 * sum(a * b for a, b in shapes)
    adamw = 2 * ring * 4 * adamw_numel
    return dict(sent=all_reduce + ring * gathered, adamw=adamw, flops=flops, momentum=momentum)


def owner_plan(shapes, adamw_numel, world, steps):
    ring = (world - 1) / world
    owner = muon.plan_owners(shapes, world, steps)
    per_rank = [sum(a * b + 1 for (a, b), o in zip(shapes, owner) if o == r) for r in range(world)]
    segment = max(per_rank)  # each rank's matrices and their has-a-gradient flags, padded to the largest
    adamw = 2 * ring * 4 * adamw_numel
    sent = adamw + ring * world * segment * 4 + ring * world * segment * 2
    flops = [sum(muon.ns_flops(s, steps) for s, o in zip(shapes, owner) if o == r) for r in range(world)]
    momentum = max(4 * sum(a * b for (a, b), o in zip(shapes, owner) if o == r) for r in range(world))
    return dict(sent=sent, adamw=adamw, flops=flops, momentum=momentum)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt124m-mla", choices=list(CONFIGS))
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--ns-steps", type=int, default=5)
    args = parser.parse_args(argv)
    shapes, adamw_numel = model_parameters(args.preset)
    print(f"{args.preset}: {len(shapes)} hidden matrices ({sum(a * b for a, b in shapes) / 1e6:.1f}M), "
          f"{adamw_numel / 1e6:.1f}M AdamW elements, {args.world} ranks")
    plans = {"DDP + replicated Muon (before)": replicated_plan(shapes, adamw_numel, args.world, args.ns_steps),
             "owner-sharded Muon (now)": owner_plan(shapes, adamw_numel, args.world, args.ns_steps)}
    print("\n| scheme | MB sent per rank per step | of which Muon's matrices | of which AdamW's (DDP) | "
          "NS FLOPs, busiest rank / mean | Muon momentum per rank (MB) |\n|---|---:|---:|---:|---:|---:|")
    for name, plan in plans.items():
        imbalance = max(plan["flops"]) / (sum(plan["flops"]) / args.world)
        print(f"| {name} | {plan['sent'] / 1e6:.1f} | {(plan['sent'] - plan['adamw']) / 1e6:.1f} | "
              f"{plan['adamw'] / 1e6:.1f} | {imbalance:.2f} | {plan['momentum'] / 1e6:.1f} |")
    return plans


if __name__ == "__main__":
    main()
