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
    O <- NS(U)                          newton_schulz: approximately U V^T of U = U S V^T, in bf16
    W <- W * (1 - lr * wd) - lr_eff(A, B) * O      decay_and_step_: decoupled decay, un-scaled lr

Those three functions are the whole update; Muon (the class) only decides who runs them on which
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


def muon_update(grads: list[Tensor], bufs: list[Tensor], mu, nesterov: bool, coefficients: str, ns_steps: int,
                ns_dtype: torch.dtype) -> Tensor:
    """Momentum, then Newton-Schulz on all the matrices at once: (N, A, B) in ns_dtype, every matrix
    orthogonalised on its wide side (A <= B). The matrices must share that wide shape."""
    directions = momentum_(grads, bufs, mu, nesterov)
    return newton_schulz(torch.stack([_as_wide(d) for d in directions]), coefficients, ns_steps, dtype=ns_dtype)


def decay_and_step_(params: list[Tensor], orthogonal: list[Tensor], decays, step_sizes) -> None:
    """W <- decay W - step_size O, in place, for each matrix W and its orthogonalised update O (wide
    side, as muon_update gives it). decays: None (no weight decay) or one per matrix, 1 - lr wd;
    step_sizes: one per matrix, lr x lr_multiplier. Numbers or tensors alike."""
    for i, (p, o) in enumerate(zip(params, orthogonal)):
        o = o.mT if p.size(0) > p.size(1) else o
        if decays is not None:
            p.mul_(decays[i])
        p.sub_(o.to(p.dtype) * step_sizes[i])


def _bucket_step_(params, grads, bufs, mu, decays, step_sizes, nesterov, coefficients, ns_steps, ns_dtype):
    """One process's whole Muon step for a bucket of same-shape matrices: what compile=True runs as
    one graph."""
    orthogonal = muon_update(grads, bufs, mu, nesterov, coefficients, ns_steps, ns_dtype)
    decay_and_step_(params, orthogonal, decays, step_sizes)


# ----------------------------------------------------------------------------------------------
# The optimizer: who computes which update


class Muon(torch.optim.Optimizer):
    """Muon for groups with use_muon=True (the default), AdamW for groups with use_muon=False.

    Every path below runs the same three functions (momentum_, newton_schulz via muon_update,
    decay_and_step_); they differ only in who computes which matrix's update:

    - one process: the matrices of one shape (tall ones transposed to wide) are one bucket, one
      batched Newton-Schulz. compile=True runs each bucket's whole step as one torch.compile graph
      (static shapes, fullgraph; lr and momentum enter as tensors, so the schedule never
      recompiles it).
    - torch.distributed (auto-detected, or distributed=True/False): the Muon gradients are each
      rank's own, so leave the Muon parameters out of DDP. Each matrix has one owner rank
      (plan_owners); a reduce-scatter hands every owner the mean gradient of its matrices, the
      owner alone keeps their momentum (1/world of Muon's state per rank) and orthogonalises them,
      and an all-gather of the updates (in ns_dtype) lets every rank apply every update, so all
      ranks hold the same weights. state_dict() is then a collective: every rank must call it, and
      each gets the full state. AdamW groups expect gradients already averaged (DDP).
    - DTensor parameters (FSDP2's fully_shard): momentum stays sharded; each update is gathered
      whole for Newton-Schulz, and each rank keeps its shard's rows.
    """

    def __init__(
        self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
        nesterov: bool = True, ns_steps: int = 5, ns_coefficients: str = "classic",
        lr_rule: str = "match_rms_adamw", betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8, ns_dtype: torch.dtype = torch.bfloat16, compile: bool = False,
        distributed: bool | None = None,
    ):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr={lr} and weight_decay={weight_decay} must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum={momentum}: expected 0 <= momentum < 1")
        lr_multiplier(lr_rule, torch.Size((1, 1)))
        ns_schedule(ns_coefficients, ns_steps)
        defaults = dict(
            lr=lr, weight_decay=weight_decay, use_muon=True, momentum=momentum, nesterov=nesterov,
            ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_dtype=ns_dtype, lr_rule=lr_rule,
            betas=betas, eps=eps,
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

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
        return state["momentum_buffer"]

    def _ns_args(self, group: dict) -> tuple:
        return group["nesterov"], group["ns_coefficients"], group["ns_steps"], group["ns_dtype"]

    def _step_sizes(self, params: list[Tensor], group: dict) -> list[float]:
        return [group["lr"] * lr_multiplier(group["lr_rule"], p.shape) for p in params]

    # -- one process ------------------------------------------------------------------------------

    def _local_step(self, params: list[Tensor], group: dict) -> None:
        for bucket in _buckets_by_shape([p for p in params if p.grad is not None]):
            grads, bufs = [p.grad for p in bucket], [self._momentum_buffer(p) for p in bucket]
            if not self.compile:
                decays = [1 - group["lr"] * group["weight_decay"]] * len(bucket) if group["weight_decay"] else None
                _bucket_step_(bucket, grads, bufs, group["momentum"], decays, self._step_sizes(bucket, group),
                              *self._ns_args(group))
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
            _compiled(_bucket_step_)(bucket, grads, bufs, scalars["mu"], decays, scalars["step_sizes"],
                                     *self._ns_args(group))

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
        # The owner's momentum and Newton-Schulz, batched by shape. The has-gradient flags stay on
        # the device: a matrix no rank trained keeps its momentum (mu = 1 on a zero gradient) and
        # gets a zero update and no decay, as one process skips it, with no host sync to find out.
        updates = torch.zeros(segment, device=mean_grads.device, dtype=group["ns_dtype"])
        offsets = [0] + list(itertools.accumulate(params[i].numel() for i in mine))
        by_shape: dict[tuple, list[int]] = {}
        for j, i in enumerate(mine):
            by_shape.setdefault(_wide_shape(params[i]), []).append(j)
        update_fn = _compiled(muon_update) if self.compile else muon_update
        for js in by_shape.values():
            grads = [mean_grads[offsets[j]:offsets[j + 1]].view(params[mine[j]].shape) for j in js]
            mus = [torch.where(trained[j], group["momentum"], 1.0) for j in js]
            orthogonal = update_fn(grads, [self._momentum_buffer(params[mine[j]]) for j in js], mus,
                                   *self._ns_args(group))
            for j, o in zip(js, orthogonal):
                updates[offsets[j]:offsets[j + 1]] = (o * trained[j]).flatten()
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
            orthogonal = [gathered[a:a + p.numel()].view(_wide_shape(p)) for a, p in zip(starts, ps)]
            decays = [torch.where(flag, 1 - lr * wd, 1.0) for flag in flags] if wd else None
            decay_and_step_(ps, orthogonal, decays, self._step_sizes(ps, group))

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
        """Under owner sharding, a collective: each rank contributes the momentum of its matrices and
        every rank returns the full state, as one process would hold it."""
        if self.distributed:
            self._gather_momentum()
        return super().state_dict()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.distributed:  # keep only the momentum of the matrices this rank owns
            for group in self.param_groups:
                if group["use_muon"]:
                    plain = [p for p in group["params"] if not isinstance(p, DTensor)]
                    if plain:
                        plan = self._owner_plan(plain, group)
                        for i, p in enumerate(plain):
                            if plan["owner"][i] != plan["rank"]:
                                self.state.pop(p, None)

    def _gather_momentum(self) -> None:
        for group in self.param_groups:
            plain = [p for p in group["params"] if not isinstance(p, DTensor)]
            if not group["use_muon"] or not plain:
                continue
            plan = self._owner_plan(plain, group)
            device = plain[0].device
            mine = plan["owned"][plan["rank"]]
            pieces = [self.state[plain[i]]["momentum_buffer"].flatten() if "momentum_buffer" in self.state.get(plain[i], {})
                      else torch.full((plain[i].numel(),), float("nan"), device=device) for i in mine]
            used = sum(plain[i].numel() for i in mine)
            local = torch.cat(pieces + [torch.zeros(plan["segment"] - used, device=device)])
            gathered = torch.empty(plan["world"] * plan["segment"], device=device)
            _all_gather_single(gathered, local)
            for r, owned in enumerate(plan["owned"]):
                start = r * plan["segment"]
                for i in owned:
                    buf = gathered[start:start + plain[i].numel()].view(plain[i].shape)
                    start += plain[i].numel()
                    if not buf.isnan().any():  # nan: the owner has no momentum yet
                        self.state[plain[i]]["momentum_buffer"] = buf.clone()

    # -- FSDP2: DTensor parameters ----------------------------------------------------------------

    def _sharded_step(self, params: list[Tensor], group: dict) -> None:
        """Gradients of DTensor parameters are already averaged (FSDP's reduce-scatter): momentum
        stays sharded; each update is gathered whole for Newton-Schulz, then re-sharded."""
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        directions = momentum_([p.grad for p in with_grad], [self._momentum_buffer(p) for p in with_grad],
                               group["momentum"], group["nesterov"])
        orthogonal = []
        for p, d in zip(with_grad, directions):
            o = newton_schulz(d.full_tensor(), group["ns_coefficients"], group["ns_steps"], dtype=group["ns_dtype"])
            replicated = DTensor.from_local(o, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
            orthogonal.append(replicated.redistribute(p.device_mesh, p.placements))
        decays = [1 - group["lr"] * group["weight_decay"]] * len(with_grad) if group["weight_decay"] else None
        decay_and_step_(with_grad, [_as_wide(o) for o in orthogonal], decays, self._step_sizes(with_grad, group))

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
        fused = not any(isinstance(p, DTensor) for p in params)  # the fused kernel takes plain tensors
        adamw_functional(
            params, [p.grad for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
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
    for name, p in zip(names, group["params"]):
        if p.ndim != 2:
            raise ValueError(
                f"Muon got parameter {name} of shape {tuple(p.shape)}: Muon takes 2-D matrices only; "
                "put it in a group with use_muon=False (AdamW)"
            )


def _wide_shape(p: Tensor) -> tuple[int, int]:
    return min(p.shape), max(p.shape)


def _as_wide(x: Tensor) -> Tensor:
    return x.mT if x.size(0) > x.size(1) else x


def _buckets_by_shape(params: list[Tensor]) -> list[list[Tensor]]:
    """Parameters grouped by shape, a tall matrix with the wide one it transposes to."""
    buckets: dict[tuple, list[Tensor]] = {}
    for p in params:
        buckets.setdefault((_wide_shape(p), p.device, p.dtype), []).append(p)
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
def qk_clip_(layers: list[AttentionHeads], max_logits: Tensor, tau: float, check_finite: bool = True,
             compile: bool = False) -> Tensor:
    """Rescale, in place, every head whose max logit S exceeds tau so that its logits scale by tau / S.

    max_logits: (n_layers, n_heads), the largest pre-softmax logit (scaled, causal mask applied)
    of each head over the whole step's batch, already max-reduced over micro-batches and ranks.
    With gamma = tau / S: q_nope and k_nope rows *= sqrt(gamma), q_rope rows *= gamma, so every
    logit of the head scales by gamma and re-running the batch gives max logit tau. Heads at or
    below tau are multiplied by exactly 1. Returns the number of clipped heads as a 0-dim tensor,
    so the caller decides when to pay for a device sync.

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
    if max_logits.ndim != 2 or max_logits.size(0) != len(layers):
        raise ValueError(f"max_logits has shape {tuple(max_logits.shape)}: expected ({len(layers)}, n_heads)")
    if check_finite:
        raise_if_not_finite(max_logits)
    for heads, layer_max in zip(layers, max_logits):
        if layer_max.numel() != heads.n_heads:
            raise ValueError(f"{layer_max.numel()} max logits for a layer of {heads.n_heads} heads")
    clip = _compiled(_clip_layers_) if compile else _clip_layers_
    layout = tuple((h.qk_nope_dim, h.qk_rope_dim, h.v_dim) for h in layers)
    return clip([h.q_weight for h in layers], [h.k_weight for h in layers], max_logits, float(tau), layout)


def _clip_layers_(q_weights: list[Tensor], k_weights: list[Tensor], max_logits: Tensor, tau: float,
                  layout: tuple) -> Tensor:
    """qk_clip_'s rescaling, with the heads taken apart so torch.compile sees tensors and ints only."""
    n_clipped = torch.zeros((), dtype=torch.int64, device=max_logits.device)
    for q_weight, k_weight, layer_max, (nope, rope, v_dim) in zip(q_weights, k_weights, max_logits, layout):
        layer_max = layer_max.double()  # so a float64 model is clipped to float64 precision
        over = (layer_max > tau) & layer_max.isfinite()
        gamma = torch.where(over, tau / layer_max, torch.ones_like(layer_max))
        _scale_head_rows_(q_weight, gamma.sqrt(), nope, gamma, rope)
        _scale_head_rows_(k_weight, gamma.sqrt(), nope, torch.ones_like(gamma), v_dim)
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
