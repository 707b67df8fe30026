"""model.py against the formulas, written out here independently, on tiny CPU models."""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

import kernels

import muon
from model import CONFIGS, GPT, GPTConfig

VOCAB = 97  # padded to 128: the padding columns are exercised too
KINDS = {  # name -> changes to a tiny config
    "mla": dict(attention="mla"),
    "mla-qlora": dict(attention="mla", q_lora_rank=24),
    "mha": dict(attention="mha"),
    "mla-softcap": dict(attention="mla", logit_softcap=3.0),
    "mla-lambdas": dict(attention="mla", layer_lambdas=True),  # the one idea off by default
    # the defaults have the other options on (a norm after the embedding, the smear, value embeddings
    # on alternating layers, the backout, a softcap); this is the model without them
    "mla-plain": dict(attention="mla", embed_norm=False, smear=False, value_embeds=False,
                      backout=False, logit_softcap=0.0, rope_theta=10000.0, init="speedrun"),
}


def tiny(kind: str, **changes) -> GPTConfig:
    changes = {**KINDS[kind], **changes}
    base = CONFIGS["tiny-mha" if changes["attention"] == "mha" else "tiny-mla"]
    return dataclasses.replace(base, vocab_size=VOCAB, block_size=32, **changes)


def random_model(config: GPTConfig, seed: int = 0) -> GPT:
    """A float64 model with every weight random, the zero-initialised ones and norm gains included."""
    torch.manual_seed(seed)
    model = GPT(config).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(std=p.size(1) ** -0.5)
            else:
                p.uniform_(0.5, 1.5)
    return model


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# The reference: the formulas, head by head, in float64


def rms_norm(x, norm):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def rope(x, theta):
    """x (B, T, H, d): features k and k + d/2 as one complex number, turned by position * theta^(-2k/d)."""
    T, d = x.size(1), x.size(-1)
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs
    z = torch.complex(x[..., :d // 2], x[..., d // 2:]) * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def reference_attention(attn, x, c: GPTConfig, idx):
    """Causally masked logits (B, H, T, T) and the layer's output (B, T, d), for tokens idx (B, T)."""
    B, T, _ = x.shape
    H = c.n_head
    if c.attention == "mla":
        n, r = c.qk_nope_head_dim, c.qk_rope_head_dim
        if c.q_lora_rank:
            q = rms_norm(x @ attn.wq_a.weight.T, attn.q_norm) @ attn.wq_b.weight.T
        else:
            q = x @ attn.wq.weight.T
        q = q.view(B, T, H, n + r)
        kv_a = x @ attn.wkv_a.weight.T
        latent, shared_key = kv_a[..., :c.kv_lora_rank], kv_a[..., c.kv_lora_rank:]
        normed = rms_norm(latent, attn.kv_norm)
        kv = (normed @ attn.wkv_b.weight.T).view(B, T, H, n + c.v_head_dim)
        k_nope, values = kv[..., :n], kv[..., n:]
        if attn.value_embed is not None:  # each head's gate in (0, 3) from the latent's first 12 channels
            gate = 3 * torch.sigmoid(normed[..., :12] @ attn.ve_gate.weight.T)
            values = values + gate[..., None] * attn.value_embed.weight[idx].view(B, T, H, c.v_head_dim)
        q_rope, k_rope = rope(q[..., n:], c.rope_theta), rope(shared_key[:, :, None, :], c.rope_theta)[:, :, 0]
        logits = torch.einsum("bihd,bjhd->bhij", q[..., :n], k_nope) + torch.einsum("bihd,bjd->bhij", q_rope, k_rope)
        logits = logits / math.sqrt(n + r)
    else:
        q, k, values = ((x @ w.weight.T).view(B, T, H, c.head_dim) for w in (attn.wq, attn.wk, attn.wv))
        logits = torch.einsum("bihd,bjhd->bhij", rope(q, c.rope_theta), rope(k, c.rope_theta)) / math.sqrt(c.head_dim)
    logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), values).reshape(B, T, -1) @ attn.wo.weight.T
    return logits, out


def reference_gpt(model: GPT, idx):
    """Logits (B, T, padded V), and per layer the attention logits (B, H, T, T) and the attention's input."""
    c = model.config
    x = model.wte.weight[idx]
    if c.embed_norm:
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    if c.smear:  # x_t += lambda sigmoid(w . x_t[:24]) x_{t-1}
        gate = model.smear_lambda * torch.sigmoid(x[:, 1:, :24] @ model.smear_gate)
        x = torch.cat([x[:, :1], x[:, 1:] + gate[..., None] * x[:, :-1]], dim=1)
    x0, middle = x, None
    layer_logits, layer_inputs = [], []
    for i, block in enumerate(model.blocks):
        if c.layer_lambdas:
            x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        layer_inputs.append(rms_norm(x, block.attn_norm))
        logits, out = reference_attention(block.attn, layer_inputs[-1], c, idx)
        layer_logits.append(logits)
        x = x + out
        x = x + torch.relu(rms_norm(x, block.mlp_norm) @ block.mlp.fc.weight.T).square() @ block.mlp.proj.weight.T
        if i == c.n_layer // 2:
            middle = x
    if c.backout:
        x = x - model.backout_lambda * middle
    logits = rms_norm(x, model.norm_f) @ model.lm_head.weight.T
    if c.logit_softcap:
        logits = c.logit_softcap * torch.tanh(logits / c.logit_softcap)
    return logits, layer_logits, layer_inputs


def per_head_max(layer_logits):
    return torch.stack([logits.amax(dim=(0, 2, 3)) for logits in layer_logits])


# ----------------------------------------------------------------------------------------------
# Forward, loss, probe


@pytest.mark.parametrize("kind", KINDS)
def test_forward_loss_and_probe_match_reference(kind):
    model = random_model(tiny(kind))
    idx = tokens(2, 13)
    targets = tokens(2, 13, seed=2)
    targets[0, :3] = -1
    logits, max_logits = model(idx, probe=True)
    ref_logits, ref_layer_logits, _ = reference_gpt(model, idx)
    assert logits.shape == (2, 13, 128)
    # Not 1e-12: the model's RoPE tables are fp32 (correctly rounded), the reference's fp64.
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert max_logits.dtype == torch.float32 and max_logits.shape == (2, 4) and not max_logits.requires_grad
    torch.testing.assert_close(max_logits, per_head_max(ref_layer_logits).float(), rtol=1e-6, atol=0)
    loss, loss_max_logits = model(idx, targets, probe=True)
    assert torch.equal(loss_max_logits, max_logits)
    expected_loss = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(model(idx, targets), loss, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["mla", "mha"])
def test_probe_chunks_agree(kind):
    config = tiny(kind)
    model = random_model(config)
    idx = tokens(3, 29)
    _, one_chunk = model(idx, probe=True)  # probe_chunk_size 128 > T
    for chunk in (1, 5, 16):
        chunked = GPT(dataclasses.replace(config, probe_chunk_size=chunk)).double()
        chunked.load_state_dict(model.state_dict())
        _, max_logits = chunked(idx, probe=True)
        torch.testing.assert_close(max_logits, one_chunk, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["mla", "mha"])
def test_future_tokens_never_change_earlier_outputs(kind):
    model = random_model(tiny(kind))
    idx = tokens(2, 20)
    changed = idx.clone()
    changed[:, 11] = (changed[:, 11] + 1) % VOCAB
    before, after = model(idx), model(changed)
    assert torch.equal(before[:, :11], after[:, :11])
    assert not torch.allclose(before[:, 11:], after[:, 11:])


def test_fresh_model_starts_at_uniform_loss_and_trains_under_bf16_autocast():
    idx, targets = tokens(2, 16), tokens(2, 16, seed=2)
    plain = GPT(tiny("mla-plain"))  # "speedrun" init: the head starts at zero
    assert plain(idx, targets).item() == pytest.approx(math.log(128), rel=1e-6)
    # "nanochat" init: head std 0.001 on a residual of RMS 1 (the final norm), so each logit has std
    # 0.001 sqrt(64) = 0.008 and the mean loss over 32 tokens moves by about 0.008 / sqrt(32)
    model = GPT(tiny("mla"))
    assert model(idx, targets).item() == pytest.approx(math.log(128), abs=0.01)
    model = random_model(tiny("mla-qlora", logit_softcap=15.0)).float()
    _, fp32_max = model(idx, probe=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, max_logits = model(idx, targets, probe=True)
    loss.backward()
    assert loss.dtype == torch.float32 and max_logits.dtype == torch.float32
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(max_logits, fp32_max, rtol=0.05, atol=0.05)  # bf16 activations


@pytest.mark.parametrize("probe", [False, True])
def test_forward_traces_as_one_graph(probe):
    torch._dynamo.reset()
    model = GPT(tiny("mla"))
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    idx = tokens(2, 16)
    out = compiled(idx, idx, probe=probe)
    expected = model(idx, idx, probe=probe)
    torch.testing.assert_close(out, expected)


def test_sequence_longer_than_block_size_is_refused():
    model = GPT(tiny("mla"))
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(1, 33))


# ----------------------------------------------------------------------------------------------
# The probe's Triton kernel, on CPU through Triton's interpreter

# TRITON_INTERPRET must be set before triton is imported, so the kernel runs in a fresh process.
# It prints, per case, the kernel's maxima and the chunked path's; the test compares them here.
INTERPRETED_PROBE = r'''
import json
import torch
import kernels
import model

torch.manual_seed(0)
SCALE = 0.125


def bthd(B, T, H, D):
    """(B, H, T, D) as the model makes it: a transposed view of (B, T, H, D)."""
    return torch.randn(B, T, H, D).transpose(1, 2)


def mla_like(B, H, T):
    """q, k (B, H, T, 96) as MLA makes them (k's last 32 features start as one key shared by all
    heads), with logits planted where block edges could go wrong. T >= 61, H <= 3."""
    q = torch.randn(B, T, H, 96)
    k = torch.cat([torch.randn(B, T, H, 64), torch.randn(B, T, 1, 32).expand(-1, -1, H, -1)], dim=-1)
    q[..., :2], k[..., :2] = 0, 0  # features 0 and 1 carry the planted logits only (the rest: max ~ 45)
    for i, j in ((0, T - 2), (50, 60)):  # 400 from keys after their query: the mask must hide them
        q[:, i, :, 0], k[:, j, :, 0] = 20, 20
    # Each head's max, 144: the last row's own key, just left of the diagonal, far left of it.
    for h, (i, j) in enumerate([(T - 1, T - 1), (60, 55), (T - 1, 3)][:H]):
        q[:, i, h, 1], k[:, j, h, 1] = 12, 12
    return q.transpose(1, 2), k.transpose(1, 2)


def case(q, k, dtype, chunk_size=16):
    q, k = q.to(dtype), k.to(dtype)
    unmasked = (q.float() @ k.float().transpose(-2, -1)).amax(dim=(0, 2, 3)) * SCALE
    return dict(
        triton=kernels.triton_max_causal_logits(q, k, SCALE).tolist(),
        chunked=kernels.chunked_max_causal_logits(q, k, SCALE, chunk_size).tolist(),
        # bf16 products are exact in fp32, so this is what the kernel computes, bar summation order.
        chunked_fp32=kernels.chunked_max_causal_logits(q.float(), k.float(), SCALE, chunk_size).tolist(),
        unmasked=unmasked.tolist(), dtype=str(dtype),
    )


results = {}
for dtype in (torch.float32, torch.bfloat16):
    results[f"mla T=100 {dtype}"] = case(*mla_like(2, 3, 100), dtype)
results["mha T=192 (three blocks)"] = case(bthd(1, 192, 2, 64), bthd(1, 192, 2, 64), torch.float32, 50)
k = torch.randn(2, 100, 1, 64).expand(-1, -1, 3, -1).transpose(1, 2)  # one key head for all (stride 0)
results["mha T=100 bf16, shared k"] = case(bthd(2, 100, 3, 64), k, torch.bfloat16)
# All logits negative: rows past T (zeros in the kernel) must not report 0.
q, k = torch.randn(2, 3, 100, 64).abs(), -torch.randn(2, 3, 100, 64).abs()
results["negative logits, contiguous"] = case(q, k, torch.float32)
results["one token, D=8"] = case(bthd(2, 1, 3, 8), bthd(2, 1, 3, 8), torch.float32)
# Query and key blocks of different heights: the diagonal blocks are not aligned.
for kernels.PROBE_BLOCK_M, kernels.PROBE_BLOCK_N in ((16, 32), (32, 16)):
    name = f"mla T=100, blocks {kernels.PROBE_BLOCK_M} x {kernels.PROBE_BLOCK_N}"
    results[name] = case(*mla_like(1, 3, 100), torch.float32)
kernels.PROBE_BLOCK_M, kernels.PROBE_BLOCK_N = 64, 64

# In the model: CPU tensors dispatch to the chunked path, so point the probe at the kernel, then
# compile the forward as one graph (aot_eager: the tracing and fake shapes Inductor would see).
config = model.CONFIGS["tiny-mla"]  # q/k width 16 + 8 = 24
gpt = model.GPT(config)
with torch.no_grad():  # no zero-initialised matrices: the second layer sees the first's output
    for p in gpt.parameters():
        if p.ndim == 2:
            p.normal_(std=p.size(1) ** -0.5)
idx = torch.randint(0, config.vocab_size, (2, 100))
_, chunked = gpt(idx, probe=True)
with torch.autocast("cpu", dtype=torch.bfloat16):
    _, chunked_bf16 = gpt(idx, probe=True)
kernels.max_causal_logits = lambda q, k, scale, chunk_size: kernels.triton_max_causal_logits(q, k, scale)
compiled = torch.compile(gpt, backend="aot_eager", fullgraph=True)
_, kernel = compiled(idx, probe=True)
with torch.autocast("cpu", dtype=torch.bfloat16):
    _, kernel_bf16 = gpt(idx, probe=True)
results["tiny-mla model, compiled"] = dict(triton=kernel.tolist(), chunked=chunked.tolist(), dtype="torch.float32")
results["tiny-mla model, bf16 autocast"] = dict(triton=kernel_bf16.tolist(), chunked=chunked_bf16.tolist(),
                                                dtype="torch.bfloat16")
print(json.dumps(results))
'''

# bf16 keeps 8 significant bits, so rounding to nearest moves a value by at most 2^-8 of it: the
# chunked path rounds the fp32 max once to bf16, the kernel keeps it. 1e-5 covers fp32 summation
# order (the kernel and torch's matmul add a row's products in different orders).
FP32_RTOL = 1e-5
BF16_RTOL = 2 ** -8 + FP32_RTOL


def require_triton() -> None:
    """Fail where requirements.txt installs Triton (Linux) and it is missing; skip where it has no wheels."""
    if importlib.util.find_spec("triton") is not None:
        return
    if sys.platform.startswith("linux"):
        pytest.fail("triton is not installed (pip install -r requirements.txt): the probe's kernel goes untested")
    pytest.skip(f"Triton has no wheels for {sys.platform}: requirements.txt installs it on Linux only")


def version(module) -> tuple[int, int]:
    return tuple(int(part) for part in module.__version__.split(".")[:2])


def test_triton_probe_equals_chunked_probe_under_the_interpreter():
    require_triton()
    import numpy
    import triton
    if version(triton) < (3, 7) and version(numpy) >= (2, 4):  # what torch 2.11's CUDA builds bring
        pytest.skip(f"Triton {triton.__version__}'s interpreter turns program ids into Python ints with int() of "
                    f"a 1-element array, which NumPy {numpy.__version__} refuses (Triton 3.7 squeezes it first)")
    run = subprocess.run([sys.executable, "-c", INTERPRETED_PROBE], cwd=pathlib.Path(__file__).parent.parent,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.splitlines()[-1])
    assert len(results) == 10
    for name, r in results.items():
        kernel, chunked = torch.tensor(r["triton"]), torch.tensor(r["chunked"])
        rtol = BF16_RTOL if r["dtype"] == "torch.bfloat16" else FP32_RTOL
        torch.testing.assert_close(kernel, chunked, rtol=rtol, atol=0, msg=lambda m: f"{name}: {m}")
        if "chunked_fp32" in r:
            torch.testing.assert_close(kernel, torch.tensor(r["chunked_fp32"]), rtol=FP32_RTOL, atol=0,
                                       msg=lambda m: f"{name}, against fp32: {m}")
    for name in ("mla T=100 torch.float32", "mla T=100 torch.bfloat16"):  # the planted logit is masked
        assert (torch.tensor(results[name]["unmasked"]) > torch.tensor(results[name]["triton"]) + 10).all()
    assert max(results["negative logits, contiguous"]["triton"]) < 0


# ----------------------------------------------------------------------------------------------
# The probe's Triton kernel, built for an H100 (sm_90) by the ptxas in Triton's wheel: no GPU needed


def sm90_resources(dtype: torch.dtype, n_head: int, head_dim: int, seq_len: int) -> dict[str, int]:
    """Registers and stack (spilled) bytes a thread, and shared memory, of the kernel compiled for
    sm_90 as kernels._block_max_logits launches it on q, k made as attention makes them: a
    (B, H, T, D) view of (B, T, H, D). The integer arguments are specialised as Triton does at a
    launch: a 1 becomes a constant, a multiple of 16 is marked divisible (it changes the code)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = kernels._block_max_logits_kernel
    pointer = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    q = torch.empty(2, seq_len, n_head, head_dim, device="meta").transpose(1, 2)
    integers = dict(n_head=n_head, T=seq_len, D=head_dim,
                    **{f"{x}_stride_{dim}": stride for x in "qk" for dim, stride in zip("bhtd", q.stride())})
    constants = {**{name: 1 for name, value in integers.items() if value == 1},
                 **kernels.probe_kernel_constants(dtype, head_dim)}
    signature = dict(q_ptr=pointer, k_ptr=pointer, out_ptr="*fp32", **{name: "i32" for name in integers})
    signature.update({name: "constexpr" for name in constants})
    divisible = ["q_ptr", "k_ptr", "out_ptr"] + [name for name, value in integers.items()
                                                 if value != 1 and value % 16 == 0]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": kernels.PROBE_NUM_WARPS})
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = pathlib.Path(tmp) / "probe.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    registers, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    return dict(registers=registers, stack=stack, shared=compiled.metadata.shared)


# (heads, q/k width): gpt124m-mla's, gpt124m-mha's, and the widest the model sends to the kernel.
H100_PROBE_SHAPES = {"gpt124m-mla": (12, 96), "gpt124m-mha": (12, 64), "widest": (4, kernels.PROBE_MAX_HEAD_DIM)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", H100_PROBE_SHAPES)
def test_triton_probe_builds_for_h100_without_spilling(dtype, shape):
    """What the interpreter can't show: the kernel the model launches on a GPU compiles for sm_90,
    keeps its tiles in registers (a spill to local memory would make the probe memory-bound) and
    fits an H100 SM's 227 KB of shared memory."""
    require_triton()
    usage = sm90_resources(dtype, *H100_PROBE_SHAPES[shape], seq_len=1024)
    print(f"{shape} {dtype}: {usage}")
    assert usage["stack"] == 0, usage
    assert usage["shared"] <= 227 * 1024, usage


def test_triton_probe_spills_on_fp32_so_the_model_sends_fp32_to_chunks():
    """Why kernels.PROBE_FUSED_DTYPES leaves fp32 out. If this fails, Triton builds the exact
    fp32 dot without spilling now: measure it (bench/probe.py) and let fp32 use the kernel again."""
    require_triton()
    assert sm90_resources(torch.float32, *H100_PROBE_SHAPES["gpt124m-mla"], seq_len=1024)["stack"] > 1024
    assert torch.float32 not in kernels.PROBE_FUSED_DTYPES


# ----------------------------------------------------------------------------------------------
# Parameter counts


def expected_params(c: GPTConfig) -> int:
    d, H, V = c.n_embd, c.n_head, math.ceil(c.vocab_size / 64) * 64
    if c.attention == "mla":
        n, r, v, kv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        query = d * H * (n + r) if c.q_lora_rank == 0 else d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * (n + r)
        attention = query + d * (kv + r) + kv + kv * H * (n + v) + H * v * d
    else:
        attention = 4 * d * H * c.head_dim
    block = attention + 2 * 4 * d * d + 2 * d  # attention, MLP, two norm gains
    value_embeds = sum(V * c.n_head * c.v_head_dim + 12 * c.n_head for layer in range(c.n_layer)
                       if c.value_embeds and layer % 2 == (c.n_layer - 1) % 2)  # table and gate
    scalars = 2 * c.n_layer * c.layer_lambdas + (24 + 1) * c.smear + c.backout
    return V * d + c.n_layer * block + d + d * V + value_embeds + scalars  # embedding, blocks, final norm, head


@pytest.mark.parametrize("name", [*CONFIGS, "tiny-mla+qlora", "tiny-mla-plain"])
def test_parameter_counts(name):
    config = {"tiny-mla+qlora": dataclasses.replace(CONFIGS["tiny-mla"], q_lora_rank=32),
              "tiny-mla-plain": dataclasses.replace(CONFIGS["tiny-mla"], **KINDS["mla-plain"])}.get(name) or CONFIGS[name]
    with torch.device("meta"):
        model = GPT(config)
    print(f"{name}: {model.num_params():,} parameters, {model.num_params(non_embedding=True):,} without the embeddings")
    assert model.num_params() == expected_params(config)
    value_embed_layers = (config.n_layer + 1) // 2 if config.value_embeds else 0  # alternating, the last included
    embeddings = config.padded_vocab_size * (config.n_embd + value_embed_layers * config.n_head * config.v_head_dim)
    assert model.num_params(non_embedding=True) == expected_params(config) - embeddings
    assert CONFIGS["gpt124m-mla"].padded_vocab_size == 50304


# ----------------------------------------------------------------------------------------------
# Generation and the KV cache


@pytest.mark.parametrize("kind", ["mla", "mla-qlora", "mha"])
def test_cached_attention_equals_uncached(kind):
    model = random_model(tiny(kind))
    attn = model.blocks[0].attn
    x = torch.randn(2, 17, 64, dtype=torch.float64)
    cos, sin = model.rope_cos, model.rope_sin
    full, _ = attn(x, cos[:17], sin[:17])
    cache = attn.new_cache(2, 32, torch.float64, x.device)
    if kind.startswith("mla"):  # only the latent and the shared rope key per token
        assert cache.shape == (2, 32, model.config.kv_lora_rank + model.config.qk_rope_head_dim)
    pieces = [attn(x[:, :6], cos[:6], sin[:6], cache=cache, start=0)[0]]
    for t in range(6, 17):
        pieces.append(attn(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache=cache, start=t)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["mla", "mla-qlora", "mha", "mla-plain"])
def test_cached_generation_gives_the_uncached_tokens(kind):
    model = random_model(tiny(kind))
    prompt = tokens(2, 5)
    # 40 new tokens pass block_size 32, so the cropped, refilled window is covered too.
    cached = model.generate(prompt, 40, greedy=True)
    uncached = model.generate(prompt, 40, greedy=True, use_cache=False)
    assert cached.shape == (2, 45) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 5:].tolist())) > 1  # not a degenerate run of one token
    one = model.generate(prompt[1], 10, greedy=True)
    assert one.shape == (15,) and torch.equal(one, cached[1, :15])
    torch.manual_seed(3)
    sampled = model.generate(prompt, 20, temperature=0.8, top_k=10)
    torch.manual_seed(3)
    assert torch.equal(sampled, model.generate(prompt, 20, temperature=0.8, top_k=10, use_cache=False))


def test_sampling_rules():
    model = random_model(tiny("mla"))
    with torch.no_grad():
        model.lm_head.weight[VOCAB:] *= 100  # padding tokens would win if they were not excluded
    prompt = tokens(3, 4)
    greedy = model.generate(prompt, 12, greedy=True)
    assert greedy.max() < VOCAB
    assert torch.equal(model.generate(prompt, 12, top_k=1), greedy)
    assert model.generate(prompt, 30, temperature=2.0).max() < VOCAB
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 1, top_k=0)


def test_one_batch_decodes_some_rows_greedily_and_samples_the_others():
    model = random_model(tiny("mla"))
    prompt = tokens(1, 4)[0]
    greedy = model.generate(prompt, 12, greedy=True)
    both = model.generate(prompt.expand(2, -1), 12, top_k=1, greedy=torch.tensor([True, False]))
    assert torch.equal(both[0], greedy) and torch.equal(both[1], greedy)  # top_k=1 samples the argmax
    torch.manual_seed(5)
    mixed = model.generate(prompt.expand(2, -1), 30, temperature=2.0, greedy=torch.tensor([True, False]))
    assert torch.equal(mixed[0, :16], greedy) and mixed.max() < VOCAB
    assert not torch.equal(mixed[1], mixed[0])  # the second row really samples
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt.expand(2, -1), 1, temperature=0.0, greedy=torch.tensor([True, False]))
    assert torch.equal(model.generate(prompt.expand(2, -1), 12, temperature=0.0, greedy=torch.tensor([True, True]))[1],
                       greedy)


# ----------------------------------------------------------------------------------------------
# MuonClip end to end


@pytest.mark.parametrize("kind", ["mla", "mla-qlora", "mha", "mla-plain"])
def test_qk_clip_caps_the_probed_heads_at_tau(kind):
    model = random_model(tiny(kind))
    with torch.no_grad():  # push logits up: every q and k row x3, so logits x9
        for heads in model.attention_heads():
            heads.q_weight.mul_(3.0)
            heads.k_weight.mul_(3.0)
    idx = tokens(2, 24)
    _, before = model(idx, probe=True)
    _, logits_before, layer_inputs = reference_gpt(model, idx)
    tau = before[0].median().item()
    over = before > tau
    assert over[0].any() and (~over[0]).any() and before.max() > 2
    untouched = {name: p.clone() for name, p in model.named_parameters()
                 if name.split(".")[-2:-1] in (["wkv_a"], ["wq_a"], ["wv"], ["wo"], ["kv_norm"], ["q_norm"],
                                                ["value_embed"], ["ve_gate"])}

    n_clipped = muon.qk_clip_(model.attention_heads(), before, tau)

    # The first layer sees the same input again: its clipped heads now peak at exactly tau.
    _, after = model(idx, probe=True)
    assert n_clipped.item() == over.sum().item()
    torch.testing.assert_close(after[0][over[0]], torch.full_like(after[0][over[0]], tau), rtol=1e-4, atol=0)
    assert torch.equal(after[0][~over[0]], before[0][~over[0]])
    # Later layers' inputs changed with the first layer's output, so compare every layer on the
    # inputs it saw before: each clipped head's logits all scale by gamma, the others stay put.
    gamma = torch.where(over, tau / before, 1.0).double()
    for layer, (block, x, old) in enumerate(zip(model.blocks, layer_inputs, logits_before)):
        new, _ = reference_attention(block.attn, x, model.config, idx)
        for h in range(model.config.n_head):
            if over[layer, h]:
                torch.testing.assert_close(new[:, h], old[:, h] * gamma[layer, h], rtol=1e-6, atol=1e-12)
                assert new[:, h].max().item() == pytest.approx(tau, rel=1e-4)
            else:
                assert torch.equal(new[:, h], old[:, h])
    for name, p in untouched.items():  # the shared rope key (wkv_a) above all
        assert torch.equal(p, dict(model.named_parameters())[name]), name


@pytest.mark.parametrize("kind", ["mla", "mla-qlora", "mha"])
def test_head_blocks_are_the_heads_the_forward_uses(kind):
    """Muon's per-head option cuts each named weight into one block per head: a change to head h's
    block of a query or key weight moves head h's logits and no other head's; the value and
    output blocks are one head's width."""
    c = tiny(kind)
    model = random_model(c)
    attn, blocks = model.blocks[0].attn, model.head_blocks()
    names = dict(model.named_parameters())
    assert set(blocks) <= set(names) and len(blocks) == c.n_layer * (3 if c.attention == "mla" else 4)
    x = torch.randn(2, 12, c.n_embd, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    logits, _ = reference_attention(attn, x, c, None)  # layer 0: no value embeddings, no tokens needed
    v_width = c.v_head_dim if c.attention == "mla" else c.head_dim
    for name, (r, cols) in blocks.items():
        if not name.startswith("blocks.0."):
            continue
        weight = names[name]
        assert (r, cols) in ((c.n_head, 1), (1, c.n_head))
        if name.endswith(("wo.weight", "wv.weight")):
            assert (weight.size(1) // cols if cols > 1 else weight.size(0) // r) == v_width
            continue
        h = 1
        with torch.no_grad():
            rows = slice(h * weight.size(0) // r, (h + 1) * weight.size(0) // r)
            weight[rows] += 0.5
            changed, _ = reference_attention(attn, x, c, None)
            weight[rows] -= 0.5
        others = [i for i in range(c.n_head) if i != h]
        assert torch.equal(changed[:, others], logits[:, others]), name
        assert not torch.equal(changed[:, h], logits[:, h]), name


# ----------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize("field, value", [
    ("n_head", 0), ("n_layer", 2.0), ("vocab_size", True), ("attention", "gqa"), ("q_lora_rank", -1),
    ("qk_rope_head_dim", 7), ("head_dim", 15), ("kv_lora_rank", 0), ("logit_softcap", -1.0),
    ("rope_theta", 0), ("probe_chunk_size", 0),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"GPTConfig.{field}="):
        GPTConfig(**{field: value})


# ----------------------------------------------------------------------------------------------
# The attention backend


def test_flash_with_v_padded_is_attention_with_v_unpadded():
    """Flash takes only equal q/k and v widths: MLA's v is zero-padded and the extra output columns
    dropped. The padding changes nothing (math backend, bit for bit), and the CPU flash kernel on
    the padded v gives float64 attention to fp32 rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 40, 24, generator=g), torch.randn(2, 3, 40, 24, generator=g)
    v = torch.randn(2, 3, 40, 16, generator=g)
    scale = 24 ** -0.5
    with sdpa_kernel(SDPBackend.MATH):
        unpadded = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        padded = F.scaled_dot_product_attention(q, k, F.pad(v, (0, 8)), is_causal=True, scale=scale)[..., :16]
    assert torch.equal(padded, unpadded)
    flash = kernels.causal_attention(q, k, v, scale, "flash")
    assert flash.shape == v.shape
    scores = (q.double() @ k.double().mT * scale).masked_fill(~kernels.causal_mask(0, 40, 40, "cpu"), float("-inf"))
    torch.testing.assert_close(flash.double(), scores.softmax(-1) @ v.double(), atol=1e-5, rtol=0)


# What PyTorch's eligibility checks say on each machine, for causal attention of (q/k, v) widths.
MACHINES = {
    "H100, cuDNN 9": {"cudnn": lambda qk, v: True, "flash": lambda qk, v: qk == v, "efficient": lambda qk, v: True},
    "A100": {"cudnn": lambda qk, v: False, "flash": lambda qk, v: qk == v, "efficient": lambda qk, v: True},
    "H100, old cuDNN, flash off": {"cudnn": lambda qk, v: False, "flash": lambda qk, v: False,
                                   "efficient": lambda qk, v: True},
    "nothing fused": {"cudnn": lambda qk, v: False, "flash": lambda qk, v: False, "efficient": lambda qk, v: False},
}


@pytest.mark.parametrize("machine, expected", [
    ("H100, cuDNN 9", "cudnn"), ("A100", "flash"), ("H100, old cuDNN, flash off", "efficient"),
    ("nothing fused", "math"),
])
def test_the_backend_policy_prefers_cudnn_then_padded_flash_then_efficient(machine, expected):
    asked = []

    def supports(backend, qk, v, dtype, device):
        asked.append((backend, qk, v))
        return MACHINES[machine][backend](qk, v)

    cuda = torch.device("cuda")
    assert kernels.choose_sdpa_backend(cuda, 96, 64, torch.bfloat16, supports) == expected
    if expected in ("flash", "efficient", "math"):
        assert ("flash", 96, 96) in asked  # flash is asked about the padded widths
    assert kernels.choose_sdpa_backend(torch.device("cpu"), 96, 64, torch.float32, supports) == "flash"


def test_the_chosen_backend_is_used_by_every_layer_and_a_config_can_force_one():
    m = GPT(tiny("mla"))
    assert all(block.attn.sdpa_backend is None for block in m.blocks)  # PyTorch's pick until chosen
    assert m.choose_attention(torch.float32) == "flash"
    assert {block.attn.sdpa_backend for block in m.blocks} == {"flash"}
    torch.manual_seed(0)
    forced = GPT(tiny("mla", sdpa_backend="math"))
    assert forced.choose_attention(torch.float32) == "math"
    forced.load_state_dict(m.state_dict())
    x = tokens(2, 16)
    torch.testing.assert_close(m(x, x), forced(x, x), rtol=1e-5, atol=1e-6)  # two kernels, one attention


@pytest.mark.parametrize("changes, message", [
    (dict(qk_nope_head_dim=14, qk_rope_head_dim=6), r"qk_nope_head_dim \+ qk_rope_head_dim=20: expected a multiple of 8"),
    (dict(v_head_dim=12), r"v_head_dim=12: expected a multiple of 8 up to 256"),
    (dict(attention="mha", head_dim=300), r"head_dim=300: expected a multiple of 8 up to 256"),
    (dict(sdpa_backend="xformers"), r"sdpa_backend='xformers': expected one of \('auto', 'cudnn', 'flash'"),
])
def test_widths_no_fused_kernel_serves_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CONFIGS["tiny-mla"], **changes)


def test_rope_by_roll_is_the_split_rotation_bit_for_bit():
    from model import apply_rope, rope_tables
    x = torch.randn(2, 16, 3, 8)
    cos, sin = rope_tables(8, 16, 10000.0)
    c, s = cos[:, None, :4], -sin[:, None, :4]  # the tables hold [cos, cos] and [-sin, sin]
    x1, x2 = x.chunk(2, dim=-1)
    assert torch.equal(apply_rope(x, cos, sin), torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1))
