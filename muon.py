"""Muon with an AdamW companion, and MuonClip (per-head QK-clip). Torch only: copy this file anywhere.

    import muon
    groups = muon.param_groups(model, head=dict(lr=0.008), embeddings=dict(lr=0.3))
    opt = muon.Muon(groups, lr=0.02, weight_decay=0.1)   # Muon on hidden matrices, AdamW on the rest
    loss.backward(); opt.step(); opt.zero_grad()

Muon (Keller Jordan, 2024) for a hidden matrix W of shape (A, B) with gradient G:

    M <- mu M + G                       momentum_, fp32
    U <- G + mu M  (Nesterov) or M
    O <- NS(U)                          newton_schulz: approximately U V^T of U = U S V^T
    W <- (1 - lr wd) W - lr_eff(A, B) O      decay_and_step_: decoupled decay with the un-scaled lr

Options of the same update, each off by default: NorMuon's per-neuron normalisation of O
(normuon_, arXiv 2510.05491); cautious weight decay, which decays only where O and W share a
sign (arXiv 2510.12402), in the AdamW groups too; and blocks, which orthogonalise each attention
head's rows or columns as a matrix of its own, lr_eff by the block's shape (microsoft/dion's
num_heads). muon_update_ is the whole update of a list of matrices, and the only one: the Muon
class decides which rank runs it on which matrix, and moves gradients and weights (Bucket).

The file reads top to bottom: the maths as pure functions; who owns which matrix; the Muon class;
param_groups; MuonClip (Kimi K2's per-head QK-clip).
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

# ----------------------------------------------------------------------------------------------
# Newton-Schulz

# One (a, b, c) per iteration of X <- a X + (b S + c S^2) X with S = X X^T.
NS_COEFFICIENTS = {
    # Keller Jordan's quintic, repeated every step: a steep slope at 0 lifts tiny singular
    # values fast, at the price of landing them in roughly [0.7, 1.2] rather than at 1.
    "classic": ((3.4445, -4.7750, 2.0315),),
    # Polar Express (Amsel et al., arXiv 2505.16932), five distinct minimax-optimal steps,
    # as used by the modded-nanogpt speedrun record.
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}
# Polar Express's polynomials were fitted for inputs normalised with 2% headroom.
NS_NORM_HEADROOM = {"classic": 1.0, "polar_express": 1.02}


def ns_schedule(coefficients: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of the `steps` iterations of a named coefficient schedule."""
    if coefficients not in NS_COEFFICIENTS:
        raise ValueError(f"ns_coefficients={coefficients!r}: expected one of {sorted(NS_COEFFICIENTS)}")
    table = NS_COEFFICIENTS[coefficients]
    if len(table) == 1:
        return list(table) * steps
    if not 1 <= steps <= len(table):
        raise ValueError(f"ns_steps={steps}: the {coefficients!r} schedule has 1 to {len(table)} steps")
    return list(table[:steps])


def newton_schulz(G: Tensor, coefficients: str = "classic", steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximate U V^T for G = U S V^T, for one matrix (A, B) or a batch (N, A, B).

    Odd polynomials act on the singular values alone, p(U S V^T) = U p(S) V^T, so the singular
    vectors are exact up to rounding and only the singular values are approximated.
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz takes a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    X = G.to(dtype)
    X = X.unsqueeze(0) if G.ndim == 2 else X
    tall = X.size(-2) > X.size(-1)
    if tall:  # work on the wide side: S = X X^T is then the smaller Gram matrix
        X = X.mT
    # Frobenius norm >= spectral norm, so every singular value starts in [0, 1].
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * NS_NORM_HEADROOM[coefficients] + eps)
    for a, b, c in ns_schedule(coefficients, steps):
        S = X @ X.mT
        poly = torch.baddbmm(S, S, S, beta=b, alpha=c)
        X = torch.baddbmm(X, poly, X, beta=a)
    if tall:
        X = X.mT
    return X.squeeze(0) if G.ndim == 2 else X


LR_RULES = ("original", "match_rms_adamw")


def lr_multiplier(lr_rule: str, shape: tuple[int, int]) -> float:
    """lr_eff / lr for a matrix (or block) of this shape; the names are torch.optim.Muon's."""
    A, B = shape
    if lr_rule == "original":  # Keller Jordan
        return math.sqrt(max(1.0, A / B))
    if lr_rule == "match_rms_adamw":  # Moonlight: a full-rank orthogonal (A, B) matrix has RMS
        return 0.2 * math.sqrt(max(A, B))  # 1/sqrt(max(A, B)), so this gives AdamW's RMS of 0.2
    raise ValueError(f"lr_rule={lr_rule!r}: expected one of {LR_RULES}")


# ----------------------------------------------------------------------------------------------
# The update maths: pure functions of lists of tensors, in place where the name ends in _


def momentum_(grads: list[Tensor], momentum_buffers: list[Tensor], mu, nesterov: bool) -> list[Tensor]:
    """M <- mu M + G for every buffer (in place, fp32); returns the directions to orthogonalise,
    G + mu M (Nesterov) or M. mu: a number or a 0-dim tensor."""
    directions = []
    for g, buf in zip(grads, momentum_buffers):
        g = g.float()
        buf.mul_(mu).add_(g)
        directions.append(g + buf * mu if nesterov else buf)
    return directions


def block_shape(shape: tuple[int, int], blocks: tuple[int, int]) -> tuple[int, int]:
    return shape[0] // blocks[0], shape[1] // blocks[1]


def to_blocks(x: Tensor, blocks: tuple[int, int]) -> Tensor:
    """x (m, n) cut into a grid of blocks=(r, c): (r c, m / r, n / c), row by row. (H, 1) gives each
    attention head's rows, (1, H) each head's columns, (1, 1) the whole matrix."""
    r, c = blocks
    return x.unflatten(0, (r, -1)).unflatten(2, (c, -1)).transpose(1, 2).flatten(0, 1)


def from_blocks(x: Tensor, blocks: tuple[int, int]) -> Tensor:
    """The matrix that to_blocks(matrix, blocks) cut into x."""
    r, c = blocks
    return x.unflatten(0, (r, c)).transpose(1, 2).flatten(2, 3).flatten(0, 1)


def as_wide(x: Tensor) -> Tensor:
    """A matrix or batch of matrices on its wide side (A <= B)."""
    return x.mT if x.size(-2) > x.size(-1) else x


def orthogonalize(directions: list[Tensor], blocks: list[tuple[int, int]], coefficients: str, ns_steps: int,
                  ns_dtype: torch.dtype) -> list[Tensor]:
    """Newton-Schulz on every block of every direction in one batch: each block (on its wide side)
    is orthogonalised as its own matrix, so all blocks must share one wide shape. Returns each
    direction's update in its own shape, in ns_dtype."""
    pieces = [as_wide(to_blocks(d, b)) for d, b in zip(directions, blocks)]
    orthogonal = newton_schulz(torch.cat(pieces), coefficients, ns_steps, dtype=ns_dtype)
    updates = []
    for d, b, o in zip(directions, blocks, orthogonal.split([len(p) for p in pieces])):
        rows, cols = block_shape(d.shape, b)
        updates.append(from_blocks(o.mT if rows > cols else o, b))
    return updates


def orthogonal_norm(shape: tuple[int, int], blocks: tuple[int, int]) -> float:
    """The Frobenius norm of an exactly orthogonal update cut in these blocks: sqrt(blocks x min side)."""
    return math.sqrt(blocks[0] * blocks[1] * min(block_shape(shape, blocks)))


def normuon_(updates: list[Tensor], second_moments: list[Tensor], beta2: float, eps: float,
             norms: list[float]) -> list[Tensor]:
    """NorMuon (Li et al., arXiv 2510.05491): normalise each neuron of each orthogonalised update by
    the root of its running mean square, then restore the update's size.

        v <- beta2 v + (1 - beta2) mean_j O_ij^2     (in place: second_moments, fp32)
        O_hat = O / (sqrt(v) + eps)                   (v broadcast along each neuron)
        O_hat <- O_hat * norm / ||O_hat||_F

    A neuron is a row of W (the paper: W's output neurons) when v has W's row count, else a column
    (normuon_axis="larger" on a wide W: the larger side, as modded-nanogpt and nanochat do).
    norm is the Frobenius norm of an orthogonal update (orthogonal_norm), so lr_multiplier then
    sizes the step exactly as it does for Muon; with "match_rms_adamw" this is the paper's
    0.2 lr sqrt(m n) / ||O_hat||_F. A common factor of v cancels in the rescaling, so v needs no
    bias correction.
    """
    normalized = []
    for o, v, norm in zip(updates, second_moments, norms):
        o = o.float()
        per_row = v.numel() == o.size(0)
        v.lerp_(o.square().mean(dim=1 if per_row else 0), 1 - beta2)
        scale = v.sqrt() + eps
        o_hat = o / (scale[:, None] if per_row else scale[None, :])
        normalized.append(o_hat * (norm / o_hat.norm().clamp_min(eps)))
    return normalized


def decay_and_step_(params: list[Tensor], updates: list[Tensor], lr, weight_decay, multipliers: list[float],
                    cautious: bool = False) -> None:
    """W <- (1 - lr wd) W - lr m U, in place, for each matrix W, its update U and its lr multiplier
    m. weight_decay None: no decay. lr and weight_decay: numbers or 0-dim tensors. cautious (Chen et
    al., arXiv 2510.12402): decay only the entries where U and W have the same sign, the ones the
    update already moves toward 0."""
    for p, u, m in zip(params, updates, multipliers):
        u = u.to(p.dtype)
        if weight_decay is not None:
            decay = 1 - lr * weight_decay
            p.mul_(torch.where(u * p >= 0, decay, 1.0) if cautious else decay)
        p.sub_(u * (lr * m))


def muon_update_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                 second_moments: list[Tensor] | None, lr, weight_decay, momentum, *, blocks: tuple, nesterov: bool,
                 lr_rule: str, ns_coefficients: str, ns_steps: int, ns_dtype: torch.dtype, normuon_beta2: float,
                 normuon_eps: float, cautious: bool) -> None:
    """One Muon step of matrices whose blocks share a wide shape: momentum, Newton-Schulz of each
    block, NorMuon (when second_moments is given), decay and step. The only Muon update there is:
    every rank runs it on the matrices it owns, eager or as one compiled graph."""
    directions = momentum_(grads, momentum_buffers, momentum, nesterov)
    updates = orthogonalize(directions, list(blocks), ns_coefficients, ns_steps, ns_dtype)
    if second_moments is not None:
        norms = [orthogonal_norm(p.shape, b) for p, b in zip(params, blocks)]
        updates = normuon_(updates, second_moments, normuon_beta2, normuon_eps, norms)
    multipliers = [lr_multiplier(lr_rule, block_shape(p.shape, b)) for p, b in zip(params, blocks)]
    decay_and_step_(params, updates, lr, weight_decay, multipliers, cautious)


def cautious_adamw_update_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                           exp_avg_sqs: list[Tensor], steps: list[Tensor], lr, weight_decay, *,
                           betas: tuple[float, float], eps: float) -> None:
    """AdamW (Loshchilov & Hutter) with cautious weight decay, in place: m and v as
    torch.optim.AdamW keeps them, W <- W - lr (U + wd 1[U W >= 0] W), U = m_hat / (sqrt(v_hat) + eps)."""
    beta1, beta2 = betas
    updates = []
    for g, m, v, t in zip(grads, exp_avgs, exp_avg_sqs, steps):
        t.add_(1)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denominator = v.sqrt() / (1 - beta2 ** t).sqrt() + eps
        updates.append(m / ((1 - beta1 ** t) * denominator))
    decay_and_step_(params, updates, lr, weight_decay, [1.0] * len(params), cautious=True)


# ----------------------------------------------------------------------------------------------
# Who owns which matrix, and how gradients and weights travel


def ns_flops(shape: tuple[int, int], steps: int) -> int:
    """Multiply-add FLOPs of Newton-Schulz on one (A, B) matrix, worked on its wide side (A <= B):
    per step X X^T (2 A^2 B), S S (2 A^3) and (b S + c S^2) X (2 A^2 B)."""
    A, B = sorted(shape)
    return steps * (4 * A * A * B + 2 * A ** 3)


def plan_owners(costs: list[int], world: int) -> list[int]:
    """The rank that updates each matrix, given each one's Newton-Schulz FLOPs: longest-processing-
    time first, so the ranks' work is balanced (a 3072 x 768 matrix costs 6x a 768 x 768 one)."""
    load, owner = [0] * world, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner[i] = min(range(world), key=lambda r: (load[r], r))
        load[owner[i]] += costs[i]
    return owner


def make_buckets(params: tuple[Tensor], blocks: tuple[tuple[int, int]], ns_steps: int, kind: type, rank: int,
                 world: int, process_group=None) -> list["Bucket"]:
    """The matrices in buckets of one wide block shape (and dtype and device), each with its owner;
    the owners balance Newton-Schulz FLOPs over the whole list."""
    costs = [b[0] * b[1] * ns_flops(block_shape(p.shape, b), ns_steps) for p, b in zip(params, blocks)]
    owners = plan_owners(costs, world)
    same_shape = {}
    for i, (p, b) in enumerate(zip(params, blocks)):
        same_shape.setdefault((tuple(sorted(block_shape(p.shape, b))), p.dtype, p.device), []).append(i)
    return [kind([params[i] for i in ids], [blocks[i] for i in ids], [owners[i] for i in ids], rank, world,
                 process_group) for ids in same_shape.values()]


class Bucket:
    """Matrices of one Muon group whose blocks share a wide shape (one batched Newton-Schulz), each
    owned by one rank of a process group: the owner alone keeps a matrix's state and runs its
    update. The bucket moves the gradients to the owners and the new weights back, as a
    reduce-scatter and an all-gather of flat buffers, each rank's matrices in a segment of their
    own. With one rank nothing moves and nothing is copied: the owner updates the parameters from
    their own .grad. A matrix is updated when its owner holds a gradient for it (every rank
    must hold the same ones); a rank without one sends zeros."""

    def __init__(self, params: list[Tensor], blocks: list[tuple[int, int]], owners: list[int], rank: int,
                 world: int, process_group=None):
        self.params, self.blocks, self.owners = params, blocks, owners
        self.rank, self.world, self.process_group = rank, world, process_group
        self.owned = [[i for i in range(len(params)) if owners[i] == r] for r in range(world)]
        self.mine = self.owned[rank]
        self.segment = max(sum(params[i].numel() for i in owned) for owned in self.owned)

    def send_gradients(self) -> None:
        if self.world == 1:
            return
        device = self.params[0].device
        flat = torch.zeros(self.world * self.segment, device=device)
        for r, owned in enumerate(self.owned):
            self._pack(flat[r * self.segment:], [self.params[i].grad for i in owned], owned)
        self._summed = torch.empty(self.segment, device=device)
        self._work = _reduce_scatter_single(self._summed, flat, op=dist.ReduceOp.SUM, group=self.process_group,
                                            async_op=True)

    def owned_gradients_and_weights(self) -> tuple[list[Tensor], list[Tensor]]:
        """The mean gradient and the weight of each matrix this rank owns, once they are here."""
        weights = [self.params[i] for i in self.mine]
        if self.world == 1:
            return [p.grad for p in weights], weights
        self._work.wait()
        self._summed /= self.world
        means = self._unpack(self._summed, self.mine)
        return [g if p.grad is not None else None for g, p in zip(means, weights)], weights

    def send_weights(self) -> None:
        if self.world == 1:
            return
        p = self.params[0]
        local = torch.zeros(self.segment, device=p.device, dtype=p.dtype)
        self._pack(local, [self.params[i] for i in self.mine], self.mine)
        self._gathered = torch.empty(self.world * self.segment, device=p.device, dtype=p.dtype)
        self._work = _all_gather_single(self._gathered, local, group=self.process_group, async_op=True)

    def receive_weights(self) -> None:
        if self.world == 1:
            return
        self._work.wait()
        for r, owned in enumerate(self.owned):
            if r != self.rank:
                for i, weight in zip(owned, self._unpack(self._gathered[r * self.segment:], owned)):
                    self.params[i].copy_(weight)

    def _pack(self, flat: Tensor, tensors: list[Tensor | None], indices: list[int]) -> None:
        start = 0
        for i, t in zip(indices, tensors):
            n = self.params[i].numel()
            if t is not None:
                flat[start:start + n].copy_(t.flatten())
            start += n

    def _unpack(self, flat: Tensor, indices: list[int]) -> list[Tensor]:
        sizes = [self.params[i].numel() for i in indices]
        return [piece.view(self.params[i].shape) for i, piece in zip(indices, flat[:sum(sizes)].split(sizes))]


class ShardedBucket(Bucket):
    """The adapter for FSDP2's DTensor parameters (rows sharded over a 1-D mesh, fully_shard's
    layout), whose gradients FSDP has already averaged: each matrix's gradient and weight rows
    are gathered whole on its owner, which runs the same update, and the new rows are scattered
    back to the ranks that hold them."""

    def send_gradients(self) -> None:
        self._works, self._gathered = [], []
        for i, p in enumerate(self.params):
            local = p.to_local()
            grad = p.grad.to_local() if p.grad is not None else torch.zeros_like(local)
            rows = self._chunk_rows(p)  # torch.chunk's: every rank's piece padded to the first's rows
            piece = torch.zeros(rows, 2 * p.size(1), device=local.device, dtype=local.dtype)
            piece[:len(local)] = torch.cat([grad, local], dim=1)
            gathered = [torch.empty_like(piece) for _ in range(self.world)] if self.owners[i] == self.rank else None
            self._gathered.append(gathered)
            self._works.append(dist.gather(piece, gathered, dst=self._global(self.owners[i]),
                                           group=self.process_group, async_op=True))

    def owned_gradients_and_weights(self) -> tuple[list[Tensor], list[Tensor]]:
        for work in self._works:
            work.wait()
        whole = [torch.cat(self._gathered[i])[:self.params[i].size(0)] for i in self.mine]
        self._weights = [w[:, self.params[i].size(1):] for i, w in zip(self.mine, whole)]
        grads = [w[:, :self.params[i].size(1)] for i, w in zip(self.mine, whole)]
        return [g if self.params[i].grad is not None else None for i, g in zip(self.mine, grads)], self._weights

    def send_weights(self) -> None:
        new_rows = dict(zip(self.mine, self._weights))
        self._works, self._received = [], []
        for i, p in enumerate(self.params):
            rows = self._chunk_rows(p)
            received = torch.empty(rows, p.size(1), device=p.to_local().device, dtype=p.dtype)
            pieces = None
            if i in new_rows:
                padded = torch.zeros(rows * self.world, p.size(1), device=received.device, dtype=p.dtype)
                padded[:p.size(0)] = new_rows[i]
                pieces = list(padded.split(rows))
            self._received.append(received)
            self._works.append(dist.scatter(received, pieces, src=self._global(self.owners[i]),
                                            group=self.process_group, async_op=True))

    def receive_weights(self) -> None:
        for p, work, received in zip(self.params, self._works, self._received):
            work.wait()
            local = p.to_local()
            local.copy_(received[:len(local)])

    def _chunk_rows(self, p: Tensor) -> int:
        return -(-p.size(0) // self.world)

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.process_group, group_rank)


# ----------------------------------------------------------------------------------------------
# The optimizer


NORMUON_AXES = ("rows", "larger")  # normuon_axis: W's rows (the paper), or the larger side's neurons


class Muon(torch.optim.Optimizer):
    """Muon for groups with use_muon=True (the default), AdamW for groups with use_muon=False.

    Group options, defaulting to the constructor's: lr (a number or a one-element tensor),
    weight_decay; Muon's momentum, nesterov, ns_steps, ns_coefficients ("classic" or
    "polar_express"), ns_dtype, lr_rule ("original" or "match_rms_adamw": Moonlight's, which gives
    Muon's update AdamW's RMS so one lr and wd serve both); AdamW's betas and eps; and the options
    of the update, each off by default:

    - normuon (normuon_beta2, normuon_eps, normuon_axis): NorMuon's per-neuron normalisation of the
      orthogonalised update; axis "rows" (the paper: W's rows) or "larger" (modded-nanogpt, nanochat).
    - cautious_weight_decay: decay only where update and weight share a sign, Muon and AdamW alike.
    - blocks: one (row_blocks, col_blocks) per parameter, e.g. (n_heads, 1) for a query projection,
      (1, n_heads) for an attention output; each block is orthogonalised as its own matrix, with
      its own lr_multiplier. Absent, or (1, 1): the whole matrix.

    How it runs, the same maths everywhere:

    - compile=True: each bucket's muon_update_ (and cautious AdamW) is one torch.compile graph; lr,
      weight decay and momentum enter as tensors, so schedules never recompile it.
    - torch.distributed (auto-detected, or distributed=True/False): leave the Muon parameters out
      of DDP, their gradients are each rank's own. Each matrix has one owner rank (plan_owners).
      A step sends every bucket's gradients to their owners (reduce-scatter) before computing any
      update, then updates each bucket as soon as its gradients are in and sends its new weights
      out at once (all-gather): communication runs under the next bucket's Newton-Schulz. Only the
      owner keeps a matrix's state; state_dict() is then a collective that returns all of it.
      AdamW groups expect gradients already averaged (DDP).
    - DTensor parameters (FSDP2's fully_shard on a 1-D mesh): the same owners and update, each
      matrix's rows gathered on its owner and scattered back (ShardedBucket).
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_coefficients: str = "classic",
                 lr_rule: str = "match_rms_adamw", betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 ns_dtype: torch.dtype = torch.bfloat16, normuon: bool = False, normuon_beta2: float = 0.95,
                 normuon_eps: float = 1e-8, normuon_axis: str = "rows", cautious_weight_decay: bool = False,
                 compile: bool = False, distributed: bool | None = None):
        defaults = dict(lr=lr, weight_decay=weight_decay, use_muon=True, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_dtype=ns_dtype, lr_rule=lr_rule,
                        betas=betas, eps=eps, normuon=normuon, normuon_beta2=normuon_beta2, normuon_eps=normuon_eps,
                        normuon_axis=normuon_axis, cautious_weight_decay=cautious_weight_decay)
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        # How the optimizer runs, not what it computes: attributes, not group options.
        self.compile, self.distributed = compile, distributed
        self._reset_caches()
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    def __getstate__(self):  # copies and pickles keep how the optimizer runs
        return {**super().__getstate__(), "compile": self.compile, "distributed": self.distributed}

    def __setstate__(self, state):
        """Also how load_state_dict ends: a group saved before an option existed gets the option's
        default, and an AdamW step saved as a number becomes a tensor again."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key != "differentiable":  # torch's Optimizer adds it to defaults for its own use
                    group.setdefault(key, value)
            for p in group["params"]:
                step = self.state.get(p, {}).get("step")
                if step is not None and not torch.is_tensor(step):
                    self.state[p]["step"] = torch.tensor(float(step), device=p.device)
        self._reset_caches()

    def _reset_caches(self):
        self._buckets: dict[int, list[Bucket]] = {}  # per Muon group
        self._adamw: dict[int, torch.optim.AdamW] = {}  # per plain AdamW group: torch's, on this state
        self._slots: dict[tuple, dict[str, Tensor]] = {}  # per group and device: compiled steps' 0-dim inputs

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_gradients(group)
            if not group["use_muon"]:
                self._adamw_step(group)
        work = [(group, bucket) for group in self.param_groups if group["use_muon"] for bucket in self._plan(group)]
        for _, bucket in work:  # every gradient on its way to its owner before any update is computed
            bucket.send_gradients()
        for group, bucket in work:  # each bucket's update as soon as its gradients are in, its weights sent at once
            self._muon_step(group, bucket)
            bucket.send_weights()
        for _, bucket in work:
            bucket.receive_weights()
        return loss

    def _muon_step(self, group: dict, bucket: "Bucket") -> None:
        grads, weights = bucket.owned_gradients_and_weights()
        trained = [j for j, g in enumerate(grads) if g is not None]
        if not trained:
            return
        params = [bucket.params[bucket.mine[j]] for j in trained]
        update = _compiled(muon_update_) if self.compile else muon_update_
        update([weights[j] for j in trained], [grads[j] for j in trained],
               [self._state(p, "momentum_buffer", group) for p in params],
               [self._state(p, "second_moment", group) for p in params] if group["normuon"] else None,
               *self._hyperparameters(group, params[0].device, ("lr", "weight_decay", "momentum")),
               blocks=tuple(bucket.blocks[bucket.mine[j]] for j in trained), nesterov=group["nesterov"],
               lr_rule=group["lr_rule"], ns_coefficients=group["ns_coefficients"], ns_steps=group["ns_steps"],
               ns_dtype=group["ns_dtype"], normuon_beta2=group["normuon_beta2"], normuon_eps=group["normuon_eps"],
               cautious=group["cautious_weight_decay"])

    def _adamw_step(self, group: dict) -> None:
        """torch.optim.AdamW's fused kernel (one pass over each tensor; foreach for DTensors), or with
        cautious weight decay cautious_adamw_update_; both keep the same state: step, exp_avg, exp_avg_sq."""
        if not group["cautious_weight_decay"]:
            if id(group) not in self._adamw:
                plain = not any(isinstance(p, DTensor) for p in group["params"])
                self._adamw[id(group)] = torch.optim.AdamW(group["params"], fused=plain or None,
                                                           foreach=None if plain else True)
                self._adamw[id(group)].state = self.state  # it reads and writes this optimizer's state
            adamw = self._adamw[id(group)]
            adamw.param_groups[0].update({key: group[key] for key in ("lr", "weight_decay", "betas", "eps")})
            _without_hooks(torch.optim.AdamW.step)(adamw)  # the step hooks that run are this optimizer's
            return
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if "step" not in self.state[p]:
                self.state[p].update(step=torch.zeros((), device=p.device), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        update = _compiled(cautious_adamw_update_) if self.compile else cautious_adamw_update_
        update(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
               [s["step"] for s in states], *self._hyperparameters(group, params[0].device, ("lr", "weight_decay")),
               betas=group["betas"], eps=group["eps"])

    def _hyperparameters(self, group: dict, device: torch.device, keys: tuple[str, ...]) -> list:
        """The group's values of keys as the update functions take them: weight decay 0 as None (no
        decay pass); under compile, copied into persistent 0-dim device tensors, so a schedule that
        changes them every step neither recompiles a graph nor waits for the device."""
        values = [group[key].reshape(()) if torch.is_tensor(group[key]) else group[key] for key in keys]
        if self.compile:
            slots = self._slots.setdefault((id(group), device), {})
            for key, value in zip(keys, values):
                slot = slots.setdefault(key, torch.zeros((), device=device))
                slot.copy_(value) if torch.is_tensor(value) else slot.fill_(value)
            values = [slots[key] for key in keys]
        no_decay = not torch.is_tensor(group["weight_decay"]) and group["weight_decay"] == 0
        return [None if key == "weight_decay" and no_decay else value for key, value in zip(keys, values)]

    def _state(self, p: Tensor, key: str, group: dict) -> Tensor:
        """The owner's momentum_buffer (p's whole shape) or NorMuon second_moment of p, fp32, zeros at first."""
        if key not in self.state[p]:
            rows, cols = p.shape
            shape = ((rows, cols) if key == "momentum_buffer" else
                     (rows,) if group["normuon_axis"] == "rows" or rows >= cols else (cols,))
            self.state[p][key] = torch.zeros(shape, dtype=torch.float32, device=_local(p).device)
        return self.state[p][key]

    def _plan(self, group: dict) -> list["Bucket"]:
        """The group's buckets: plain tensors over the default process group when distributed (else
        one rank), DTensors over their mesh."""
        if id(group) not in self._buckets:
            by_mesh = {}
            for p, blocks in zip(group["params"], _blocks(group)):
                by_mesh.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append((p, blocks))
            self._buckets[id(group)] = []
            for mesh, members in by_mesh.items():
                if mesh is not None:
                    where = (ShardedBucket, mesh.get_local_rank(), mesh.size(), mesh.get_group())
                elif self.distributed:
                    where = (Bucket, dist.get_rank(), dist.get_world_size(), None)
                else:
                    where = (Bucket, 0, 1, None)
                self._buckets[id(group)] += make_buckets(*zip(*members), group["ns_steps"], *where)
        return self._buckets[id(group)]

    def state_dict(self):
        """Under owner sharding a collective, every rank must call it: each contributes its matrices'
        state and gets the whole state back, as one process holds it (then keeps only its own)."""
        borrowed = []
        for bucket in [b for g in self.param_groups if g["use_muon"] for b in self._plan(g) if b.world > 1]:
            mine = {i: {k: v.cpu() for k, v in self.state[bucket.params[i]].items()}
                    for i in bucket.mine if bucket.params[i] in self.state}
            everyone = [None] * bucket.world
            dist.all_gather_object(everyone, mine, group=bucket.process_group)
            for rank, theirs in enumerate(everyone):
                for i, state in theirs.items() if rank != bucket.rank else ():
                    p = bucket.params[i]
                    self.state[p] = {k: v.to(_local(p).device) for k, v in state.items()}
                    borrowed.append(p)
        state_dict = super().state_dict()
        for p in borrowed:
            del self.state[p]
        return state_dict

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # under owner sharding each rank keeps its own matrices' state
            for bucket in self._plan(group) if group["use_muon"] else ():
                for i in set(range(len(bucket.params))) - set(bucket.mine):
                    self.state.pop(bucket.params[i], None)


# torch 2.13 renamed the *_tensor collectives (deprecated since) to *_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_COMPILED = {}


def _compiled(fn):
    """fn under torch.compile, built once per process: static shapes, one graph per bucket or group."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[fn]


def _without_hooks(step):
    """An optimizer class's step without the wrapper in which torch runs the step hooks."""
    return getattr(step, "__wrapped__", step)


def _check_group(group: dict) -> None:
    """A ValueError naming what is wrong with a group's options or parameters."""
    lr = group["lr"]
    if torch.is_tensor(lr) and lr.numel() != 1:
        raise ValueError(f"lr has shape {tuple(lr.shape)}: a tensor lr must have one element")
    for key in ("lr", "weight_decay", "eps", "normuon_eps"):
        if not 0 <= float(group[key]) < math.inf:
            raise ValueError(f"{key}={group[key]}: expected a finite number >= 0")
    for key, value in [("momentum", group["momentum"]), ("normuon_beta2", group["normuon_beta2"]),
                       *zip(("betas[0]", "betas[1]"), group["betas"])]:
        if not 0 <= value < 1:
            raise ValueError(f"{key}={value}: expected a number in [0, 1)")
    if group["normuon_axis"] not in NORMUON_AXES:
        raise ValueError(f"normuon_axis={group['normuon_axis']!r}: expected one of {NORMUON_AXES}")
    lr_multiplier(group["lr_rule"], (1, 1))
    ns_schedule(group["ns_coefficients"], group["ns_steps"])
    names = group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]
    if len(_blocks(group)) != len(group["params"]):
        raise ValueError(f"blocks has {len(group['blocks'])} entries for {len(group['params'])} parameters: give "
                         "one (row_blocks, col_blocks) per parameter, (1, 1) for a whole matrix")
    for name, p, (r, c) in zip(names, group["params"], _blocks(group)):
        if p.is_complex():
            raise ValueError(f"parameter {name} is complex ({p.dtype}): muon.Muon takes real parameters; "
                             "optimize torch.view_as_real of it instead")
        if not group["use_muon"]:
            continue
        if p.ndim != 2:
            raise ValueError(f"Muon got parameter {name} of shape {tuple(p.shape)}: Muon takes 2-D matrices only; "
                             "put it in a group with use_muon=False (AdamW)")
        if r < 1 or c < 1 or p.size(0) % r or p.size(1) % c:
            raise ValueError(f"blocks {(r, c)} for parameter {name} of shape {tuple(p.shape)}: expected counts "
                             "that divide its rows and columns")
        if isinstance(p, DTensor) and (p.device_mesh.ndim != 1 or p.placements != (Shard(0),)):
            raise ValueError(f"parameter {name} is a DTensor placed {p.placements} on a {p.device_mesh.ndim}-D mesh: "
                             "Muon takes rows sharded on a 1-D mesh (fully_shard's layout)")


def _check_gradients(group: dict) -> None:
    for p in group["params"]:
        if p.grad is not None and p.grad.is_sparse:
            raise RuntimeError(f"a parameter of shape {tuple(p.shape)} has a sparse gradient: muon.Muon takes dense ones")


def _blocks(group: dict) -> list[tuple[int, int]]:
    return [tuple(b) for b in group.get("blocks") or [(1, 1)] * len(group["params"])]


def _local(p: Tensor) -> Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


# ----------------------------------------------------------------------------------------------
# Parameter groups


PARAMETER_KINDS = ("matrices", "embeddings", "head", "scalars")


def param_groups(model: torch.nn.Module, head_names: tuple[str, ...] = ("lm_head",), **options: dict) -> list[dict]:
    """Muon.param_groups for a model: one group per kind of parameter that it has, in this order,
    each a list of (name, parameter) pairs and every trainable parameter in exactly one:

    - "matrices": the hidden 2-D weights, Muon (use_muon=True);
    - "embeddings": every nn.Embedding's weight, AdamW;
    - "head": the weights whose name contains one of head_names (the output layer), AdamW;
    - "scalars": every other parameter (norm gains, biases, per-layer scalars), AdamW.

    options: per kind, the group's own settings, e.g. head=dict(lr=0.008), or matrices=dict(use_muon=False)
    for an AdamW baseline; the rest come from the optimizer's defaults.
    """
    unknown = set(options) - set(PARAMETER_KINDS)
    if unknown:
        raise ValueError(f"param_groups: unknown kinds {sorted(unknown)}; expected some of {PARAMETER_KINDS}")
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    kinds = {kind: [] for kind in PARAMETER_KINDS}
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for name, p in trained:
        kind = ("embeddings" if id(p) in embeddings else "head" if any(h in name for h in head_names)
                else "matrices" if p.ndim == 2 else "scalars")
        kinds[kind].append((name, p))
    assert sorted(n for pairs in kinds.values() for n, _ in pairs) == sorted(n for n, _ in trained)
    return [{"params": pairs, "use_muon": kind == "matrices", **options.get(kind, {})}
            for kind, pairs in kinds.items() if pairs]


# ----------------------------------------------------------------------------------------------
# MuonClip: per-head QK-clip (Kimi K2, arXiv 2507.20534)


@dataclass
class AttentionHeads:
    """Where one attention layer keeps each head's query and key rows.

    MLA: q_weight is wq_b (or wq), each head's rows [q_nope | q_rope]; k_weight is wkv_b,
    each head's rows [k_nope | v]. The rope key is shared by all heads (it lives in wkv_a) and
    is never scaled, since scaling it would scale every head.
    MHA: q_weight and k_weight hold each head's q and k rows; qk_rope_dim = v_dim = 0.
    """

    q_weight: Tensor
    k_weight: Tensor
    n_heads: int
    qk_nope_dim: int
    qk_rope_dim: int = 0
    v_dim: int = 0

    @classmethod
    def mha(cls, q_weight: Tensor, k_weight: Tensor, n_heads: int) -> "AttentionHeads":
        """Standard multi-head attention's heads: q = x @ q_weight.T and k = x @ k_weight.T, head h in
        rows h d .. (h + 1) d of each (d = rows / n_heads), RoPE on all of q and k, part or none (it is
        linear, so scaling a head's q and k rows by sqrt(gamma) scales its logits by gamma). Grouped-
        query attention, fewer k heads than q heads, is not this layout: a k head serves several q heads.

            heads = [muon.AttentionHeads.mha(layer.wq.weight, layer.wk.weight, n_heads=8) for layer in layers]
        """
        if q_weight.shape != k_weight.shape:
            raise ValueError(f"q_weight {tuple(q_weight.shape)} and k_weight {tuple(k_weight.shape)}: expected one "
                             "shape (one k head per q head; grouped-query attention is not supported)")
        return cls(q_weight, k_weight, n_heads, q_weight.size(0) // n_heads)

    def __post_init__(self):
        H = self.n_heads
        expected_q = H * (self.qk_nope_dim + self.qk_rope_dim)
        expected_k = H * (self.qk_nope_dim + self.v_dim)
        if self.q_weight.ndim != 2 or self.q_weight.size(0) != expected_q:
            raise ValueError(f"q_weight has shape {tuple(self.q_weight.shape)}: expected {expected_q} rows "
                             f"= n_heads {H} x (qk_nope_dim {self.qk_nope_dim} + qk_rope_dim {self.qk_rope_dim})")
        if self.k_weight.ndim != 2 or self.k_weight.size(0) != expected_k:
            raise ValueError(f"k_weight has shape {tuple(self.k_weight.shape)}: expected {expected_k} rows "
                             f"= n_heads {H} x (qk_nope_dim {self.qk_nope_dim} + v_dim {self.v_dim})")


@torch.no_grad()
def max_logits(q: Tensor, k: Tensor, softmax_scale: float | None = None, causal: bool = True) -> Tensor:
    """Each head's largest pre-softmax logit over a batch, (n_heads,) fp32: what qk_clip_ needs from
    one layer of a model without a probe of its own. q and k as scaled_dot_product_attention takes
    them, (B, n_heads, T, d), roped; softmax_scale defaults to 1/sqrt(d) as SDPA's does. It builds
    every (T, T) score matrix at once (model.py's probe takes tiles of them; kernels.py)."""
    scale = q.size(-1) ** -0.5 if softmax_scale is None else softmax_scale
    scores = (q.detach() @ k.detach().mT).float() * scale
    if causal:
        T = q.size(-2)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return scores.amax(dim=(0, 2, 3))


@torch.no_grad()
def qk_clip_(layers: list[AttentionHeads], max_logits: Tensor, tau: float, alpha: float = 0.5,
             check_finite: bool = True, compile: bool = False) -> Tensor:
    """Rescale, in place, every head whose max logit S exceeds tau so that its logits scale by tau / S.

    max_logits: (n_layers, n_heads), the largest pre-softmax logit (scaled, causal mask applied)
    of each head over the whole step's batch, already max-reduced over micro-batches and ranks.
    With gamma = tau / S: q_nope rows *= gamma^alpha, k_nope rows *= gamma^(1 - alpha), q_rope
    rows *= gamma (the rope key is shared by all heads), so every logit of the head scales by gamma
    and re-running the batch gives max logit tau. alpha = 0.5 is Kimi K2's even split; Megatron-LM
    offers the same alpha (--qk-clip-alpha). Heads at or below tau are multiplied by exactly 1.
    Returns how many heads were clipped as a 0-dim tensor (.item() for the number), so the caller
    decides when to pay for a device sync.

    A non-finite S (a diverged run) never touches the weights: gamma = tau / inf = 0 would zero the
    head's q and k for good. With check_finite (the default) it is a ValueError naming the layer
    and head, at the price of one device sync; with check_finite=False such heads are left as they
    are and the caller checks max_logits itself (train.py does, once per log interval).

    With compile, the rescaling of every layer is one torch.compile graph (static shapes, built
    once per model layout and tau) instead of a dozen small eager ops a layer, each dispatched
    from Python. Same numbers; no host sync either way.
    """
    if tau <= 0:
        raise ValueError(f"tau={tau}: expected a positive logit threshold")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha}: expected a share of the clip in [0, 1]")
    if max_logits.ndim != 2 or max_logits.size(0) != len(layers):
        raise ValueError(f"max_logits has shape {tuple(max_logits.shape)}: expected ({len(layers)}, n_heads)")
    if check_finite:
        raise_if_not_finite(max_logits)
    for heads, layer_max in zip(layers, max_logits):
        if layer_max.numel() != heads.n_heads:
            raise ValueError(f"{layer_max.numel()} max logits for a layer of {heads.n_heads} heads")
    clip = _compiled(_clip_layers_) if compile else _clip_layers_
    layout = tuple((h.qk_nope_dim, h.qk_rope_dim, h.v_dim) for h in layers)
    return clip([h.q_weight for h in layers], [h.k_weight for h in layers], max_logits, float(tau), float(alpha), layout)


def _clip_layers_(q_weights: list[Tensor], k_weights: list[Tensor], max_logits: Tensor, tau: float, alpha: float,
                  layout: tuple) -> Tensor:
    """qk_clip_'s rescaling, with the heads taken apart so torch.compile sees tensors and ints only."""
    n_clipped = torch.zeros((), dtype=torch.int64, device=max_logits.device)
    for q_weight, k_weight, layer_max, (nope, rope, v_dim) in zip(q_weights, k_weights, max_logits, layout):
        layer_max = layer_max.double()  # so a float64 model is clipped to float64 precision
        over = (layer_max > tau) & layer_max.isfinite()
        gamma = torch.where(over, tau / layer_max, torch.ones_like(layer_max))
        # pow(0.5) is computed as sqrt: alpha = 0.5 is the sqrt split, bit for bit.
        _scale_head_rows_(q_weight, gamma.pow(alpha), nope, gamma, rope)
        _scale_head_rows_(k_weight, gamma.pow(1 - alpha), nope, torch.ones_like(gamma), v_dim)
        n_clipped += over.sum()
    return n_clipped


def raise_if_not_finite(max_logits: Tensor) -> None:
    """A ValueError naming the first layer and head whose max logit is nan or inf (one device sync)."""
    bad = ~max_logits.isfinite()
    if bad.any():
        layer, head = bad.nonzero()[0].tolist()
        raise ValueError(f"the max attention logit of layer {layer} head {head} is {max_logits[layer, head].item()} "
                         f"({int(bad.sum())} non-finite of {bad.numel()} heads): the run has diverged; "
                         "no head was rescaled")


def _scale_head_rows_(weight: Tensor, first_scale: Tensor, first_rows: int, rest_scale: Tensor, rest_rows: int):
    """Per head, multiply the first `first_rows` rows by first_scale[h] and the next `rest_rows` by rest_scale[h]."""
    per_head = torch.cat([first_scale[:, None].expand(-1, first_rows), rest_scale[:, None].expand(-1, rest_rows)], dim=1)
    weight.mul_(per_head.reshape(-1, 1).to(device=weight.device, dtype=weight.dtype))
