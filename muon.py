"""Muon with an AdamW companion, and MuonClip (per-head QK-clip). Torch only.

Copy this one file into any project:

    import muon
    groups = muon.hybrid_param_groups(model, adamw_names=("lm_head",))
    opt = muon.Muon(groups, lr=3e-4, weight_decay=0.1)   # one step(), one state_dict()
    ...
    n_clipped = muon.qk_clip_(model.attention_heads(), max_logits, tau=100.0)

Muon (Keller Jordan, 2024) for a hidden matrix W of shape (A, B) with gradient G:

    M <- mu * M + G                     momentum_, fp32
    U <- G + mu * M  (Nesterov) or M
    O <- NS(U)                          orthogonalize: newton_schulz, approximately U V^T of U = U S V^T
    W <- W * (1 - lr * wd) - lr_eff(A, B) * O      decay_and_step_: decoupled decay, un-scaled lr

Options of the same update, each off by default (the Muon class's docstring has the keys):
NorMuon's per-neuron normalisation of O (normuon_, arXiv 2510.05491); cautious weight decay,
which decays only where O and W share a sign (arXiv 2510.12402), in the AdamW groups too; and
blocks, which orthogonalise each attention head's rows or columns as a matrix of its own, with
lr_eff by the block's shape (as microsoft/dion's num_heads).

Those functions are the whole update; Muon (the class) only decides who runs them on which
matrix: one process, one owner rank per matrix under torch.distributed, or a whole update
gathered for a DTensor (FSDP2) shard. Parameter groups with use_muon=False (embeddings, output
head, norms, gains, scalars) are stepped with AdamW, using the same lr and weight_decay unless
the group sets its own. With lr_rule="match_rms_adamw" (Moonlight, Kimi K2) Muon's update has
AdamW's RMS of 0.2, so one lr and one wd serve both.
"""

import itertools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate
from torch.optim.adamw import adamw as adamw_functional

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
LR_RULES = ("original", "match_rms_adamw")


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


def newton_schulz(
    G: Tensor, coefficients: str = "classic", steps: int = 5, eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
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


def lr_multiplier(lr_rule: str, shape: torch.Size) -> float:
    """lr_eff / lr for a matrix of this shape (names as in torch.optim.Muon)."""
    A, B = shape
    if lr_rule == "original":
        return math.sqrt(max(1.0, A / B))
    if lr_rule == "match_rms_adamw":
        # A full-rank orthogonal (A, B) matrix has RMS 1/sqrt(max(A, B)): this gives RMS 0.2.
        return 0.2 * math.sqrt(max(A, B))
    raise ValueError(f"lr_rule={lr_rule!r}: expected one of {LR_RULES}")


def ns_flops(shape: tuple[int, int], steps: int) -> int:
    """Multiply-add FLOPs of Newton-Schulz on one (A, B) matrix, worked on its wide side (A <= B):
    per step X X^T (2 A^2 B), S S (2 A^3) and (b S + c S^2) X (2 A^2 B)."""
    A, B = sorted(shape)
    return steps * (4 * A * A * B + 2 * A ** 3)


def plan_owners(shapes: list[tuple[int, int]], world: int, steps: int = 5) -> list[int]:
    """The rank that orthogonalises each matrix: longest-processing-time first, by NS FLOPs, so the
    ranks' NS work is balanced (a ceil split by count leaves ranks idle; a 3072 x 768 matrix costs
    6x a 768 x 768 one)."""
    load, owner = [0] * world, [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-ns_flops(shapes[i], steps), i)):
        owner[i] = min(range(world), key=lambda r: (load[r], r))
        load[owner[i]] += ns_flops(shapes[i], steps)
    return owner


# ----------------------------------------------------------------------------------------------
# The update maths, once: every step path below calls these


def momentum_(grads: list[Tensor], bufs: list[Tensor], mu, nesterov: bool) -> list[Tensor]:
    """M <- mu M + G for every buffer (in place, fp32); returns the directions to orthogonalise,
    G + mu M (Nesterov) or M. mu: a number, a 0-dim tensor (the compiled step's, so the momentum
    warm-up never recompiles) or one 0-dim tensor per matrix."""
    grads = [g.float() for g in grads]
    torch._foreach_mul_(bufs, mu)
    torch._foreach_add_(bufs, grads)
    return torch._foreach_add(grads, torch._foreach_mul(bufs, mu)) if nesterov else bufs


def to_blocks(x: Tensor, blocks: tuple[int, int]) -> Tensor:
    """x (m, n) cut into a grid of blocks=(r, c): (r c, m / r, n / c), row by row. (H, 1) gives each
    attention head's rows, (1, H) each head's columns, (1, 1) the whole matrix."""
    r, c = blocks
    return x.unflatten(0, (r, -1)).unflatten(2, (c, -1)).transpose(1, 2).flatten(0, 1)


def from_blocks(x: Tensor, blocks: tuple[int, int]) -> Tensor:
    """The matrix that to_blocks(matrix, blocks) cut into x."""
    r, c = blocks
    return x.unflatten(0, (r, c)).transpose(1, 2).flatten(2, 3).flatten(0, 1)


def block_shape(shape: tuple[int, int], blocks: tuple[int, int]) -> tuple[int, int]:
    return shape[0] // blocks[0], shape[1] // blocks[1]


def orthogonalize(directions: list[Tensor], blocks: list[tuple[int, int]], coefficients: str, ns_steps: int,
                  ns_dtype: torch.dtype) -> list[Tensor]:
    """Newton-Schulz on every block of every direction in one batch: each block (its wide side,
    A <= B) is orthogonalised as its own matrix, so all blocks must share one wide shape. Returns
    each direction's update in its own shape, in ns_dtype."""
    pieces = [_as_wide(to_blocks(d, b)) for d, b in zip(directions, blocks)]
    orthogonal = newton_schulz(torch.cat(pieces), coefficients, ns_steps, dtype=ns_dtype)
    updates = []
    for d, b, o in zip(directions, blocks, orthogonal.split([len(p) for p in pieces])):
        rows, cols = block_shape(d.shape, b)
        updates.append(from_blocks(o.mT if rows > cols else o, b))
    return updates


def muon_update(grads: list[Tensor], bufs: list[Tensor], mu, nesterov: bool, blocks: list[tuple[int, int]],
                coefficients: str, ns_steps: int, ns_dtype: torch.dtype) -> list[Tensor]:
    """Momentum, then Newton-Schulz of each matrix's blocks (orthogonalize)."""
    return orthogonalize(momentum_(grads, bufs, mu, nesterov), blocks, coefficients, ns_steps, ns_dtype)


def orthogonal_norm(shape: tuple[int, int], blocks: tuple[int, int]) -> float:
    """The Frobenius norm of an exactly orthogonal update cut in these blocks: sqrt(blocks x min side)."""
    return math.sqrt(blocks[0] * blocks[1] * min(block_shape(shape, blocks)))


def normuon_(updates: list[Tensor], second_moments: list[Tensor], beta2, eps: float,
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
    0.2 lr sqrt(m n) / ||O_hat||_F. beta2: a number, or one 0-dim tensor per matrix (1 leaves v
    as it is). A common factor of v cancels in the rescaling, so v needs no bias correction.
    """
    beta2s = beta2 if isinstance(beta2, list) else [beta2] * len(updates)
    normalized = []
    for o, v, b2, norm in zip(updates, second_moments, beta2s, norms):
        o = o.float()
        per_row = v.numel() == o.size(0)
        weight = 1 - b2
        v.lerp_(o.square().mean(dim=1 if per_row else 0), weight.to(v.dtype) if isinstance(weight, Tensor) else weight)
        scale = v.sqrt() + eps
        o_hat = o / (scale[:, None] if per_row else scale[None, :])
        normalized.append(o_hat * (norm / o_hat.norm().clamp_min(eps)))
    return normalized


def decay_and_step_(params: list[Tensor], updates: list[Tensor], decays, step_sizes, cautious: bool = False) -> None:
    """W <- decay W - step_size U, in place, for each matrix W and its update U (W's shape).
    decays: None (no weight decay) or one per matrix, 1 - lr wd; step_sizes: one per matrix,
    lr x lr_multiplier. Numbers or tensors alike. cautious (Chen et al., arXiv 2510.12402): decay
    only the entries where U and W have the same sign, the ones the update already moves toward 0."""
    for i, (p, u) in enumerate(zip(params, updates)):
        u = u.to(p.dtype)
        if decays is not None:
            p.mul_(torch.where(u * p >= 0, decays[i], 1.0) if cautious else decays[i])
        p.sub_(u * step_sizes[i])


def _bucket_step_(params, grads, bufs, mu, decays, step_sizes, blocks, normuon, cautious, nesterov, coefficients,
                  ns_steps, ns_dtype):
    """One process's whole Muon step for a bucket of matrices whose blocks share one shape: what
    compile=True runs as one graph. normuon: None, or (second_moments, beta2, eps)."""
    updates = muon_update(grads, bufs, mu, nesterov, blocks, coefficients, ns_steps, ns_dtype)
    if normuon is not None:
        second_moments, beta2, eps = normuon
        norms = [orthogonal_norm(p.shape, b) for p, b in zip(params, blocks)]
        updates = normuon_(updates, second_moments, beta2, eps, norms)
    decay_and_step_(params, updates, decays, step_sizes, cautious)


def adamw_cautious_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                    steps: list[Tensor], lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """AdamW with cautious weight decay: with U = m_hat / (sqrt(v_hat) + eps), as torch's AdamW,
    W <- W - lr (U + wd 1[U W >= 0] W)."""
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    for p, m, v, t in zip(params, exp_avgs, exp_avg_sqs, steps):
        u = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
        decay_and_step_([p], [u], [1 - lr * weight_decay] if weight_decay else None, [lr], cautious=True)


# ----------------------------------------------------------------------------------------------
# The optimizer: who computes which update


class Muon(torch.optim.Optimizer):
    """Muon for groups with use_muon=True (the default), AdamW for groups with use_muon=False.

    Options of the update, each per group and off by default:

    - normuon: NorMuon's per-neuron normalisation of the orthogonalised update (normuon_), with
      its own normuon_beta2 and normuon_eps; normuon_axis "rows" (the paper: W's rows) or
      "larger" (modded-nanogpt, nanochat: the larger side's neurons).
    - cautious_weight_decay: decay only where update and weight share a sign, in Muon and AdamW
      groups alike (decay_and_step_, adamw_cautious_).
    - blocks, a group key: one (row_blocks, col_blocks) per parameter, e.g. (n_heads, 1) for a
      query projection, (1, n_heads) for an attention output: each block is orthogonalised as its
      own matrix, and its lr_multiplier is the block's. Absent, or (1, 1): the whole matrix.

    Every path below runs the same functions (momentum_, orthogonalize, normuon_, decay_and_step_);
    they differ only in who computes which matrix's update:

    - one process: the matrices whose blocks share a shape (tall ones transposed to wide) are one
      bucket, one batched Newton-Schulz. compile=True runs each bucket's whole step as one
      torch.compile graph (static shapes, fullgraph; lr and momentum enter as tensors, so the
      schedule never recompiles it).
    - torch.distributed (auto-detected, or distributed=True/False): the Muon gradients are each
      rank's own, so leave the Muon parameters out of DDP. Each matrix has one owner rank
      (plan_owners); a reduce-scatter hands every owner the mean gradient of its matrices, the
      owner alone keeps their momentum and NorMuon state (1/world of Muon's state per rank) and
      computes their updates, and an all-gather of the updates (in ns_dtype) lets every rank apply
      every update, so all ranks hold the same weights. state_dict() is then a collective: every
      rank must call it, and each gets the full state. AdamW groups expect gradients already
      averaged (DDP).
    - DTensor parameters (FSDP2's fully_shard): momentum stays sharded; each update is gathered
      whole for Newton-Schulz, and each rank keeps its shard's rows. NorMuon's vector (one number
      per neuron) is kept whole on every rank.
    """

    def __init__(
        self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
        nesterov: bool = True, ns_steps: int = 5, ns_coefficients: str = "classic",
        lr_rule: str = "match_rms_adamw", betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8, ns_dtype: torch.dtype = torch.bfloat16, normuon: bool = False,
        normuon_beta2: float = 0.95, normuon_eps: float = 1e-8, normuon_axis: str = "rows",
        cautious_weight_decay: bool = False, compile: bool = False, distributed: bool | None = None,
    ):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr={lr} and weight_decay={weight_decay} must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum={momentum}: expected 0 <= momentum < 1")
        if not 0 <= normuon_beta2 < 1 or normuon_eps <= 0:
            raise ValueError(f"normuon_beta2={normuon_beta2}, normuon_eps={normuon_eps}: expected 0 <= beta2 < 1, eps > 0")
        if normuon_axis not in NORMUON_AXES:
            raise ValueError(f"normuon_axis={normuon_axis!r}: expected one of {NORMUON_AXES}")
        lr_multiplier(lr_rule, torch.Size((1, 1)))
        ns_schedule(ns_coefficients, ns_steps)
        defaults = dict(
            lr=lr, weight_decay=weight_decay, use_muon=True, momentum=momentum, nesterov=nesterov,
            ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_dtype=ns_dtype, lr_rule=lr_rule,
            betas=betas, eps=eps, normuon=normuon, normuon_beta2=normuon_beta2, normuon_eps=normuon_eps,
            normuon_axis=normuon_axis, cautious_weight_decay=cautious_weight_decay,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                _check_matrices(group)
        self.compile = compile
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.distributed = distributed
        self._scalars: dict[tuple, dict[str, Tensor]] = {}  # per bucket, the compiled step's 0-dim inputs
        self._plans: dict[tuple, dict] = {}  # per group, the owner plan of the distributed step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw_step(group)
                continue
            sharded = [p for p in group["params"] if isinstance(p, DTensor)]
            plain = [p for p in group["params"] if not isinstance(p, DTensor)]
            if sharded:
                self._sharded_step(sharded, group)
            if plain and self.distributed:
                self._owner_step(plain, group)
            elif plain:
                self._local_step(plain, group)
        return loss

    def _state_tensor(self, p: Tensor, key: str, group: dict) -> Tensor:
        """p's momentum_buffer or second_moment (NorMuon's), zeros on first use."""
        state = self.state[p]
        if key == "momentum_buffer" and key not in state:
            state[key] = torch.zeros_like(p, dtype=torch.float32)  # a DTensor p's is sharded as p
        elif key not in state:
            state[key] = torch.zeros(_state_shape(key, p, group), dtype=torch.float32, device=p.device)
        return state[key]

    def _ns_args(self, group: dict) -> tuple:
        return group["ns_coefficients"], group["ns_steps"], group["ns_dtype"]

    def _blocks(self, params: list[Tensor], group: dict) -> list[tuple[int, int]]:
        return [_blocks_of(group).get(id(p), (1, 1)) for p in params]

    def _step_sizes(self, params: list[Tensor], group: dict) -> list[float]:
        return [group["lr"] * lr_multiplier(group["lr_rule"], block_shape(p.shape, b))
                for p, b in zip(params, self._blocks(params, group))]

    def _normuon(self, params: list[Tensor], group: dict, beta2=None) -> tuple | None:
        """normuon_'s inputs (second moments, beta2, eps) for these matrices, or None when off."""
        if not group["normuon"]:
            return None
        seconds = [self._state_tensor(p, "second_moment", group) for p in params]
        return seconds, group["normuon_beta2"] if beta2 is None else beta2, group["normuon_eps"]

    # -- one process ------------------------------------------------------------------------------

    def _local_step(self, params: list[Tensor], group: dict) -> None:
        with_grad = [p for p in params if p.grad is not None]
        for indices in _buckets_by_block_shape(with_grad, self._blocks(with_grad, group)):
            bucket = [with_grad[i] for i in indices]
            grads = [p.grad for p in bucket]
            bufs = [self._state_tensor(p, "momentum_buffer", group) for p in bucket]
            blocks, normuon = tuple(self._blocks(bucket, group)), self._normuon(bucket, group)
            options = (blocks, normuon, group["cautious_weight_decay"], group["nesterov"], *self._ns_args(group))
            if not self.compile:
                decays = [1 - group["lr"] * group["weight_decay"]] * len(bucket) if group["weight_decay"] else None
                _bucket_step_(bucket, grads, bufs, group["momentum"], decays, self._step_sizes(bucket, group), *options)
                continue
            # Persistent 0-dim (and per-matrix) tensors, refilled each step: no host-device copy
            # to wait for, and values are not guarded on, so the schedule never recompiles.
            key = (id(group), tuple(id(p) for p in bucket))
            if key not in self._scalars:
                device = bucket[0].device
                self._scalars[key] = dict(mu=torch.zeros((), device=device), decay=torch.zeros((), device=device),
                                          step_sizes=torch.zeros(len(bucket), device=device))
            scalars = self._scalars[key]
            scalars["mu"].fill_(group["momentum"])
            scalars["decay"].fill_(1 - group["lr"] * group["weight_decay"])
            scalars["step_sizes"].copy_(torch.tensor(self._step_sizes(bucket, group)), non_blocking=True)
            decays = [scalars["decay"]] * len(bucket) if group["weight_decay"] else None
            _compiled(_bucket_step_)(bucket, grads, bufs, scalars["mu"], decays, scalars["step_sizes"], *options)

    # -- many ranks, one owner per matrix ---------------------------------------------------------

    def _owner_plan(self, params: list[Tensor], group: dict) -> dict:
        """Who owns which matrix and where each lives in the flat buffers the collectives move."""
        key = (id(group), tuple(id(p) for p in params))
        plan = self._plans.get(key)
        if plan is None:
            world = dist.get_world_size()
            owner = plan_owners([tuple(p.shape) for p in params], world, group["ns_steps"])
            owned = [[i for i in range(len(params)) if owner[i] == r] for r in range(world)]
            # Each rank's segment: its matrices' elements, then one has-a-gradient flag per matrix.
            sizes = [sum(params[i].numel() for i in mine) + len(mine) for mine in owned]
            plan = dict(owner=owner, owned=owned, segment=max(sizes), world=world, rank=dist.get_rank())
            self._plans[key] = plan
        return plan

    def _owner_step(self, params: list[Tensor], group: dict) -> None:
        plan = self._owner_plan(params, group)
        world, segment = plan["world"], plan["segment"]
        mine = plan["owned"][plan["rank"]]
        mean_grads, trained = self._gradients_to_owners(params, plan)
        # The owner's momentum and Newton-Schulz, batched by block shape. The has-gradient flags
        # stay on the device: a matrix no rank trained keeps its momentum (mu = 1 on a zero
        # gradient) and NorMuon state (beta2 = 1), and gets a zero update and no decay, as one
        # process skips it, with no host sync to find out.
        updates = torch.zeros(segment, device=mean_grads.device, dtype=group["ns_dtype"])
        offsets = [0] + list(itertools.accumulate(params[i].numel() for i in mine))
        owned = [params[i] for i in mine]
        update_fn = _compiled(muon_update) if self.compile else muon_update
        for js in _buckets_by_block_shape(owned, self._blocks(owned, group)):
            ps = [owned[j] for j in js]
            grads = [mean_grads[offsets[j]:offsets[j + 1]].view(owned[j].shape) for j in js]
            mus = [torch.where(trained[j], group["momentum"], 1.0) for j in js]
            bufs = [self._state_tensor(p, "momentum_buffer", group) for p in ps]
            blocks = self._blocks(ps, group)
            bucket_updates = update_fn(grads, bufs, mus, group["nesterov"], blocks, *self._ns_args(group))
            if group["normuon"]:
                # float64, so that 1 - beta2 rounds to the same float32 weight as one process's number.
                beta2 = torch.tensor(group["normuon_beta2"], dtype=torch.float64, device=trained.device)
                normuon = self._normuon(ps, group, [torch.where(trained[j], beta2, 1.0) for j in js])
                norms = [orthogonal_norm(p.shape, b) for p, b in zip(ps, blocks)]
                bucket_updates = normuon_(bucket_updates, *normuon, norms)
            for j, u in zip(js, bucket_updates):
                updates[offsets[j]:offsets[j + 1]] = (u * trained[j]).flatten()
        updates[offsets[-1]:offsets[-1] + len(mine)] = trained.to(updates.dtype)
        gathered = torch.empty(world * segment, device=updates.device, dtype=updates.dtype)
        _all_gather_single(gathered, updates)
        # Every rank applies every update, so the weights stay identical everywhere.
        lr, wd = group["lr"], group["weight_decay"]
        for r, owned in enumerate(plan["owned"]):
            base = r * segment
            sizes = [params[i].numel() for i in owned]
            flags = gathered[base + sum(sizes):base + sum(sizes) + len(owned)] > 0
            starts = [base + s for s in itertools.accumulate([0] + sizes)]
            ps = [params[i] for i in owned]
            received = [gathered[a:a + p.numel()].view(p.shape) for a, p in zip(starts, ps)]
            decays = [torch.where(flag, 1 - lr * wd, 1.0) for flag in flags] if wd else None
            decay_and_step_(ps, received, decays, self._step_sizes(ps, group), group["cautious_weight_decay"])

    def _gradients_to_owners(self, params: list[Tensor], plan: dict) -> tuple[Tensor, Tensor]:
        """Reduce-scatter every rank's gradients to their owners: (this rank's matrices' mean
        gradients, flat; one bool per matrix, whether any rank had its gradient). A missing
        gradient travels as zeros with flag 0."""
        world, segment = plan["world"], plan["segment"]
        device = params[0].device
        pieces = []
        for owned in plan["owned"]:
            for i in owned:
                g = params[i].grad
                pieces.append(g.float().flatten() if g is not None else torch.zeros(params[i].numel(), device=device))
            pieces.append(torch.tensor([float(params[i].grad is not None) for i in owned], device=device))
            pieces.append(torch.zeros(segment - sum(params[i].numel() for i in owned) - len(owned), device=device))
        summed = torch.empty(segment, device=device)
        _reduce_scatter_single(summed, torch.cat(pieces), op=dist.ReduceOp.SUM)
        mine = plan["owned"][plan["rank"]]
        used = sum(params[i].numel() for i in mine)
        return summed[:used] / world, summed[used:used + len(mine)] > 0

    def state_dict(self):
        """Under owner sharding, a collective: each rank contributes the state of its matrices and
        every rank returns the full state, as one process would hold it."""
        if self.distributed:
            for group in self.param_groups:
                plain = [p for p in group["params"] if not isinstance(p, DTensor)]
                if group["use_muon"] and plain:
                    for key in ("momentum_buffer", "second_moment") if group["normuon"] else ("momentum_buffer",):
                        self._gather_state(plain, group, key)
        return super().state_dict()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.distributed:  # keep only the state of the matrices this rank owns
            for group in self.param_groups:
                if group["use_muon"]:
                    plain = [p for p in group["params"] if not isinstance(p, DTensor)]
                    if plain:
                        plan = self._owner_plan(plain, group)
                        for i, p in enumerate(plain):
                            if plan["owner"][i] != plan["rank"]:
                                self.state.pop(p, None)

    def _gather_state(self, params: list[Tensor], group: dict, key: str) -> None:
        """Every rank gets the owners' state[key] of every matrix (all-gather)."""
        plan = self._owner_plan(params, group)
        device = params[0].device
        sizes = [math.prod(_state_shape(key, p, group)) for p in params]
        mine = plan["owned"][plan["rank"]]
        pieces = [self.state[params[i]][key].flatten() if key in self.state.get(params[i], {})
                  else torch.full((sizes[i],), float("nan"), device=device) for i in mine]
        segment = max(sum(sizes[i] for i in owned) for owned in plan["owned"])
        local = torch.cat(pieces + [torch.zeros(segment - sum(sizes[i] for i in mine), device=device)])
        gathered = torch.empty(plan["world"] * segment, device=device)
        _all_gather_single(gathered, local)
        for r, owned in enumerate(plan["owned"]):
            start = r * segment
            for i in owned:
                value = gathered[start:start + sizes[i]].view(_state_shape(key, params[i], group))
                start += sizes[i]
                if not value.isnan().any():  # nan: the owner has no such state yet
                    self.state[params[i]][key] = value.clone()

    # -- FSDP2: DTensor parameters ----------------------------------------------------------------

    def _sharded_step(self, params: list[Tensor], group: dict) -> None:
        """Gradients of DTensor parameters are already averaged (FSDP's reduce-scatter): momentum
        stays sharded; each update is gathered whole for Newton-Schulz, then re-sharded."""
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        bufs = [self._state_tensor(p, "momentum_buffer", group) for p in with_grad]
        directions = momentum_([p.grad for p in with_grad], bufs, group["momentum"], group["nesterov"])
        blocks = self._blocks(with_grad, group)
        normuon = self._normuon(with_grad, group)
        updates = []
        for i, (p, d) in enumerate(zip(with_grad, directions)):
            u = orthogonalize([d.full_tensor()], [blocks[i]], *self._ns_args(group))
            if normuon is not None:
                second_moment, beta2, eps = normuon
                u = normuon_(u, [second_moment[i]], beta2, eps, [orthogonal_norm(p.shape, blocks[i])])
            replicated = DTensor.from_local(u[0], p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
            updates.append(replicated.redistribute(p.device_mesh, p.placements))
        decays = [1 - group["lr"] * group["weight_decay"]] * len(with_grad) if group["weight_decay"] else None
        decay_and_step_(with_grad, updates, decays, self._step_sizes(with_grad, group), group["cautious_weight_decay"])

    # -- AdamW ------------------------------------------------------------------------------------

    def _adamw_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        moments = [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        if group["cautious_weight_decay"]:
            adamw_cautious_(params, *moments, [s["step"] for s in states], group["lr"], beta1, beta2, group["eps"],
                            group["weight_decay"])
            return
        fused = not any(isinstance(p, DTensor) for p in params)  # the fused kernel takes plain tensors
        adamw_functional(
            params, *moments, [], [s["step"] for s in states],
            fused=fused, foreach=not fused, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )


# torch 2.13 renamed the *_tensor collectives (deprecated since) to *_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_COMPILED = {}


def _compiled(fn):
    """fn under torch.compile, built once per process: static shapes, one graph, one per bucket shape."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[fn]


def _check_matrices(group: dict) -> None:
    names = group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]
    blocks = group.get("blocks")
    if blocks is not None and len(blocks) != len(group["params"]):
        raise ValueError(f"blocks has {len(blocks)} entries for {len(group['params'])} parameters: give one "
                         "(row_blocks, col_blocks) per parameter, (1, 1) for a whole matrix")
    for i, (name, p) in enumerate(zip(names, group["params"])):
        if p.ndim != 2:
            raise ValueError(
                f"Muon got parameter {name} of shape {tuple(p.shape)}: Muon takes 2-D matrices only; "
                "put it in a group with use_muon=False (AdamW)"
            )
        r, c = blocks[i] if blocks is not None else (1, 1)
        if r < 1 or c < 1 or p.size(0) % r or p.size(1) % c:
            raise ValueError(f"blocks {(r, c)} for parameter {name} of shape {tuple(p.shape)}: expected counts "
                             "that divide its rows and columns")


def _blocks_of(group: dict) -> dict[int, tuple[int, int]]:
    """id(parameter) -> (row_blocks, col_blocks), from the group's optional "blocks" list."""
    blocks = group.get("blocks")
    return {} if blocks is None else {id(p): tuple(b) for p, b in zip(group["params"], blocks)}


NORMUON_AXES = ("rows", "larger")  # normuon_axis: W's rows (the paper), or the larger side's neurons


def _state_shape(key: str, p: Tensor, group: dict) -> tuple[int, ...]:
    """momentum_buffer: p's shape; second_moment: one number per neuron (see normuon_)."""
    if key == "momentum_buffer":
        return tuple(p.shape)
    rows, cols = p.shape
    return (rows,) if group["normuon_axis"] == "rows" or rows >= cols else (cols,)


def _as_wide(x: Tensor) -> Tensor:
    """A matrix or batch of matrices on its wide side (A <= B)."""
    return x.mT if x.size(-2) > x.size(-1) else x


def _buckets_by_block_shape(params: list[Tensor], blocks: list[tuple[int, int]] | None = None) -> list[list[int]]:
    """Indices of params grouped by the wide shape of their blocks (default: whole matrices; a tall
    block goes with the wide one it transposes to), device and dtype: each group is one batched
    Newton-Schulz."""
    buckets: dict[tuple, list[int]] = {}
    for i, (p, b) in enumerate(zip(params, blocks or [(1, 1)] * len(params))):
        shape = tuple(sorted(block_shape(p.shape, b)))
        buckets.setdefault((shape, p.device, p.dtype), []).append(i)
    return list(buckets.values())


def hybrid_param_groups(model: torch.nn.Module, adamw_names: tuple[str, ...] = ("lm_head",)) -> list[dict]:
    """Two groups of named parameters: Muon for hidden 2-D matrices, AdamW for the rest.

    AdamW gets every parameter that is not 2-D, every parameter of an nn.Embedding, and every
    parameter whose name contains one of `adamw_names` (the output head). Set group options
    (lr, weight_decay, betas, ...) on the returned dicts before building the optimizer.
    """
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    }
    muon_params, adamw_params = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_hidden_matrix = (
            p.ndim == 2 and id(p) not in embedding_params and not any(s in name for s in adamw_names)
        )
        (muon_params if is_hidden_matrix else adamw_params).append((name, p))
    return [dict(params=muon_params, use_muon=True), dict(params=adamw_params, use_muon=False)]


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
def qk_clip_(layers: list[AttentionHeads], max_logits: Tensor, tau: float, alpha: float = 0.5,
             check_finite: bool = True, compile: bool = False) -> Tensor:
    """Rescale, in place, every head whose max logit S exceeds tau so that its logits scale by tau / S.

    max_logits: (n_layers, n_heads), the largest pre-softmax logit (scaled, causal mask applied)
    of each head over the whole step's batch, already max-reduced over micro-batches and ranks.
    With gamma = tau / S: q_nope rows *= gamma^alpha, k_nope rows *= gamma^(1 - alpha), q_rope
    rows *= gamma (the rope key is shared by all heads), so every logit of the head scales by gamma
    and re-running the batch gives max logit tau. alpha = 0.5 is Kimi K2's even split; Megatron-LM
    offers the same alpha (--qk-clip-alpha). Heads at or below tau are multiplied by exactly 1.
    Returns the number of clipped heads as a 0-dim tensor, so the caller decides when to pay for
    a device sync.

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
