"""muon.py against SVD, torch.optim.Muon, torch.optim.AdamW and float64 re-derivations."""

import copy
import io
import math
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import muon

# Where singular values in (0, 1] (after the Frobenius normalisation, >= 3e-3) land after 5
# steps: from iterating each schedule's scalar polynomial in float64 over a fine grid.
NS_BAND = {"classic": (0.68, 1.21), "polar_express": (0.85, 1.15)}


def matrix_with_singular_values(shape, low=0.05, seed=0):
    """A random (..., A, B) matrix with known singular vectors and values spread over [low, 1]."""
    g = torch.Generator().manual_seed(seed)
    *batch, A, B = shape
    k = min(A, B)
    U, _ = torch.linalg.qr(torch.randn(*batch, A, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*batch, B, k, generator=g, dtype=torch.float64))
    s = low + (1 - low) * torch.rand(*batch, k, generator=g, dtype=torch.float64)
    return U @ torch.diag_embed(s) @ V.mT, U, s, V


def scalar_ns(x, coefficients, steps=5):
    """The NS polynomial applied to numbers: what it does to each normalised singular value."""
    x = x / muon.NS_NORM_HEADROOM[coefficients]
    for a, b, c in muon.ns_schedule(coefficients, steps):
        x = a * x + b * x**3 + c * x**5
    return x


SHAPES = [(32, 32), (16, 48), (48, 16), (3, 24, 40), (3, 40, 24)]


@pytest.mark.parametrize("coefficients", ["classic", "polar_express"])
@pytest.mark.parametrize("shape", SHAPES)
def test_ns_float32_is_svd_with_polynomial_singular_values(shape, coefficients):
    G, U, s, V = matrix_with_singular_values(shape)
    out = muon.newton_schulz(G.float(), coefficients, dtype=torch.float32).double()
    normalised = s / torch.linalg.matrix_norm(G)[..., None]
    expected = U @ torch.diag_embed(scalar_ns(normalised, coefficients)) @ V.mT
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=0)


@pytest.mark.parametrize("coefficients", ["classic", "polar_express"])
@pytest.mark.parametrize("shape", SHAPES)
def test_ns_bf16_matches_polar_factor_in_direction(shape, coefficients):
    G, U, _, V = matrix_with_singular_values(shape)
    out = muon.newton_schulz(G.float(), coefficients).double()
    assert out.shape == G.shape
    # In the SVD's own bases the output must be diagonal (same singular vectors as U V^T),
    # up to bf16 rounding (its relative precision is 2^-8 = 0.004 per element)...
    core = U.mT @ out @ V
    diagonal = torch.diagonal(core, dim1=-2, dim2=-1)
    off_diagonal = core - torch.diag_embed(diagonal)
    assert off_diagonal.norm() / diagonal.norm() < 0.03
    # ...with every singular value in the schedule's band.
    low, high = NS_BAND[coefficients]
    assert diagonal.min() > low - 0.03 and diagonal.max() < high + 0.03


def test_ns_lifts_tiny_singular_values_and_keeps_zero_at_zero():
    G, _, _, _ = matrix_with_singular_values((64, 64), low=0.02)
    sv = torch.linalg.svdvals(muon.newton_schulz(G.float(), dtype=torch.float32))
    assert sv.min() > NS_BAND["classic"][0] - 1e-3
    assert muon.newton_schulz(torch.zeros(8, 4)).abs().max() == 0


def matrix_power(gram, exponent):
    """gram^exponent for a symmetric PSD matrix, by eigendecomposition in float64; eigenvalues at
    zero (rounding included) stay zero, the pseudo-inverse convention for negative exponents."""
    values, vectors = torch.linalg.eigh(gram)
    kept = values > values.max() * 1e-10
    powered = torch.where(kept, values.clamp_min(1e-300) ** exponent, torch.zeros_like(values))
    return vectors @ torch.diag(powered) @ vectors.T


@pytest.mark.parametrize("shape", [(24, 24), (16, 40), (40, 16)])
def test_orthogonalised_update_is_shampoo_without_accumulation(shape):
    """U V^T of G = U S V^T, which Newton-Schulz approximates, is Shampoo's update with its
    preconditioners built from this one gradient (Bernstein & Newhouse, arXiv 2409.20325):
    (G G^T)^(-1/4) G (G^T G)^(-1/4) = U S^(-1/2) U^T U S V^T V S^(-1/2) V^T = U V^T."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    shampoo = matrix_power(G @ G.T, -0.25) @ G @ matrix_power(G.T @ G, -0.25)
    torch.testing.assert_close(shampoo, U @ Vh, atol=1e-10, rtol=0)
    # ...and Muon's Newton-Schulz lands on it up to its singular-value band.
    ns = muon.newton_schulz(G.float(), "polar_express", dtype=torch.float32).double()
    core = (U.T @ ns @ Vh.T).diagonal()
    assert (ns - U @ torch.diag(core) @ Vh).norm() < 1e-4 * ns.norm()
    assert NS_BAND["polar_express"][0] - 0.1 < core.min() and core.max() < NS_BAND["polar_express"][1]


def test_ns_schedule_names_and_lengths_are_checked():
    with pytest.raises(ValueError, match="ns_coefficients='cubic'"):
        muon.ns_schedule("cubic", 5)
    with pytest.raises(ValueError, match="ns_steps=6"):
        muon.ns_schedule("polar_express", 6)
    assert len(set(muon.ns_schedule("polar_express", 5))) == 5
    assert muon.ns_schedule("classic", 7) == [(3.4445, -4.7750, 2.0315)] * 7


# ----------------------------------------------------------------------------------------------
# One Muon step


def matrices_and_grads(seed=0, shapes=((24, 24), (24, 24), (40, 24), (24, 40), (16, 56)), steps=3):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]
    return params, grads


def run_optimizer(make_opt, params, grads_per_step):
    params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = make_opt(params)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def assert_updates_close(start, ours, reference, rtol):
    """The total update of each matrix agrees to rtol in relative Frobenius norm."""
    for p0, a, b in zip(start, ours, reference):
        delta_ours, delta_ref = (a - p0).double(), (b - p0).double()
        error = (delta_ours - delta_ref).norm() / delta_ref.norm()
        assert error < rtol, f"relative difference {error:.2e} for shape {tuple(p0.shape)}"


@pytest.mark.parametrize("lr_rule", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_step_equals_torch_optim_muon(lr_rule, nesterov):
    params, grads = matrices_and_grads()
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov)
    ours = run_optimizer(lambda ps: muon.Muon(ps, lr_rule=lr_rule, **settings), params, grads)
    reference = run_optimizer(lambda ps: torch.optim.Muon(ps, adjust_lr_fn=lr_rule, **settings), params, grads)
    # torch keeps an EMA momentum, (1 - mu) times ours: NS removes the scale, bf16 rounding stays.
    assert_updates_close(params, ours, reference, rtol=2e-2)


def ns_float64(U, coefficients):
    """Newton-Schulz written out in float64 on one matrix, on its wide side."""
    X = U.T if U.size(0) > U.size(1) else U
    X = X / (X.norm() * muon.NS_NORM_HEADROOM[coefficients] + 1e-7)
    for a, b, c in muon.ns_schedule(coefficients, 5):
        S = X @ X.T
        X = a * X + (b * S + c * S @ S) @ X
    return X.T if U.size(0) > U.size(1) else X


def reference_muon_float64(params, grads_per_step, lr, wd, mu, nesterov, lr_rule, coefficients):
    """The update formula (README, "The formulas"), written out in float64 one matrix at a time."""
    params = [p.double().clone() for p in params]
    momenta = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, M, G in zip(params, momenta, grads):
            G = G.double()
            M.mul_(mu).add_(G)
            U = G + mu * M if nesterov else M.clone()
            O = ns_float64(U, coefficients)
            A, B = p.shape
            scale = math.sqrt(max(1, A / B)) if lr_rule == "original" else 0.2 * math.sqrt(max(A, B))
            p.mul_(1 - lr * wd).add_(O, alpha=-lr * scale)
    return params


# bf16 keeps 8 bits of mantissa; Polar Express's large coefficients amplify that rounding to ~2%.
@pytest.mark.parametrize("ns_dtype, rtol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("lr_rule", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("coefficients", ["classic", "polar_express"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_step_equals_float64_formula(lr_rule, coefficients, nesterov, ns_dtype, rtol):
    params, grads = matrices_and_grads(seed=1)
    settings = dict(lr=0.02, wd=0.1, mu=0.95, nesterov=nesterov, lr_rule=lr_rule, coefficients=coefficients)
    ours = run_optimizer(
        lambda ps: muon.Muon(ps, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov,
                             lr_rule=lr_rule, ns_coefficients=coefficients, ns_dtype=ns_dtype),
        params, grads,
    )
    reference = reference_muon_float64(params, grads, **settings)
    assert_updates_close(params, ours, reference, rtol=rtol)


def test_the_compiled_bucket_step_is_the_eager_step_and_never_recompiles_for_the_schedule():
    """compile=True: one graph per shape bucket (momentum, NS, decay, update), lr and momentum fed as
    tensors, so a schedule that changes both every step builds each graph once."""
    params, grads = matrices_and_grads(seed=2, steps=4)
    settings = dict(lr=0.02, weight_decay=0.1, ns_coefficients="polar_express", ns_dtype=torch.float32)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # they outlive reset(): other tests' graphs count there too
    results = {}
    for compile in (False, True):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = muon.Muon(ps, compile=compile, **settings)
        for step, gs in enumerate(grads):
            for group in opt.param_groups:
                group["lr"], group["momentum"] = 0.02 * (1 - 0.2 * step), 0.85 + 0.03 * step
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
            if compile and step == 0:
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        results[compile] = [p.detach() for p in ps]
    wide_shapes = {tuple(sorted(p.shape)) for p in params}
    assert graphs == len(wide_shapes) == 3  # 24x24 twice; 40x24 with 24x40; 16x56: a graph each
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # steps 2-4 reused them
    for a, b in zip(results[False], results[True]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_weight_decay_uses_unscaled_lr():
    # A zero gradient orthogonalises to zero, leaving the decay alone: W * (1 - lr * wd) exactly,
    # although match_rms_adamw scales this 64x32 matrix's step by 0.2 * sqrt(64) = 1.6.
    W = torch.nn.Parameter(torch.randn(64, 32))
    before = W.detach().clone()
    opt = muon.Muon([W], lr=0.01, weight_decay=0.5, lr_rule="match_rms_adamw")
    W.grad = torch.zeros_like(W)
    opt.step()
    assert torch.equal(W.detach(), before * (1 - 0.01 * 0.5))


def test_match_rms_adamw_gives_update_rms_near_0_2_lr():
    W = torch.nn.Parameter(torch.zeros(96, 256))
    opt = muon.Muon([W], lr=1.0, weight_decay=0.0, ns_coefficients="polar_express")
    W.grad = torch.randn(96, 256)
    opt.step()
    rms = W.detach().pow(2).mean().sqrt().item()
    assert 0.17 < rms < 0.21  # 0.2 * RMS of an orthogonal-ish matrix whose singular values are ~1


def test_parameter_without_grad_is_left_alone():
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3)]
    opt = muon.Muon(params, lr=0.1)
    params[0].grad = torch.randn(8, 8)
    untouched = [p.detach().clone() for p in params[1:]]
    opt.step()
    assert all(torch.equal(p.detach(), u) for p, u in zip(params[1:], untouched))
    assert len(opt.state) == 1


# ----------------------------------------------------------------------------------------------
# The hybrid optimizer


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(50, 16)
        self.hidden = torch.nn.Linear(16, 32, bias=True)
        self.norm = torch.nn.LayerNorm(32)
        self.proj = torch.nn.Linear(32, 16, bias=False)
        self.gain = torch.nn.Parameter(torch.ones(()))
        self.lm_head = torch.nn.Linear(16, 50, bias=False)

    def forward(self, idx):
        x = self.wte(idx)
        x = x + self.gain * self.proj(torch.relu(self.norm(self.hidden(x))))
        return self.lm_head(x)


def tiny_loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 50, (4, 8), generator=g)
    return torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())


def test_param_groups_put_every_parameter_in_exactly_one_group_by_kind():
    model = TinyLM()
    groups = muon.param_groups(model, head=dict(lr=0.5))
    names = [[n for n, _ in g["params"]] for g in groups]
    assert names == [["hidden.weight", "proj.weight"], ["wte.weight"], ["lm_head.weight"],
                     ["gain", "hidden.bias", "norm.weight", "norm.bias"]]  # matrices, embeddings, head, scalars (model order)
    assert [g["use_muon"] for g in groups] == [True, False, False, False]
    assert groups[2]["lr"] == 0.5 and "lr" not in groups[0]
    assert muon.param_groups(model, matrices=dict(use_muon=False))[0]["use_muon"] is False  # the AdamW baseline
    with pytest.raises(ValueError, match="unknown kinds \\['bias'\\]"):
        muon.param_groups(model, bias=dict(lr=1.0))


def test_non_matrix_given_to_muon_names_the_parameter_and_shape():
    model = TinyLM()
    with pytest.raises(ValueError, match=r"gain of shape \(\)"):
        muon.Muon(list(model.named_parameters()))
    with pytest.raises(ValueError, match=r"#0 of shape \(32,\)"):
        muon.Muon([model.norm.weight])


def test_adamw_group_equals_torch_adamw():
    torch.manual_seed(0)
    ours_model, torch_model = TinyLM(), TinyLM()
    torch_model.load_state_dict(ours_model.state_dict())
    settings = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    ours = muon.Muon([dict(params=list(ours_model.parameters()), use_muon=False)], **settings)
    reference = torch.optim.AdamW(torch_model.parameters(), **settings)
    for step in range(3):
        for model, opt in ((ours_model, ours), (torch_model, reference)):
            opt.zero_grad()
            tiny_loss(model, step).backward()
            opt.step()
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def make_hybrid(model, **kwargs):
    return muon.Muon(muon.param_groups(model), lr=0.02, weight_decay=0.1, **kwargs)


def train_steps(model, opt, seeds):
    for seed in seeds:
        opt.zero_grad()
        tiny_loss(model, seed).backward()
        opt.step()


def test_state_dict_round_trip_restores_the_exact_next_step():
    torch.manual_seed(0)
    model = TinyLM()
    opt = make_hybrid(model, ns_coefficients="polar_express")
    train_steps(model, opt, seeds=[0, 1])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)

    train_steps(model, opt, seeds=[2])
    expected = copy.deepcopy(model.state_dict())

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = TinyLM()
    resumed.load_state_dict(saved["model"])
    resumed_opt = make_hybrid(resumed, ns_coefficients="polar_express")
    resumed_opt.load_state_dict(saved["opt"])
    train_steps(resumed, resumed_opt, seeds=[2])
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert resumed_opt.param_groups[0]["ns_coefficients"] == "polar_express"


def test_bad_settings_are_named():
    W = [torch.nn.Parameter(torch.randn(4, 4))]
    with pytest.raises(ValueError, match="lr_rule='rms'"):
        muon.Muon(W, lr_rule="rms")
    with pytest.raises(ValueError, match="momentum=1.0"):
        muon.Muon(W, momentum=1.0)


# ----------------------------------------------------------------------------------------------
# Distributed: each rank orthogonalises a share, then all-gather


DIST_SHAPES = ((24, 24), (24, 24), (24, 24), (40, 24), (24, 40), (16, 56), (56, 16))


def distributed_grads(rank, step):
    """Each rank's own gradients, multiples of 1/64 of small integers: their sums are exact in any
    order, so a reduce-scatter's mean is bit for bit the one computed here."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    grads = [torch.randint(-64, 65, s, generator=g).float() / 64 for s in DIST_SHAPES]
    if step == 1:
        grads[2] = None  # no gradient this step, on every rank
    return grads


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


# Every option on: blocks of one wide shape (8, 24) or (8, 56) from matrices of four shapes.
DIST_OPTIONS = dict(blocks=[(3, 1), (1, 1), (1, 3), (5, 1), (1, 5), (2, 1), (1, 2)], normuon=True,
                    cautious_weight_decay=True)


def dist_optimizer(params, options, **kwargs):
    options = dict(options)
    blocks = options.pop("blocks", None)
    return muon.Muon([dict(params=params, blocks=blocks)], lr=0.05, weight_decay=0.1, ns_dtype=torch.float32,
                     **options, **kwargs)


def distributed_worker(rank, world, rendezvous_file, out_path, options):
    # A file rendezvous: no TCP port to race other test runs for.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous_file}", rank=rank, world_size=world)
    params = [torch.nn.Parameter(p) for p in matrices_and_grads(seed=5, shapes=DIST_SHAPES)[0]]
    opt = dist_optimizer(params, options)
    assert opt.distributed
    for step in range(3):
        set_grads(params, distributed_grads(rank, step))  # not averaged: Muon does it
        opt.step()
    state_here = sum(s["momentum_buffer"].numel() for s in opt.state.values())
    full = opt.state_dict()  # a collective: every rank gets the whole state...
    assert sum(s["momentum_buffer"].numel() for s in opt.state.values()) == state_here  # ...and keeps its own
    torch.save(dict(params=[p.detach() for p in params], state_here=state_here, full=full), f"{out_path}.{rank}")
    dist.barrier()  # gloo can abort a rank that tears down while its peer is still connected
    dist.destroy_process_group()


@pytest.mark.parametrize("world, options", [(2, {}), (3, {}), (2, DIST_OPTIONS), (3, DIST_OPTIONS)],
                         ids=["2-ranks", "3-ranks", "2-ranks-every-option", "3-ranks-every-option"])
def test_owner_sharded_steps_equal_one_process_on_the_mean_gradient(tmp_path, world, options):
    """Reduce-scatter to each matrix's owner, the whole update there, all-gather of the new weights:
    the weights of every rank equal one process's fed the mean gradient, bit for bit; each rank
    keeps the state of its own matrices only (about 1/world of it), and state_dict() returns it all
    while each rank goes on holding its own share; a matrix without a gradient on every rank is
    left alone, as one process leaves it."""
    out = tmp_path / "out"
    mp.spawn(distributed_worker, args=(world, str(tmp_path / "rendezvous"), str(out), options), nprocs=world)
    ranks = [torch.load(f"{out}.{r}") for r in range(world)]

    params = [torch.nn.Parameter(p) for p in matrices_and_grads(seed=5, shapes=DIST_SHAPES)[0]]
    opt = dist_optimizer(params, options, distributed=False)
    for step in range(3):
        per_rank = [distributed_grads(r, step) for r in range(world)]
        set_grads(params, [None if gs[0] is None else sum(gs) / world for gs in zip(*per_rank)])
        opt.step()
    for result in ranks:
        assert all(torch.equal(a, b.detach()) for a, b in zip(result["params"], params))
        full = result["full"]["state"]
        for key in ("momentum_buffer", "second_moment") if options else ("momentum_buffer",):
            assert all(torch.equal(full[i][key], opt.state[p][key]) for i, p in enumerate(params)), key
    total = sum(p.numel() for p in params)
    held = [result["state_here"] for result in ranks]
    assert sum(held) == total and max(held) < 0.75 * total  # shared out, not replicated
    owners = muon.plan_owners([muon.ns_flops(s, 5) for s in DIST_SHAPES], world)
    assert sorted(set(owners)) == list(range(world))  # every rank orthogonalises something


def test_owners_balance_newton_schulz_flops():
    """124M MLA's hidden matrices over 8 ranks: longest-first assignment by FLOPs."""
    shapes = [(1152, 768), (288, 768), (1536, 256), (768, 768), (3072, 768), (768, 3072)] * 12
    owners = muon.plan_owners([muon.ns_flops(s, 5) for s in shapes], 8)
    load = [sum(muon.ns_flops(s, 5) for s, o in zip(shapes, owners) if o == r) for r in range(8)]
    assert max(load) / (sum(load) / 8) < 1.05  # within 5% of a perfect split
    assert len(set(owners)) == 8


def fsdp_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32, bias=False), torch.nn.LayerNorm(32),
                               torch.nn.Linear(32, 8, bias=False))


def fsdp_data(rank):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(4, 16, generator=g), torch.randn(4, 8, generator=g)


def fsdp_optimizer(model, every_option=False):
    # With every option: (32, 16) in 4 row blocks, (8, 32) in 4 column blocks, NorMuon, cautious decay.
    blocks = [(4, 1), (1, 4)] if every_option else None
    groups = [dict(params=[model[0].weight, model[2].weight], blocks=blocks),
              dict(params=list(model[1].parameters()), use_muon=False, lr=0.01)]
    return muon.Muon(groups, lr=0.05, weight_decay=0.1, ns_dtype=torch.float32, distributed=False,
                     normuon=every_option, cautious_weight_decay=every_option)


def fsdp_worker(rank, world, rendezvous_file, out_path, every_option):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo", init_method=f"file://{rendezvous_file}", rank=rank, world_size=world)
    model = fsdp_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = fsdp_optimizer(model, every_option)
    for step in range(2):
        x, y = fsdp_data(rank)
        torch.nn.functional.mse_loss(model(x), y).backward()  # FSDP reduce-scatters the mean gradient
        opt.step()
        opt.zero_grad()
    full = {name: p.full_tensor() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save(full, out_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("every_option", [False, True])
def test_fsdp2_sharded_matrices_step_as_one_process_does(tmp_path, every_option):
    """fully_shard makes every parameter a DTensor sharded by rows: Muon gathers each update whole
    for Newton-Schulz (and NorMuon) and keeps its shard's rows; the result is one process's step on
    the mean gradient of both ranks' batches."""
    world = 2
    mp.spawn(fsdp_worker, args=(world, str(tmp_path / "rendezvous"), str(tmp_path / "fsdp.pt"), every_option),
             nprocs=world)
    sharded = torch.load(tmp_path / "fsdp.pt")
    model = fsdp_model()
    opt = fsdp_optimizer(model, every_option)
    for step in range(2):
        for rank in range(world):  # the mean of the two ranks' losses' gradients
            x, y = fsdp_data(rank)
            (torch.nn.functional.mse_loss(model(x), y) / world).backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        torch.testing.assert_close(sharded[name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------
# MuonClip on an attention layer built here from its formulas (float64)


def rope(x, theta=10000.0):
    """Rotate pairs of the last dim by position-dependent angles; x: (..., T, D)."""
    T, D = x.shape[-2:]
    freqs = 1.0 / theta ** (torch.arange(0, D, 2, dtype=x.dtype) / D)
    angles = torch.arange(T, dtype=x.dtype)[:, None] * freqs
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def rms_norm(x):
    return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


class MLAWeights:
    def __init__(self, d=32, H=4, nope=8, rope_dim=4, v=6, kv_lora=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.H, self.nope, self.rope_dim, self.v, self.kv_lora = H, nope, rope_dim, v, kv_lora
        self.wq = torch.randn(H * (nope + rope_dim), d, generator=g, dtype=torch.float64)
        self.wkv_a = torch.randn(kv_lora + rope_dim, d, generator=g, dtype=torch.float64)
        self.wkv_b = torch.randn(H * (nope + v), kv_lora, generator=g, dtype=torch.float64)

    def heads(self):
        return muon.AttentionHeads(self.wq, self.wkv_b, self.H, self.nope, self.rope_dim, self.v)

    def logits(self, x):
        """(B, H, T, T) scaled pre-softmax logits with the causal mask applied (-inf above)."""
        B, T, _ = x.shape
        q = (x @ self.wq.T).view(B, T, self.H, self.nope + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)
        ckv, k_rope = (x @ self.wkv_a.T).split([self.kv_lora, self.rope_dim], dim=-1)
        kv = (rms_norm(ckv) @ self.wkv_b.T).view(B, T, self.H, self.nope + self.v).transpose(1, 2)
        k_nope = kv[..., :self.nope]
        k_rope = rope(k_rope)[:, None]  # one rope key shared by every head
        scores = q_nope @ k_nope.mT + rope(q_rope) @ k_rope.mT
        scores = scores / math.sqrt(self.nope + self.rope_dim)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        return scores.masked_fill(~causal, float("-inf"))


def max_logits(scores):
    return scores.amax(dim=(0, 2, 3))


def test_qk_clip_mla_brings_clipped_heads_to_tau_and_leaves_the_rest():
    layer = MLAWeights()
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    before = layer.logits(x)
    head_max = max_logits(before)
    tau = head_max.median().item()  # some heads above, some at or below
    over = head_max > tau
    assert 0 < over.sum() < layer.H
    wkv_a, wkv_b = layer.wkv_a.clone(), layer.wkv_b.clone()

    n_clipped = muon.qk_clip_([layer.heads()], head_max[None], tau)

    after = layer.logits(x)
    assert n_clipped.item() == over.sum().item()
    torch.testing.assert_close(max_logits(after)[over], torch.full((int(over.sum()),), tau, dtype=torch.float64),
                               rtol=1e-4, atol=0)
    gamma = tau / head_max[over]
    finite = torch.isfinite(before)
    torch.testing.assert_close(after[:, over][finite[:, over]], (before[:, over] * gamma[:, None, None])[finite[:, over]])
    assert torch.equal(after[:, ~over], before[:, ~over])
    assert torch.equal(layer.wkv_a, wkv_a)  # the shared rope key is never scaled
    v_rows = wkv_b.view(layer.H, layer.nope + layer.v, -1)[:, layer.nope:]
    assert torch.equal(layer.wkv_b.view(layer.H, layer.nope + layer.v, -1)[:, layer.nope:], v_rows)


def test_qk_clip_mha_scales_q_and_k_rows_by_sqrt_gamma():
    g = torch.Generator().manual_seed(2)
    H, hd, d = 3, 8, 24
    wq, wk = (torch.randn(H * hd, d, generator=g, dtype=torch.float64) for _ in range(2))
    x = torch.randn(2, 7, d, generator=g, dtype=torch.float64)

    def logits():
        q = (x @ wq.T).view(2, 7, H, hd).transpose(1, 2)
        k = (x @ wk.T).view(2, 7, H, hd).transpose(1, 2)
        scores = rope(q) @ rope(k).mT / math.sqrt(hd)
        return scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))

    head_max = max_logits(logits())
    tau = head_max.min().item() * 0.5  # every head clipped
    muon.qk_clip_([muon.AttentionHeads(wq, wk, H, hd)], head_max[None], tau)
    torch.testing.assert_close(max_logits(logits()), torch.full((H,), tau, dtype=torch.float64), rtol=1e-4, atol=0)


def test_qk_clip_leaves_everything_bit_identical_below_tau():
    layer = MLAWeights(seed=3)
    wq, wkv_b = layer.wq.clone(), layer.wkv_b.clone()
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    head_max = max_logits(layer.logits(x))
    assert muon.qk_clip_([layer.heads()], head_max[None], head_max.max().item()).item() == 0
    assert torch.equal(layer.wq, wq) and torch.equal(layer.wkv_b, wkv_b)


def test_qk_clip_rejects_mismatched_layouts():
    with pytest.raises(ValueError, match="q_weight has shape"):
        muon.AttentionHeads(torch.zeros(10, 4), torch.zeros(8, 4), n_heads=2, qk_nope_dim=4)
    heads = muon.AttentionHeads(torch.zeros(8, 4), torch.zeros(8, 4), n_heads=2, qk_nope_dim=4)
    with pytest.raises(ValueError, match="max_logits has shape"):
        muon.qk_clip_([heads], torch.zeros(2), tau=1.0)
    with pytest.raises(ValueError, match="tau=0"):
        muon.qk_clip_([heads], torch.zeros(1, 2), tau=0)


@pytest.mark.parametrize("bad", [math.inf, math.nan, -math.inf])
def test_qk_clip_never_touches_weights_for_a_non_finite_max_logit(bad):
    """gamma = tau / inf = 0 would zero a head's q and k rows for good; a NaN must not slip by either."""
    layer = MLAWeights(seed=4)
    wq, wkv_b = layer.wq.clone(), layer.wkv_b.clone()
    head_max = torch.tensor([[bad, 0.5] + [0.5] * (layer.H - 2)], dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"the max attention logit of layer 0 head 0 is {bad}.*no head was rescaled"):
        muon.qk_clip_([layer.heads()], head_max, tau=1.0)
    assert torch.equal(layer.wq, wq) and torch.equal(layer.wkv_b, wkv_b)
    # check_finite=False (train.py checks once per log interval): the bad head is left as it is,
    # the others are clipped as usual.
    head_max[0, 1] = 4.0
    assert muon.qk_clip_([layer.heads()], head_max, tau=1.0, check_finite=False).item() == 1
    rows = layer.nope + layer.rope_dim
    assert torch.equal(layer.wq[:rows], wq[:rows]) and not torch.equal(layer.wq[rows:2 * rows], wq[rows:2 * rows])


def test_compiled_qk_clip_is_the_eager_one_and_compiles_once():
    from torch._dynamo.utils import counters
    eager_layers, compiled_layers = [MLAWeights(seed=s) for s in (5, 6)], [MLAWeights(seed=s) for s in (5, 6)]
    torch._dynamo.reset()
    counters.clear()
    for step in range(3):  # new max logits each step, some heads over tau, some under, one non-finite
        head_max = torch.rand(2, eager_layers[0].H, dtype=torch.float64, generator=torch.Generator().manual_seed(step)) * 2
        head_max[1, 0] = math.inf
        n_eager = muon.qk_clip_([l.heads() for l in eager_layers], head_max, 1.0, check_finite=False)
        n_compiled = muon.qk_clip_([l.heads() for l in compiled_layers], head_max, 1.0, check_finite=False, compile=True)
        assert n_eager.item() == n_compiled.item() > 0
        for a, b in zip(eager_layers, compiled_layers):
            torch.testing.assert_close(b.wq, a.wq, rtol=1e-15, atol=0)
            torch.testing.assert_close(b.wkv_b, a.wkv_b, rtol=1e-15, atol=0)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


# ----------------------------------------------------------------------------------------------
# The 2025-26 options: NorMuon, cautious weight decay, per-head blocks, QK-clip alpha


def reference_options_float64(params, grads_per_step, lr, wd, mu, lr_rule="match_rms_adamw", coefficients="classic",
                              blocks=None, normuon=None, cautious=False):
    """Muon with each option written out in float64, a block and a matrix at a time:
    blocks: each (rows / r, cols / c) block orthogonalised alone, lr scaled by the block's shape;
    normuon (beta2, eps, axis): v <- beta2 v + (1 - beta2) mean over each neuron of O^2, O / (sqrt(v) + eps),
    rescaled to the Frobenius norm of an orthogonal update of those blocks;
    cautious: W <- W - lr wd 1[U W >= 0] W - U (Chen et al.)."""
    params = [p.double().clone() for p in params]
    momenta = [torch.zeros_like(p) for p in params]
    seconds = [None] * len(params)
    for grads in grads_per_step:
        for i, (p, M, G) in enumerate(zip(params, momenta, grads)):
            M.mul_(mu).add_(G.double())
            U = G.double() + mu * M  # Nesterov
            (m, n), (r, c) = p.shape, blocks[i] if blocks else (1, 1)
            a, b = m // r, n // c
            O = torch.zeros_like(U)
            for bi in range(r):
                for bj in range(c):
                    O[bi * a:(bi + 1) * a, bj * b:(bj + 1) * b] = ns_float64(U[bi * a:(bi + 1) * a, bj * b:(bj + 1) * b], coefficients)
            if normuon:
                beta2, eps, axis = normuon
                dim = 1 if axis == "rows" or m >= n else 0  # mean over columns: one number per row
                seconds[i] = torch.zeros(O.size(1 - dim), dtype=torch.float64) if seconds[i] is None else seconds[i]
                seconds[i] = beta2 * seconds[i] + (1 - beta2) * (O ** 2).mean(dim=dim)
                O_hat = O / (seconds[i].sqrt().unsqueeze(dim) + eps)
                O = O_hat * math.sqrt(r * c * min(a, b)) / O_hat.norm()
            scale = math.sqrt(max(1, a / b)) if lr_rule == "original" else 0.2 * math.sqrt(max(a, b))
            step = lr * scale * O
            decay = lr * wd * p * ((step * p >= 0) if cautious else 1)
            p.sub_(decay + step)
    return params


def test_normuon_is_the_papers_algorithm():
    """NorMuon, Algorithm 1 of arXiv 2510.05491, in float64 as the paper writes it: EMA momentum
    M <- b1 M + (1 - b1) G (Newton-Schulz removes its scale, so nesterov=False is this), per-row
    v of O = NS(M), O_hat = O / (sqrt(v) + eps), step 0.2 lr sqrt(m n) / ||O_hat||_F, decoupled decay."""
    params, grads = matrices_and_grads(seed=3, steps=4)
    lr, wd, b1, b2, eps = 0.02, 0.1, 0.95, 0.95, 1e-8
    expected = [p.double().clone() for p in params]
    state = [(torch.zeros_like(p), torch.zeros(p.size(0), dtype=torch.float64)) for p in expected]
    for step_grads in grads:
        for W, (M, v), G in zip(expected, state, step_grads):
            M.mul_(b1).add_(G.double(), alpha=1 - b1)
            O = ns_float64(M, "classic")
            v.mul_(b2).add_((O ** 2).mean(dim=1), alpha=1 - b2)
            O_hat = O / (v.sqrt()[:, None] + eps)
            m, n = W.shape
            W.sub_(lr * wd * W + 0.2 * lr * math.sqrt(m * n) / O_hat.norm() * O_hat)
    ours = run_optimizer(lambda ps: muon.Muon(ps, lr=lr, weight_decay=wd, momentum=b1, nesterov=False, normuon=True,
                                              normuon_beta2=b2, normuon_eps=eps, ns_dtype=torch.float32),
                         params, grads)
    assert_updates_close(params, ours, expected, rtol=1e-4)


BLOCKS = [(3, 1), (1, 3), (5, 1), (1, 4), (2, 1)]  # for matrices_and_grads' shapes


@pytest.mark.parametrize("lr_rule", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("options", [
    dict(normuon=True), dict(normuon=True, normuon_axis="larger"), dict(cautious_weight_decay=True),
    dict(blocks=True), dict(normuon=True, cautious_weight_decay=True, blocks=True),
])
def test_options_equal_float64_formula(options, lr_rule):
    params, grads = matrices_and_grads(seed=4)
    options = dict(options)
    blocks = BLOCKS if options.pop("blocks", False) else None

    def make(ps):
        return muon.Muon([dict(params=ps, blocks=blocks)], lr=0.02, weight_decay=0.1, lr_rule=lr_rule,
                         ns_dtype=torch.float32, **options)
    ours = run_optimizer(make, params, grads)
    normuon = (0.95, 1e-8, options.get("normuon_axis", "rows")) if options.get("normuon") else None
    reference = reference_options_float64(params, grads, lr=0.02, wd=0.1, mu=0.95, lr_rule=lr_rule, blocks=blocks,
                                          normuon=normuon, cautious=options.get("cautious_weight_decay", False))
    assert_updates_close(params, ours, reference, rtol=1e-4)


def test_a_blocks_update_is_that_block_orthogonalised_as_its_own_matrix():
    """Per head: the rows of head h of a (4 x 6, 20) query get exactly the update Muon gives those
    6 rows as a parameter of their own; wo's columns likewise."""
    g = torch.Generator().manual_seed(7)
    q, wo = torch.randn(24, 20, generator=g), torch.randn(20, 24, generator=g)
    q_grad, wo_grad = torch.randn(24, 20, generator=g), torch.randn(20, 24, generator=g)
    settings = dict(lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)
    whole = [torch.nn.Parameter(q.clone()), torch.nn.Parameter(wo.clone())]
    opt = muon.Muon([dict(params=whole, blocks=[(4, 1), (1, 4)])], **settings)
    whole[0].grad, whole[1].grad = q_grad.clone(), wo_grad.clone()
    opt.step()
    for h in range(4):
        rows, cols = slice(6 * h, 6 * h + 6), (slice(None), slice(6 * h, 6 * h + 6))
        alone = [torch.nn.Parameter(q[rows].clone()), torch.nn.Parameter(wo[cols].clone())]
        alone[0].grad, alone[1].grad = q_grad[rows].clone(), wo_grad[cols].clone()
        muon.Muon(alone, **settings).step()
        torch.testing.assert_close(whole[0].detach()[rows], alone[0].detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(whole[1].detach()[cols], alone[1].detach(), rtol=1e-6, atol=1e-7)


def test_bad_blocks_are_named():
    W = torch.nn.Parameter(torch.randn(12, 8))
    with pytest.raises(ValueError, match=r"blocks \(5, 1\) for parameter #0 of shape \(12, 8\)"):
        muon.Muon([dict(params=[W], blocks=[(5, 1)])])
    with pytest.raises(ValueError, match="blocks has 2 entries for 1 parameters"):
        muon.Muon([dict(params=[W], blocks=[(1, 1), (1, 1)])])
    with pytest.raises(ValueError, match="normuon_axis='cols'"):
        muon.Muon([W], normuon_axis="cols")


def reference_adamw_float64(params, grads_per_step, lr, wd, betas, eps, cautious):
    """AdamW in float64 with decay 1[U W >= 0] (cautious) or 1, U = m_hat / (sqrt(v_hat) + eps)."""
    params = [p.double().clone() for p in params]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for p, (m, v), G in zip(params, moments, grads):
            m.mul_(betas[0]).add_(G.double(), alpha=1 - betas[0])
            v.mul_(betas[1]).add_(G.double() ** 2, alpha=1 - betas[1])
            U = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
            p.sub_(lr * (U + wd * p * ((U * p >= 0) if cautious else 1)))
    return params


def test_cautious_adamw_equals_float64_formula_and_torch_adamw_without_decay():
    params, grads = matrices_and_grads(seed=6)
    settings = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)

    def ours(wd):
        return run_optimizer(lambda ps: muon.Muon([dict(params=ps, use_muon=False)], weight_decay=wd,
                                                  cautious_weight_decay=True, **settings), params, grads)
    expected = reference_adamw_float64(params, grads, wd=0.5, cautious=True, **settings)
    for a, b in zip(ours(0.5), expected):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    plain = reference_adamw_float64(params, grads, wd=0.5, cautious=False, **settings)
    assert any(not torch.allclose(a, b) for a, b in zip(expected, plain))  # the mask did something
    reference = run_optimizer(lambda ps: torch.optim.AdamW(ps, weight_decay=0.0, **settings), params, grads)
    for a, b in zip(ours(0.0), reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compiled_step_with_every_option_is_the_eager_step():
    params, grads = matrices_and_grads(seed=8, steps=3)
    results = {}
    for compile in (False, True):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = muon.Muon([dict(params=ps, blocks=BLOCKS)], lr=0.02, weight_decay=0.1, ns_dtype=torch.float32,
                        normuon=True, cautious_weight_decay=True, compile=compile)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        results[compile] = [p.detach() for p in ps]
    for a, b in zip(results[False], results[True]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("normuon_axis", ["rows", "larger"])
def test_state_dict_round_trip_with_every_option_restores_the_exact_next_step(normuon_axis):
    options = dict(normuon=True, normuon_axis=normuon_axis, cautious_weight_decay=True)
    torch.manual_seed(0)
    model = TinyLM()
    opt = make_hybrid(model, **options)
    train_steps(model, opt, seeds=[0, 1])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert [s["second_moment"].shape for s in opt.state.values() if "second_moment" in s]
    train_steps(model, opt, seeds=[2])
    resumed = TinyLM()
    resumed.load_state_dict(saved["model"])
    resumed_opt = make_hybrid(resumed, **options)
    resumed_opt.load_state_dict(saved["opt"])
    train_steps(resumed, resumed_opt, seeds=[2])
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_qk_clip_alpha_moves_the_clip_between_query_and_key(alpha):
    """Megatron-LM's split: q_nope rows by eta^alpha, k_nope rows by eta^(1 - alpha), q_rope rows
    by eta, v and the shared rope key untouched; every alpha brings a clipped head's max logit to tau."""
    layer = MLAWeights(seed=9)
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    head_max = max_logits(layer.logits(x))
    tau = head_max.median().item()
    eta = torch.where(head_max > tau, tau / head_max, torch.ones_like(head_max))
    H, nope, rope_dim, v = layer.H, layer.nope, layer.rope_dim, layer.v
    wq, wkv_b, wkv_a = layer.wq.clone().view(H, nope + rope_dim, -1), layer.wkv_b.clone().view(H, nope + v, -1), layer.wkv_a.clone()

    muon.qk_clip_([layer.heads()], head_max[None], tau, alpha=alpha)

    q_after, kv_after = layer.wq.view(H, nope + rope_dim, -1), layer.wkv_b.view(H, nope + v, -1)
    torch.testing.assert_close(q_after[:, :nope], wq[:, :nope] * eta[:, None, None] ** alpha)
    torch.testing.assert_close(q_after[:, nope:], wq[:, nope:] * eta[:, None, None])
    torch.testing.assert_close(kv_after[:, :nope], wkv_b[:, :nope] * eta[:, None, None] ** (1 - alpha))
    assert torch.equal(kv_after[:, nope:], wkv_b[:, nope:]) and torch.equal(layer.wkv_a, wkv_a)
    over = head_max > tau
    torch.testing.assert_close(max_logits(layer.logits(x))[over], torch.full((int(over.sum()),), tau, dtype=torch.float64),
                               rtol=1e-4, atol=0)
    if alpha == 0.5:  # Kimi K2's sqrt split, bit for bit
        assert torch.equal(q_after[:, :nope], wq[:, :nope] * eta.sqrt()[:, None, None])
        assert torch.equal(kv_after[:, :nope], wkv_b[:, :nope] * eta.sqrt()[:, None, None])


def test_qk_clip_alpha_out_of_range_is_named():
    with pytest.raises(ValueError, match="alpha=1.5"):
        muon.qk_clip_([MLAWeights().heads()], torch.ones(1, 4), tau=1.0, alpha=1.5)
