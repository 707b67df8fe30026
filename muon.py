"""Muon with an AdamW companion, and MuonClip (per-head QK-clip). Torch only.

Copy this one file into any project:

    import muon
    groups = muon.hybrid_param_groups(model, adamw_names=("lm_head",))
    opt = muon.Muon(groups, lr=3e-4, weight_decay=0.1)   # one step(), one state_dict()
    ...
    n_clipped = muon.qk_clip_(model.attention_heads(), max_logits, tau=100.0)

Muon (Keller Jordan, 2024) for a hidden matrix W of shape (A, B) with gradient G:

    M <- mu * M + G                     momentum, fp32
    U <- G + mu * M  (Nesterov) or M
    O <- NS(U)                          Newton-Schulz: approximately U V^T of U = U S V^T, in bf16
    W <- W * (1 - lr * wd)              decoupled weight decay with the un-scaled lr
    W <- W - lr_eff(A, B) * O

Parameter groups with use_muon=False (embeddings, output head, norms, gains, scalars) are
stepped with AdamW instead, using the same lr and weight_decay unless the group sets its own.
With lr_rule="match_rms_adamw" (Moonlight, Kimi K2) Muon's update has AdamW's RMS of 0.2,
so one lr and one wd serve both.

Speed: matrices of one shape (tall ones transposed to wide) are orthogonalised together as
one batched tensor. Under torch.distributed each rank orthogonalises its share of every batch
and the results are all-gathered, so every rank applies the same update a single device would.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
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


_compiled_newton_schulz = None


def _newton_schulz_fn(compile_ns: bool):
    global _compiled_newton_schulz
    if not compile_ns:
        return newton_schulz
    if _compiled_newton_schulz is None:
        _compiled_newton_schulz = torch.compile(newton_schulz)
    return _compiled_newton_schulz


def lr_multiplier(lr_rule: str, shape: torch.Size) -> float:
    """lr_eff / lr for a matrix of this shape (names as in torch.optim.Muon)."""
    A, B = shape
    if lr_rule == "original":
        return math.sqrt(max(1.0, A / B))
    if lr_rule == "match_rms_adamw":
        # A full-rank orthogonal (A, B) matrix has RMS 1/sqrt(max(A, B)): this gives RMS 0.2.
        return 0.2 * math.sqrt(max(A, B))
    raise ValueError(f"lr_rule={lr_rule!r}: expected one of {LR_RULES}")


# ----------------------------------------------------------------------------------------------
# The optimizer


class Muon(torch.optim.Optimizer):
    """Muon for groups with use_muon=True (the default), AdamW for groups with use_muon=False.

    Under torch.distributed (auto-detected, or distributed=True/False) the gradients must
    already be identical on every rank, as DDP's all-reduce leaves them.
    """

    def __init__(
        self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
        nesterov: bool = True, ns_steps: int = 5, ns_coefficients: str = "classic",
        lr_rule: str = "match_rms_adamw", betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8, ns_dtype: torch.dtype = torch.bfloat16, compile_ns: bool = False,
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
        self.compile_ns = compile_ns
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.distributed = distributed

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        with_grad = [p for p in group["params"] if p.grad is not None]
        if not with_grad and not self.distributed:
            return
        updates = self._momentum_updates(with_grad, group)
        # Every rank walks every parameter, grad or not, so the collectives always match up
        # and a parameter without a gradient on one step cannot hang the others.
        params = group["params"] if self.distributed else with_grad
        ns = _newton_schulz_fn(self.compile_ns)
        orthogonalise = self._orthogonalise_shared if self.distributed else _orthogonalise_local
        pending = [
            (bucket, orthogonalise(bucket, updates, group, ns))
            for bucket in _buckets_by_shape(params)
        ]
        for bucket, result in pending:
            _apply_updates(bucket, result(), group)

    def _momentum_updates(self, params: list[Tensor], group: dict) -> dict[Tensor, Tensor]:
        """U per parameter: M <- mu M + G, then U = G + mu M (Nesterov) or M."""
        if not params:
            return {}
        mu = group["momentum"]
        grads = [p.grad.float() for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            bufs.append(state["momentum_buffer"])
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        updates = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs
        return dict(zip(params, updates))

    def _orthogonalise_shared(self, bucket, updates, group, ns):
        """This rank's share of the bucket through NS, then an async all-gather of every share."""
        world, rank = dist.get_world_size(), dist.get_rank()
        per_rank = math.ceil(len(bucket) / world)
        mine = bucket[rank * per_rank:(rank + 1) * per_rank]
        rows, cols = _wide_shape(bucket[0])
        local = torch.zeros(per_rank, rows, cols, device=bucket[0].device, dtype=torch.float32)
        for i, p in enumerate(mine):
            if p in updates:
                local[i] = _as_wide(updates[p])
        local = ns(local, group["ns_coefficients"], group["ns_steps"], dtype=group["ns_dtype"]).contiguous()
        gathered = torch.empty(world * per_rank, rows, cols, device=local.device, dtype=local.dtype)
        work = _all_gather_single(gathered, local, async_op=True)

        def result() -> Tensor:
            work.wait()
            return gathered[:len(bucket)]
        return result

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
        adamw_functional(
            params, [p.grad for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
            fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )


# torch 2.13 renamed all_gather_into_tensor (deprecated since) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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


def _orthogonalise_local(bucket, updates, group, ns):
    stacked = torch.stack([_as_wide(updates[p]) for p in bucket])
    out = ns(stacked, group["ns_coefficients"], group["ns_steps"], dtype=group["ns_dtype"])
    return lambda: out


def _apply_updates(bucket: list[Tensor], orthogonal: Tensor, group: dict) -> None:
    """Decay then step every parameter of the bucket that has a gradient, one shape at a time."""
    lr, wd = group["lr"], group["weight_decay"]
    orthogonal = orthogonal.to(bucket[0].dtype)
    by_shape: dict[torch.Size, tuple[list[Tensor], list[Tensor]]] = {}
    for p, o in zip(bucket, orthogonal):
        if p.grad is not None:
            params, outs = by_shape.setdefault(p.shape, ([], []))
            params.append(p)
            outs.append(o.mT if p.size(0) > p.size(1) else o)
    for shape, (params, outs) in by_shape.items():
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, outs, alpha=-lr * lr_multiplier(group["lr_rule"], shape))


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
def qk_clip_(layers: list[AttentionHeads], max_logits: Tensor, tau: float) -> Tensor:
    """Rescale, in place, every head whose max logit S exceeds tau so that its logits scale by tau / S.

    max_logits: (n_layers, n_heads), the largest pre-softmax logit (scaled, causal mask applied)
    of each head over the whole step's batch, already max-reduced over micro-batches and ranks.
    With gamma = tau / S: q_nope and k_nope rows *= sqrt(gamma), q_rope rows *= gamma, so every
    logit of the head scales by gamma and re-running the batch gives max logit tau. Heads at or
    below tau are multiplied by exactly 1. Returns the number of clipped heads as a 0-dim tensor,
    so the caller decides when to pay for a device sync.
    """
    if tau <= 0:
        raise ValueError(f"tau={tau}: expected a positive logit threshold")
    if max_logits.ndim != 2 or max_logits.size(0) != len(layers):
        raise ValueError(f"max_logits has shape {tuple(max_logits.shape)}: expected ({len(layers)}, n_heads)")
    n_clipped = torch.zeros((), dtype=torch.int64, device=max_logits.device)
    for heads, layer_max in zip(layers, max_logits):
        if layer_max.numel() != heads.n_heads:
            raise ValueError(f"{layer_max.numel()} max logits for a layer of {heads.n_heads} heads")
        layer_max = layer_max.double()  # so a float64 model is clipped to float64 precision
        over = layer_max > tau
        gamma = torch.where(over, tau / layer_max, torch.ones_like(layer_max))
        _scale_head_rows_(heads.q_weight, gamma.sqrt(), heads.qk_nope_dim, gamma, heads.qk_rope_dim)
        _scale_head_rows_(heads.k_weight, gamma.sqrt(), heads.qk_nope_dim, torch.ones_like(gamma), heads.v_dim)
        n_clipped += over.sum()
    return n_clipped


def _scale_head_rows_(weight: Tensor, first_scale: Tensor, first_rows: int, rest_scale: Tensor, rest_rows: int):
    """Per head, multiply the first `first_rows` rows by first_scale[h] and the next `rest_rows` by rest_scale[h]."""
    per_head = torch.cat([first_scale[:, None].expand(-1, first_rows), rest_scale[:, None].expand(-1, rest_rows)], dim=1)
    weight.mul_(per_head.reshape(-1, 1).to(device=weight.device, dtype=weight.dtype))
