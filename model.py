"""GPT with Multi-head Latent Attention (MLA), decoupled RoPE and a per-head max-logit probe.

One file, top to bottom: config, RoPE, attention (MLA, and standard MHA for comparisons), MLP,
block, GPT (training forward, FLOPs, the MuonClip hook, generation with a latent KV cache). The
attention kernels (which SDPA backend, the max-logit probe) are in kernels.py.

    import muon
    from model import CONFIGS, GPT
    model = GPT(CONFIGS["gpt124m-mla"])
    loss, max_logits = model(idx, targets, probe=True)       # max_logits: (n_layer, n_head) fp32
    loss.backward(); opt.step()
    muon.qk_clip_(model.attention_heads(), max_logits, tau=100.0)

MLA (DeepSeek-V2, arXiv 2405.04434), per layer, with DeepSeek's names:

    q              = wq(x)  or  wq_b(q_norm(wq_a(x)))            each head's rows [q_nope | q_rope]
    latent, k_rope = split(wkv_a(x), [kv_lora_rank, rope])       ONE rope key, shared by all heads
    kv             = wkv_b(kv_norm(latent))                       each head's rows [k_nope | v]
    logit          = (q_nope . k_nope + RoPE(q_rope) . RoPE(k_rope)) / sqrt(nope + rope)
    out            = wo(concat over heads of softmax(logit) @ v)

The per-head row grouping is what MuonClip (muon.qk_clip_) relies on to rescale one head.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import kernels
import muon
from kernels import causal_mask

NORM_EPS = 1e-6
ATTENTION_KINDS = ("mla", "mha")
INITS = ("speedrun", "nanochat")
VE_GATE_CHANNELS = 12  # the latent's first channels, from which each head's value-embedding gate is computed
SMEAR_CHANNELS = 24    # the embedding's first channels, from which the smear gate is computed

# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class GPTConfig:
    vocab_size: int = 50257        # the tokenizer's; embedding and head are padded to a multiple of 64
    block_size: int = 1024         # max sequence length (RoPE tables and KV cache are this long)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    attention: str = "mla"         # "mla" or "mha"
    # MLA widths (per head, except the ranks)
    q_lora_rank: int = 0           # 0: q = wq(x); else q = wq_b(q_norm(wq_a(x)))
    kv_lora_rank: int = 256        # width of the cached latent
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    # MHA width per head (RoPE rotates all of it)
    head_dim: int = 64
    # nanochat's small-model ideas (bench/recipe.py measures each one left out, and layer_lambdas
    # put in: off by default because the demo trained better without it on both seeds):
    rope_theta: float = 100000.0
    logit_softcap: float = 15.0    # 0: off; else logits = cap * tanh(logits / cap)
    embed_norm: bool = True        # RMS-normalise the token embedding before the first block
    layer_lambdas: bool = False    # x <- resid_lambda[i] x + x0_lambda[i] x0 before block i (x0: the first block's input)
    smear: bool = True             # add a gated share of the previous token's embedding to each token's
    backout: bool = True           # subtract a learned share of the middle block's output before the final norm
    value_embeds: bool = True      # on alternating layers (the last included) add a token embedding to v, gated per head; MLA only
    init: str = "nanochat"         # "nanochat" or "speedrun" (see GPT._init_weights)
    probe_chunk_size: int = 128    # query rows per score tile of the max-logit probe
    sdpa_backend: str = "auto"     # attention kernel: "auto" (choose_sdpa_backend), "cudnn", "flash", "efficient", "math"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "head_dim", "probe_chunk_size"):
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, name, value, "a positive integer")
        _require(_is_int(self.q_lora_rank) and self.q_lora_rank >= 0, "q_lora_rank", self.q_lora_rank,
                 "a non-negative integer (0 = no query compression)")
        for name in ("qk_rope_head_dim", "head_dim"):  # RoPE rotates pairs of features
            _require(getattr(self, name) % 2 == 0, name, getattr(self, name), "an even integer")
        _require(self.attention in ATTENTION_KINDS, "attention", self.attention, f"one of {ATTENTION_KINDS}")
        _require(self.sdpa_backend in ("auto", *kernels.SDPA_BACKENDS), "sdpa_backend", self.sdpa_backend,
                 f"one of {('auto', *kernels.SDPA_BACKENDS)}")
        # The fused attention kernels take head widths that are multiples of 8, up to 256; anything
        # else falls to the math backend, which builds every T x T score matrix.
        widths = ({"qk_nope_head_dim + qk_rope_head_dim": self.qk_nope_head_dim + self.qk_rope_head_dim,
                   "v_head_dim": self.v_head_dim} if self.attention == "mla" else {"head_dim": self.head_dim})
        for name, width in widths.items():
            if _is_int(width):
                _require(width % 8 == 0 and width <= 256, name, width,
                         "a multiple of 8 up to 256 (the widths fused attention kernels serve)")
        _require(_is_number(self.rope_theta) and self.rope_theta > 0, "rope_theta", self.rope_theta,
                 "a positive number")
        _require(_is_number(self.logit_softcap) and self.logit_softcap >= 0, "logit_softcap",
                 self.logit_softcap, "a number >= 0 (0 = off)")
        _require(not self.value_embeds or self.attention == "mla", "value_embeds", self.value_embeds,
                 'false with attention = "mha" (value embeddings are MLA-only here)')
        _require(self.init in INITS, "init", self.init, f"one of {INITS}")

    @property
    def padded_vocab_size(self) -> int:
        # A multiple of 64 keeps the head's matmul on tensor-core-friendly shapes (50257 -> 50304).
        return (self.vocab_size + 63) // 64 * 64


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, field: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"GPTConfig.{field}={value!r}: expected {expected}")


# Named configurations. They are shared objects: derive variants with dataclasses.replace.
CONFIGS = {
    # GPT-2 small's trunk (d=768, 12 layers, 12 heads, seq 1024) with MLA. Widths: nope 64 keeps
    # GPT-2's 64-wide content dot product; rope 32 (DeepSeek's rope = nope / 2) adds position on
    # top, so q/k are 96 wide (cuDNN attention takes q/k 96 with v 64 at close to 64/64's speed); v 64
    # keeps wo a square 768 x 768 as in GPT-2; kv_lora_rank 256 (DeepSeek uses 4 x nope) caches
    # 256 + 32 = 288 numbers per token and layer instead of MHA's 2 x 768; q_lora_rank 0, since at
    # d=768 a low-rank query saves little and costs a norm and a matmul (DeepSeek-V2-Lite has none).
    # The value embeddings add 6 x 50304 x 768 embedding weights (lookups, no FLOPs), as nanochat's do.
    "gpt124m-mla": GPTConfig(),
    "gpt124m-mha": GPTConfig(attention="mha", head_dim=64, value_embeds=False),
    # CPU tests and the demo (vocab_size stays GPT-2's here; a trainer sets it from its tokenizer).
    "tiny-mla": GPTConfig(block_size=256, n_layer=2, n_head=4, n_embd=64, kv_lora_rank=32,
                          qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
    "tiny-mha": GPTConfig(block_size=256, n_layer=2, n_head=4, n_embd=64, attention="mha", head_dim=16,
                          value_embeds=False),
}

# ----------------------------------------------------------------------------------------------
# RoPE


def rope_tables(dim: int, length: int, theta: float) -> tuple[Tensor, Tensor]:
    """Tables for apply_rope, (length, dim) each, for positions < length: with angles
    a_k = position * theta^(-2k/dim) for pairs k < dim/2, cos is [cos a, cos a] and sin is
    [-sin a, sin a], so that pair (k, k + dim/2) turns by a_k."""
    # fp64 so the fp32 tables are correctly rounded even at large position * frequency.
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    cos, sin = angles.cos().float(), angles.sin().float()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each feature pair (k, k + d/2) of x (B, T, heads, d) by its position's angle:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), with cos and sin from rope_tables (T, d).

    Pairs are the two halves (GPT-NeoX's layout), not neighbours as in DeepSeek's complex-number
    code: same RoPE, contiguous slices. Rolling x by d/2 puts x2 against x1 and x1 against x2, so
    the rotation is two products and a sum, with no split or concatenation (bit-identical to the
    split form). The products promote bf16 x to the tables' fp32; the result goes back to x's dtype.
    """
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin).type_as(x)


def _norm(norm: nn.RMSNorm, x: Tensor) -> Tensor:
    """norm(x) in the gain's dtype: autocast hands bf16 matmul outputs to an fp32 gain, which
    torch's fused RMSNorm kernel refuses (it falls back to several unfused ops)."""
    return norm(x.to(norm.weight.dtype))


# ----------------------------------------------------------------------------------------------
# Attention


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        d, H = config.n_embd, config.n_head
        self.n_head = H
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        qk_dim = self.nope + self.rope
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(d, H * qk_dim, bias=False)
        else:
            self.wq_a = nn.Linear(d, self.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(self.q_lora_rank, eps=NORM_EPS)
            self.wq_b = nn.Linear(self.q_lora_rank, H * qk_dim, bias=False)
        self.wkv_a = nn.Linear(d, self.kv_lora_rank + self.rope, bias=False)
        self.kv_norm = nn.RMSNorm(self.kv_lora_rank, eps=NORM_EPS)
        self.wkv_b = nn.Linear(self.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, d, bias=False)
        self.softmax_scale = qk_dim ** -0.5
        self.probe_chunk_size = config.probe_chunk_size
        self.sdpa_backend = None if config.sdpa_backend == "auto" else config.sdpa_backend  # GPT.choose_attention
        # Value embeddings (ResFormer-style, as nanochat has them) on alternating layers, the last one
        # included: v += gate * embedding(token), each head's gate 3 sigmoid(W latent[:12]) in (0, 3).
        # The gate reads the latent, which the KV cache keeps, so decoding needs only the token ids.
        has_ve = config.value_embeds and layer % 2 == (config.n_layer - 1) % 2
        self.value_embed = nn.Embedding(config.padded_vocab_size, H * self.v_dim) if has_ve else None
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, H, bias=False) if has_ve else None

    def heads(self) -> muon.AttentionHeads:
        q_weight = self.wq.weight if self.q_lora_rank == 0 else self.wq_b.weight
        return muon.AttentionHeads(q_weight, self.wkv_b.weight, self.n_head, self.nope, self.rope, self.v_dim)

    def head_blocks(self) -> dict[str, tuple[int, int]]:
        """Per weight, its (row, column) blocks of one head each, for Muon's per-head option: the
        query's rows [q_nope | q_rope] and wkv_b's rows [k_nope | v] by head, wo's columns by head.
        wq_a and wkv_a (shared by every head, the rope key too) stay whole."""
        H = self.n_head
        return {"wq.weight" if self.q_lora_rank == 0 else "wq_b.weight": (H, 1), "wkv_b.weight": (H, 1),
                "wo.weight": (1, H)}

    def new_cache(self, batch: int, length: int, dtype: torch.dtype, device) -> Tensor:
        """Per token only the kv_norm'd latent and the roped shared key: (B, length, kv_lora_rank + rope)."""
        return torch.zeros(batch, length, self.kv_lora_rank + self.rope, dtype=dtype, device=device)

    def _queries(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """q_nope (B, T, H, nope) and roped q_rope (B, T, H, rope)."""
        B, T, _ = x.shape
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(_norm(self.q_norm, self.wq_a(x)))
        q_nope, q_rope = q.view(B, T, self.n_head, -1).split([self.nope, self.rope], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def _latent_and_rope_key(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """The normed latent (B, T, kv_lora_rank) and the roped shared key (B, T, 1, rope)."""
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)
        return _norm(self.kv_norm, latent), apply_rope(k_rope.unsqueeze(2), cos, sin)

    def _value_embeddings(self, ids: Tensor, latent: Tensor) -> Tensor:
        """What the value embeddings add to v for tokens ids (B, S) with latents (B, S, kv_lora_rank): (B, S, H, v_dim)."""
        gate = 3 * torch.sigmoid(self.ve_gate(latent[..., :VE_GATE_CHANNELS]))
        return gate.unsqueeze(-1) * self.value_embed(ids).view(*ids.shape, self.n_head, self.v_dim).to(gate.dtype)

    def forward(self, x, cos, sin, probe=False, cache=None, start=0, ids=None):
        if cache is not None:
            return self._decode(x, cos, sin, cache, start, ids), None
        B, T, _ = x.shape
        H = self.n_head
        q_nope, q_rope = self._queries(x, cos, sin)
        latent, k_rope = self._latent_and_rope_key(x, cos, sin)
        k_nope, v = self.wkv_b(latent).view(B, T, H, -1).split([self.nope, self.v_dim], dim=-1)
        if self.value_embed is not None:
            v = v + self._value_embeddings(ids, latent).to(v.dtype)
        # One cat each; the shared rope key is broadcast to the heads by expand, not copied first.
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, H, -1)], dim=-1).transpose(1, 2)
        y = kernels.causal_attention(q, k, v.transpose(1, 2), self.softmax_scale, self.sdpa_backend)
        max_logits = kernels.max_causal_logits(q, k, self.softmax_scale, self.probe_chunk_size) if probe else None
        return self.wo(y.transpose(1, 2).reshape(B, T, -1)), max_logits

    def _decode(self, x: Tensor, cos: Tensor, sin: Tensor, cache: Tensor, start: int, ids: Tensor) -> Tensor:
        """Attention of new tokens x (positions start..) over the cache, wkv_b absorbed; ids (B, end)
        are the tokens at positions 0..end-1.

        q_nope . (W_k c) = (W_k^T q_nope) . c: the k_nope rows of wkv_b move into the query, and
        sum_j p_j W_v c_j = W_v sum_j p_j c_j: its v rows move after the weighted sum. So keys and
        values never leave latent space and the cache holds only latent and rope key per token; the
        value embeddings' share, sum_j p_j gate_j e_j, comes from the cached latents and the ids.
        """
        B, T, _ = x.shape
        end = start + T
        q_nope, q_rope = self._queries(x, cos, sin)
        latent, k_rope = self._latent_and_rope_key(x, cos, sin)
        cache[:, start:end] = torch.cat([latent, k_rope.squeeze(2)], dim=-1)
        w_k, w_v = self.wkv_b.weight.view(self.n_head, -1, self.kv_lora_rank).split([self.nope, self.v_dim], dim=1)
        q_latent = torch.einsum("bthn,hnc->bthc", q_nope, w_k)
        # [q_latent | q_rope] . [latent | k_rope] is the nope and the rope logit in one product.
        scores = torch.einsum("bthc,bsc->bhts", torch.cat([q_latent, q_rope], dim=-1), cache[:, :end])
        scores = (scores * self.softmax_scale).masked_fill(~causal_mask(start, T, end, x.device), float("-inf"))
        probs = scores.softmax(dim=-1)
        y_latent = torch.einsum("bhts,bsc->bthc", probs, cache[:, :end, :self.kv_lora_rank])
        y = torch.einsum("bthc,hvc->bthv", y_latent, w_v)
        if self.value_embed is not None:
            y = y + torch.einsum("bhts,bshv->bthv", probs, self._value_embeddings(ids, cache[:, :end, :self.kv_lora_rank]))
        return self.wo(y.reshape(B, T, -1))


class MultiHeadAttention(nn.Module):
    """Standard attention with RoPE on all of q and k, for comparisons with MLA."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        d, H, hd = config.n_embd, config.n_head, config.head_dim
        self.n_head, self.head_dim = H, hd
        self.wq, self.wk, self.wv = (nn.Linear(d, H * hd, bias=False) for _ in range(3))
        self.wo = nn.Linear(H * hd, d, bias=False)
        self.softmax_scale = hd ** -0.5
        self.probe_chunk_size = config.probe_chunk_size
        self.sdpa_backend = None if config.sdpa_backend == "auto" else config.sdpa_backend  # GPT.choose_attention

    def heads(self) -> muon.AttentionHeads:
        # RoPE is linear, so scaling a head's q and k rows by sqrt(gamma) scales its logits by
        # gamma: for MuonClip the whole head counts as "nope".
        return muon.AttentionHeads(self.wq.weight, self.wk.weight, self.n_head, self.head_dim)

    def head_blocks(self) -> dict[str, tuple[int, int]]:
        """Per weight, its (row, column) blocks of one head each: q, k and v rows, wo columns."""
        H = self.n_head
        return {"wq.weight": (H, 1), "wk.weight": (H, 1), "wv.weight": (H, 1), "wo.weight": (1, H)}

    def new_cache(self, batch: int, length: int, dtype: torch.dtype, device) -> Tensor:
        """Roped keys and values: (2, B, H, length, head_dim)."""
        return torch.zeros(2, batch, self.n_head, length, self.head_dim, dtype=dtype, device=device)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Roped q, roped k and v, each (B, H, T, head_dim)."""
        B, T, _ = x.shape
        q, k, v = (w(x).view(B, T, self.n_head, self.head_dim) for w in (self.wq, self.wk, self.wv))
        return apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, cos, sin, probe=False, cache=None, start=0, ids=None):
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        if cache is None:
            y = kernels.causal_attention(q, k, v, self.softmax_scale, self.sdpa_backend)
            max_logits = kernels.max_causal_logits(q, k, self.softmax_scale, self.probe_chunk_size) if probe else None
        else:
            end = start + T
            cache[0, :, :, start:end], cache[1, :, :, start:end] = k, v
            y = F.scaled_dot_product_attention(
                q, cache[0, :, :, :end], cache[1, :, :, :end],
                attn_mask=causal_mask(start, T, end, x.device), scale=self.softmax_scale,
            )
            max_logits = None
        return self.wo(y.transpose(1, 2).reshape(B, T, -1)), max_logits


# ----------------------------------------------------------------------------------------------
# MLP, block, GPT


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())  # relu^2, as in modded-nanogpt


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=NORM_EPS)
        self.attn = MultiHeadLatentAttention(config, layer) if config.attention == "mla" else MultiHeadAttention(config)
        self.mlp_norm = nn.RMSNorm(config.n_embd, eps=NORM_EPS)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, probe=False, cache=None, start=0, ids=None):
        y, max_logits = self.attn(self.attn_norm(x), cos, sin, probe, cache, start, ids)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), max_logits


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.norm_f = nn.RMSNorm(config.n_embd, eps=NORM_EPS)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        L = config.n_layer  # modded-nanogpt's and nanochat's per-layer scalars, each an option
        self.resid_lambdas = nn.Parameter(torch.linspace(1.15, 1.05, L)) if config.layer_lambdas else None
        self.x0_lambdas = nn.Parameter(torch.linspace(0.20, 0.05, L)) if config.layer_lambdas else None
        self.smear_gate = nn.Parameter(torch.zeros(SMEAR_CHANNELS)) if config.smear else None
        self.smear_lambda = nn.Parameter(torch.zeros(())) if config.smear else None
        self.backout_lambda = nn.Parameter(torch.tensor(0.2)) if config.backout else None
        rope_dim = config.qk_rope_head_dim if config.attention == "mla" else config.head_dim
        cos, sin = rope_tables(rope_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        # "nanochat": uniform with std 1 / sqrt(fan_in) (no outliers), 0.4x for the MLP's first
        # matrix, embedding std 0.8, head std 0.001. "speedrun": std 0.5 / sqrt(fan_in), normal,
        # so a layer's output starts at half its input's RMS, embedding std 1, head zero.
        nanochat = self.config.init == "nanochat"
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and nanochat:
                bound = math.sqrt(3 / module.in_features) * (0.4 if name.endswith("mlp.fc") else 1.0)
                module.weight.uniform_(-bound, bound)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(std=0.5 / math.sqrt(module.in_features))
            elif isinstance(module, nn.Embedding) and module is not self.wte:  # value embeddings, as v's weights
                module.weight.uniform_(-math.sqrt(3 / self.config.n_embd), math.sqrt(3 / self.config.n_embd))
        self.wte.weight.normal_(std=0.8 if nanochat else 1.0)
        for block in self.blocks:  # value-embedding gates a little above neutral (3 sigmoid(0) = 1.5)
            if getattr(block.attn, "ve_gate", None) is not None:
                block.attn.ve_gate.weight.uniform_(0.0, 0.02)
        if self.smear_gate is not None:
            self.smear_gate.uniform_(0.0, 0.02)
        # Both zero the matrices that write into the residual stream: every block starts as the
        # identity, and the first updates, not random init, decide what each block adds. The cost:
        # the weights before wo and proj get gradients once those are nonzero (from the second
        # step; the third with the "speedrun" head, which is zero at the first).
        for block in self.blocks:
            block.attn.wo.weight.zero_()
            block.mlp.proj.weight.zero_()
        if nanochat:
            self.lm_head.weight.normal_(std=0.001)
        else:
            self.lm_head.weight.zero_()

    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters; non_embedding=True leaves out the embeddings (lookups, no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        embeddings = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return n - embeddings if non_embedding else n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 per weight of every matmul, plus attention's QK^T and AV.

        Every weight but the token embedding (a lookup) counts, the head included, as the tied
        wte does in nanoGPT. Attention is counted over the full T x T like nanoGPT's 12 L H Q T,
        with MLA's q/k width (nope + rope) and v width: 2 FLOPs x 3 (fwd + bwd) x T x H x (qk + v)
        per layer."""
        c = self.config
        qk, v = (c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim) if c.attention == "mla" else (c.head_dim,) * 2
        return 6 * self.num_params(non_embedding=True) + 6 * c.n_layer * c.n_head * seq_len * (qk + v)

    def choose_attention(self, dtype: torch.dtype) -> str:
        """Fix every layer's attention backend for this run (config sdpa_backend, "auto" resolved by
        choose_sdpa_backend for the model's device) and return its name. Until this is called,
        "auto" leaves the choice to PyTorch at each call, without padding."""
        c = self.config
        qk, v = (c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim) if c.attention == "mla" else (c.head_dim,) * 2
        backend = c.sdpa_backend
        if backend == "auto":
            backend = kernels.choose_sdpa_backend(self.lm_head.weight.device, qk, v, dtype)
        for block in self.blocks:
            block.attn.sdpa_backend = backend
        return backend

    def head_blocks(self) -> dict[str, tuple[int, int]]:
        """Parameter name -> (row_blocks, column_blocks) of its attention heads, for Muon's blocks
        option (each head's block orthogonalised as its own matrix); other matrices are absent."""
        return {f"blocks.{i}.attn.{name}": blocks for i, block in enumerate(self.blocks)
                for name, blocks in block.attn.head_blocks().items()}

    def attention_heads(self) -> list[muon.AttentionHeads]:
        """Each layer's live q/k weights and head layout, for muon.qk_clip_."""
        return [block.attn.heads() for block in self.blocks]

    def forward(self, idx: Tensor, targets: Tensor | None = None, probe: bool = False):
        """Logits (B, T, padded_vocab_size), or with targets the mean cross-entropy (fp32, targets
        of -1 ignored). With probe=True also the max pre-softmax logit per layer and head over
        the batch: returns (logits or loss, max_logits (n_layer, n_head) fp32, detached)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds GPTConfig.block_size={self.config.block_size}")
        x, max_logits = self._trunk(self._embed(idx), idx, self.rope_cos[:T], self.rope_sin[:T], probe)
        logits = self._logits(x)
        if targets is not None:
            logits = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return (logits, torch.stack(max_logits)) if probe else logits

    def _embed(self, idx: Tensor) -> Tensor:
        """The first block's input: the token embeddings, normalised and with a gated share of the
        previous token's added (smear), where those options are on."""
        x = self.wte(idx)
        if self.config.embed_norm:
            x = F.rms_norm(x, (x.size(-1),), eps=NORM_EPS)
        if self.smear_gate is not None:
            gate = self.smear_lambda * torch.sigmoid(x[:, 1:, :SMEAR_CHANNELS] @ self.smear_gate)
            x = torch.cat([x[:, :1], x[:, 1:] + gate.unsqueeze(-1) * x[:, :-1]], dim=1)
        return x

    def _trunk(self, x: Tensor, ids: Tensor, cos: Tensor, sin: Tensor, probe: bool = False,
               caches: list[Tensor] | None = None, start: int = 0) -> tuple[Tensor, list]:
        """The blocks, with the per-layer lambdas and the backout: (last residual, each layer's max logits)."""
        x0, middle, max_logits = x, None, []
        for i, block in enumerate(self.blocks):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x, layer_max = block(x, cos, sin, probe, None if caches is None else caches[i], start, ids)
            max_logits.append(layer_max)
            middle = x if i == len(self.blocks) // 2 else middle
        if self.backout_lambda is not None:  # takes out what the middle block's residual gave the head
            x = x - self.backout_lambda * middle
        return x, max_logits

    def _logits(self, x: Tensor) -> Tensor:
        logits = self.lm_head(self.norm_f(x))
        # bf16 -> fp32 for the softcap and the loss; a float64 model (tests) stays float64.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    # ------------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 greedy: bool | Tensor = False, use_cache: bool = True) -> Tensor:
        """The prompt idx (T,) or (B, T) followed by max_new_tokens new tokens, same number of dims.

        greedy takes the argmax; otherwise samples from softmax(logits / temperature), restricted
        to the top_k most likely tokens if given. greedy may also be a (B,) bool tensor, one choice
        per row, so one batch decodes a prompt both ways. Padding tokens are never chosen.
        Beyond block_size the context is cropped to the last block_size tokens; with the cache,
        that shifts every position, so each such step refills the cache from the cropped context.
        """
        if idx.dtype != torch.long or idx.ndim not in (1, 2) or idx.size(-1) == 0:
            raise ValueError(f"idx: expected a non-empty long tensor (T,) or (B, T), got {idx.dtype} {tuple(idx.shape)}")
        rows = idx.size(0) if idx.ndim == 2 else 1
        greedy_rows = torch.as_tensor(greedy, dtype=torch.bool, device=idx.device).expand(rows)
        if not bool(greedy_rows.all()) and not temperature > 0:
            raise ValueError(f"temperature={temperature}: expected > 0 (or greedy=True)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k}: expected a positive integer or None")
        one_sequence = idx.ndim == 1
        idx = idx.view(1, -1) if one_sequence else idx
        L = self.config.block_size
        if use_cache:
            caches = [block.attn.new_cache(idx.size(0), L, self.wte.weight.dtype, idx.device) for block in self.blocks]
        for step in range(max_new_tokens):
            if not use_cache:
                logits = self(idx[:, -L:])[:, -1]
            elif step == 0 or idx.size(1) > L:
                logits = self._cached_logits(idx[:, -L:], caches, start=0)
            else:
                logits = self._cached_logits(idx, caches, start=idx.size(1) - 1)
            next_token = pick_token(logits[:, :self.config.vocab_size], temperature, top_k, greedy_rows)
            idx = torch.cat([idx, next_token], dim=1)
        return idx[0] if one_sequence else idx

    def _cached_logits(self, context: Tensor, caches: list[Tensor], start: int) -> Tensor:
        """Logits (B, V) after the last token of context (B, end), the tokens at positions 0..end-1;
        those from start on are new, and fill the caches."""
        end = context.size(1)
        x = self._embed(context[:, max(start - 1, 0):])[:, min(start, 1):]  # the smear needs the token before
        x, _ = self._trunk(x, context, self.rope_cos[start:end], self.rope_sin[start:end], caches=caches, start=start)
        return self._logits(x[:, -1])


def pick_token(logits: Tensor, temperature: float, top_k: int | None, greedy_rows: Tensor) -> Tensor:
    """One token per row of logits (B, V): (B, 1); the argmax where greedy_rows (B,) is True."""
    best = logits.argmax(dim=-1, keepdim=True)
    if greedy_rows.all():
        return best
    if not logits[~greedy_rows].isfinite().all():  # multinomial's own error would not say why
        raise ValueError("cannot sample: the logits are not finite (the model has diverged)")
    logits = logits / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    # Greedy rows' logits may be anything: a uniform distribution keeps multinomial valid.
    sampled = torch.multinomial(logits.masked_fill(greedy_rows[:, None], 0.0).softmax(dim=-1), num_samples=1)
    return torch.where(greedy_rows[:, None], best, sampled)
