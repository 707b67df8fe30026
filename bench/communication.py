"""Bytes each rank sends per optimizer step, and how evenly Newton-Schulz is shared, at N ranks.

    python -m bench.communication                     # 124M MLA (gpt124m-mla), 8 ranks
    python -m bench.communication --world 4 --preset gpt124m-mha

Computed from the plans, not timed: no GPU or network is needed. Ring collectives, as NCCL runs
them for large messages: an all-reduce sends 2 (N-1)/N of the buffer from each rank, a
reduce-scatter or all-gather (N-1)/N of it.

- DDP + replicated Muon (this project before owner sharding): DDP all-reduces every gradient in
  fp32; each rank orthogonalises a ceil(n / N) share of every shape bucket and the bf16 results
  are all-gathered (shares padded to equal size); every rank keeps all of Muon's momentum.
- Owner-sharded Muon, one transfer each way (muon.Muon until 2026-12-06): DDP all-reduces only
  the AdamW gradients; all the hidden matrices' fp32 gradients are reduce-scattered to their
  owners (muon.plan_owners, balanced by NS FLOPs) in one buffer, and the bf16 orthogonalised
  updates all-gathered in one; each rank keeps the momentum of its own matrices.
- Owner-sharded Muon, per bucket and overlapped (muon.Muon now): the same owners, but one
  reduce-scatter and one all-gather per bucket of same-shape matrices, so each bucket's
  transfers run under another bucket's Newton-Schulz; the owner applies the whole update and
  the new weights (fp32 here, the parameters' dtype) are all-gathered. Each bucket's segments
  are padded to its busiest rank's share, and the weights travel in fp32 instead of bf16
  updates: more bytes, hidden under the compute, and every rank gets the owner's weights exactly.
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
    matrices, *others = muon.param_groups(model)
    return [tuple(p.shape) for _, p in matrices["params"]], sum(p.numel() for g in others for _, p in g["params"])


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


def owner_plan(shapes, adamw_numel, world, steps, per_bucket):
    """per_bucket: a reduce-scatter and an all-gather per bucket of one wide shape, fp32 weights
    gathered (now); else one of each for all matrices, has-a-gradient flags and bf16 updates (before)."""
    ring = (world - 1) / world
    owner = muon.plan_owners([muon.ns_flops(s, steps) for s in shapes], world)
    buckets = {}
    for i, s in enumerate(shapes):
        buckets.setdefault(tuple(sorted(s)) if per_bucket else "all", []).append(i)
    sent = adamw = 2 * ring * 4 * adamw_numel
    for members in buckets.values():
        per_rank = [sum(shapes[i][0] * shapes[i][1] + (not per_bucket) for i in members if owner[i] == r)
                    for r in range(world)]
        segment = max(per_rank)  # each rank's share of the bucket, padded to the largest
        sent += ring * world * segment * (4 + (4 if per_bucket else 2))
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
    plans = {"DDP + replicated Muon": replicated_plan(shapes, adamw_numel, args.world, args.ns_steps),
             "owner-sharded, one transfer each way (before)": owner_plan(shapes, adamw_numel, args.world,
                                                                         args.ns_steps, per_bucket=False),
             "owner-sharded, per bucket, overlapped (now)": owner_plan(shapes, adamw_numel, args.world,
                                                                       args.ns_steps, per_bucket=True)}
    print("\n| scheme | MB sent per rank per step | of which Muon's matrices | of which AdamW's (DDP) | "
          "NS FLOPs, busiest rank / mean | Muon momentum per rank (MB) |\n|---|---:|---:|---:|---:|---:|")
    for name, plan in plans.items():
        imbalance = max(plan["flops"]) / (sum(plan["flops"]) / args.world)
        print(f"| {name} | {plan['sent'] / 1e6:.1f} | {(plan['sent'] - plan['adamw']) / 1e6:.1f} | "
              f"{plan['adamw'] / 1e6:.1f} | {imbalance:.2f} | {plan['momentum'] / 1e6:.1f} |")
    return plans


if __name__ == "__main__":
    main()
