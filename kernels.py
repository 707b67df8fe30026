"""The attention kernels model.py calls: which scaled_dot_product_attention backend a run uses,
and the per-head max-logit probe that MuonClip reads.

    backend = choose_sdpa_backend(device, qk_dim, v_dim, dtype)    # once per run
    y = causal_attention(q, k, v, scale, backend)                  # (B, H, T, v_dim)
    max_logits = max_causal_logits(q, k, scale, chunk_size)        # (H,) fp32, no grad

The probe exists because no attention kernel returns its largest logit: on a GPU with Triton it is
one fused kernel that reduces every QK^T tile to its max without writing scores out; elsewhere
(and as the reference) it is score tiles of chunk_size query rows in plain torch ops.
"""

import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # the probe's fused kernel; without Triton the probe runs as chunked torch ops
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# scaled_dot_product_attention's kernels, by the names GPTConfig.sdpa_backend takes.
SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}

# ----------------------------------------------------------------------------------------------
# The attention backend: one per run, chosen for the device and the head widths

_SDPA_CHECKS = {"cudnn": torch.backends.cuda.can_use_cudnn_attention,
                "flash": torch.backends.cuda.can_use_flash_attention,
                "efficient": torch.backends.cuda.can_use_efficient_attention}


def sdpa_supports(backend: str, qk_dim: int, v_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether PyTorch's own dispatch would run `backend` for causal attention of these widths here."""
    q = torch.empty(1, 1, 128, qk_dim, dtype=dtype, device=device)
    v = torch.empty(1, 1, 128, v_dim, dtype=dtype, device=device)
    return _SDPA_CHECKS[backend](torch.backends.cuda.SDPAParams(q, q, v, None, 0.0, True, False))


def choose_sdpa_backend(device: torch.device, qk_dim: int, v_dim: int, dtype: torch.dtype,
                        supports=sdpa_supports) -> str:
    """The attention backend for a run. On a GPU: cuDNN where it takes these widths (it serves
    MLA's unequal q/k and v widths at full speed), else flash with v zero-padded to the q/k width
    (flash refuses unequal widths; the padding costs v's share of the work), else the
    memory-efficient kernel (several times slower: never the first choice), else math. On a CPU:
    PyTorch's CPU flash kernel, v padded likewise, which beats the math backend there.
    `supports` is PyTorch's own eligibility check (a stand-in in the tests)."""
    if device.type != "cuda":
        return "flash"
    if supports("cudnn", qk_dim, v_dim, dtype, device):
        return "cudnn"
    if supports("flash", qk_dim, qk_dim, dtype, device):
        return "flash"
    if supports("efficient", qk_dim, v_dim, dtype, device):
        return "efficient"
    return "math"


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str | None) -> Tensor:
    """softmax(q k^T * scale + causal mask) v, (B, H, T, v width), on `backend` (None: PyTorch's pick).
    flash needs v as wide as q and k: v is zero-padded and the padding's output columns dropped,
    which leaves the real columns exactly what they are unpadded."""
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    v_dim = v.size(-1)
    if backend == "flash" and v_dim < q.size(-1):
        v = F.pad(v, (0, q.size(-1) - v_dim))
    with sdpa_kernel(SDPA_BACKENDS[backend]):
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return y[..., :v_dim]


# ----------------------------------------------------------------------------------------------
# The causal mask and the max-logit probe


def causal_mask(start: int, n_queries: int, n_keys: int, device) -> Tensor:
    """(n_queries, n_keys) bool, True where the query at position start + t may see key s (s <= start + t)."""
    queries = torch.arange(start, start + n_queries, device=device)
    return torch.arange(n_keys, device=device) <= queries[:, None]


PROBE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the fused kernel takes
# What max_causal_logits sends to the kernel on a GPU. fp32 goes to the chunked path (cuBLAS):
# built for sm_90, the kernel's exact fp32 dot runs on CUDA cores and spills (ptxas: 6.4 KB of
# stack a thread at D=96), where bf16/fp16 use wgmma with no spill (tests/test_model.py checks both).
PROBE_FUSED_DTYPES = (torch.bfloat16, torch.float16)
PROBE_MAX_HEAD_DIM = 256  # wider q/k rows fall back to chunks: a padded 64 x 512 q tile plus
                          # pipelined k tiles would not fit in a Hopper SM's 227 KB of shared memory


@torch.no_grad()
def max_causal_logits(q: Tensor, k: Tensor, scale: float, chunk_size: int) -> Tensor:
    """Per head, the largest logit (q_i . k_j) * scale over the batch and all pairs j <= i: (H,) fp32.

    q, k: (B, H, T, D), any strides. On a GPU with Triton, for bf16/fp16 and D <= 256, one
    fused kernel (triton_max_causal_logits) that never writes a score out; otherwise score tiles
    chunk_size query rows tall (chunked_max_causal_logits). Same maximum up to rounding: the
    kernel keeps it in fp32, the chunked path rounds it once to q's dtype.
    """
    if triton is not None and q.is_cuda and q.dtype in PROBE_FUSED_DTYPES and q.size(-1) <= PROBE_MAX_HEAD_DIM:
        return triton_max_causal_logits(q, k, scale)
    return chunked_max_causal_logits(q, k, scale, chunk_size)


@torch.no_grad()
def chunked_max_causal_logits(q: Tensor, k: Tensor, scale: float, chunk_size: int) -> Tensor:
    """max_causal_logits in torch ops: runs anywhere and traces into one graph under torch.compile.

    Query rows go a block at a time against only the keys they can see, so at most a
    (B, H, chunk_size, T) tile of scores exists at once, never all heads' T x T.
    The tile is in q's dtype (the autocast dtype in training): the matmul accumulates in fp32
    and rounds each score once, and rounding is monotone, so the tile's max is the exact max
    rounded once (<= 0.4% in bf16, immaterial next to tau) for half an fp32 tile's memory traffic.
    The loop depends on the static shape T only, so torch.compile unrolls it without guards on data.
    """
    B, H, T, D = q.shape
    maxima = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        # The causal mask enters the matmul as an additive -inf bias (baddbmm's beta = 1), so no
        # second pass over the tile masks it.
        bias = torch.zeros(end - start, end, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~causal_mask(start, end - start, end, q.device), float("-inf"))
        scores = torch.baddbmm(bias, q[:, :, start:end].reshape(B * H, end - start, D),
                               k[:, :, :end].reshape(B * H, end, D).transpose(1, 2))
        # The max over each (b, h) tile's contiguous scores first, then over b: reductions over
        # contiguous memory, where one amax over dims (0, 2, 3) would stride across the batch.
        maxima.append(scores.view(B, H, -1).amax(dim=-1).amax(dim=0))
    # Scale the (H,) maxima rather than the tiles: max commutes with a positive scale.
    return torch.stack(maxima).amax(dim=0).float() * scale


@torch.no_grad()
def triton_max_causal_logits(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """max_causal_logits as one Triton kernel: (H,) fp32, for q, k (B, H, T, D) bf16, fp16 or fp32.

    Each program takes PROBE_BLOCK_M query rows of one (batch, head), multiplies them by the key
    blocks they can see in registers (fp32 accumulation; fp32 inputs in full fp32, not TF32)
    and stores only the block's max: the memory traffic is reading q and k, the work the QK^T
    FLOPs of causal attention (D padded to a power of 2). Bar fp32 summation order it is the
    exact max; the chunked path's bf16 tiles round it once more. Runs on CUDA (fp32 correctly but
    slowly: see PROBE_FUSED_DTYPES), or on CPU tensors under TRITON_INTERPRET=1 (the tests).
    """
    if triton is None:
        raise RuntimeError("triton_max_causal_logits needs Triton: pip install triton")
    if q.shape != k.shape or q.dtype != k.dtype or q.dtype not in PROBE_DTYPES:
        raise ValueError(f"q, k: expected one shape and one of {PROBE_DTYPES}, got "
                         f"{tuple(q.shape)} {q.dtype} and {tuple(k.shape)} {k.dtype}")
    B, H = q.shape[:2]
    return _block_max_logits(q, k).view(B, H, -1).amax(dim=(0, 2)) * scale


# Triton's CPU interpreter (TRITON_INTERPRET=1, the tests) multiplies bf16 tiles' bit patterns in
# tl.dot (triton-lang/triton#11584, "not supported yet"): there the kernel upcasts the tiles to
# fp32 first, which gives the same exact products the GPU's bf16 tensor cores do.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# 64 x 64 score tiles, 4 warps (128 threads). Built for sm_90 as the 124M MLA model launches it
# (bf16, D=96 padded to 128, unit stride on D), ptxas gives 74 registers a thread, no spill and
# 64 KB of shared memory for the pipelined tiles: 3 programs fit an SM. At T=1024 the grid is 16
# query blocks x B*H (6144 programs for the 124M model at B=32) over 132 SMs, and the diagonal
# tile's masked half is ~6% of an average block's products. Not tuned: bench/probe.py measures it.
PROBE_BLOCK_M, PROBE_BLOCK_N, PROBE_NUM_WARPS = 64, 64, 4

if triton is not None:

    @triton.jit
    def _block_max_logits_kernel(
        q_ptr, k_ptr, out_ptr, n_head, T, D,
        q_stride_b, q_stride_h, q_stride_t, q_stride_d,
        k_stride_b, k_stride_h, k_stride_t, k_stride_d,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # Program (m, bh): query rows m * BLOCK_M.. of batch bh // n_head, head bh % n_head.
        m, bh = tl.program_id(0), tl.program_id(1)
        b, h = (bh // n_head).to(tl.int64), (bh % n_head).to(tl.int64)  # int64: offsets past 2^31
        first_row = m * BLOCK_M
        rows = first_row + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        in_head = dims < D  # BLOCK_D is D rounded up to a power of 2; the padding loads as 0
        q = tl.load(q_ptr + b * q_stride_b + h * q_stride_h + rows[:, None] * q_stride_t + dims[None, :] * q_stride_d,
                    mask=(rows[:, None] < T) & in_head[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_head = k_ptr + b * k_stride_b + h * k_stride_h
        row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        # Key blocks wholly left of the block's first row: every row sees every key, no mask.
        diagonal = first_row // BLOCK_N * BLOCK_N
        for start in range(0, diagonal, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            k_t = tl.load(k_head + keys[None, :] * k_stride_t + dims[:, None] * k_stride_d,
                          mask=in_head[:, None], other=0.0)
            if UPCAST:
                k_t = k_t.to(tl.float32)
            scores = tl.dot(q, k_t, input_precision=DOT_PRECISION)
            row_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # Key blocks crossing the diagonal, up to the block's last row: keys after a row are
        # masked (which masks keys >= T too). Blocks wholly above the diagonal are never loaded.
        for start in range(diagonal, tl.minimum(first_row + BLOCK_M, T), BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            k_t = tl.load(k_head + keys[None, :] * k_stride_t + dims[:, None] * k_stride_d,
                          mask=(keys[None, :] < T) & in_head[:, None], other=0.0)
            if UPCAST:
                k_t = k_t.to(tl.float32)
            scores = tl.dot(q, k_t, input_precision=DOT_PRECISION)
            scores = tl.where(keys[None, :] <= rows[:, None], scores, float("-inf"))
            row_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # Rows past T were loaded as zeros and scored 0 against real keys: a false max if all
        # real logits are negative.
        row_max = tl.where(rows < T, row_max, float("-inf"))
        tl.store(out_ptr + bh * tl.num_programs(0) + m, tl.max(row_max, axis=0))

    def probe_kernel_constants(dtype: torch.dtype, head_dim: int) -> dict:
        """The kernel's compile-time arguments for q, k of this dtype and head width."""
        return dict(
            BLOCK_M=PROBE_BLOCK_M, BLOCK_N=PROBE_BLOCK_N,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)),  # tl.dot needs each side >= 16
            # Triton's default for fp32 operands is TF32 (10-bit mantissas); the probe must be exact.
            # bf16 and fp16 products are exact in fp32 anyway.
            DOT_PRECISION="ieee" if dtype == torch.float32 or TRITON_INTERPRETED else "tf32",
            UPCAST=TRITON_INTERPRETED,
        )

    # An opaque custom op, neither a torch.compiler.disable'd function (a graph break at every
    # layer's probe) nor a torch.library.triton_op (Inductor would inline the launch, but tracing
    # one needs a real GPU kernel, so the compile path could not be tested under the CPU
    # interpreter). torch.compile sees an op whose output shape the fake below gives, keeps the
    # forward one graph and calls the op as it is; inlining would only save the launch's
    # dispatch, microseconds a layer.
    @torch.library.custom_op("gpt::block_max_logits", mutates_args=())
    def _block_max_logits(q: Tensor, k: Tensor) -> Tensor:
        """The largest unscaled causal logit of each PROBE_BLOCK_M query rows: (B * H, n_blocks) fp32."""
        B, H, T, D = q.shape
        out = torch.empty(B * H, triton.cdiv(T, PROBE_BLOCK_M), dtype=torch.float32, device=q.device)
        _block_max_logits_kernel[(out.size(1), B * H)](
            q, k, out, H, T, D, *q.stride(), *k.stride(), **probe_kernel_constants(q.dtype, D),
            num_warps=PROBE_NUM_WARPS,
        )
        return out

    @_block_max_logits.register_fake
    def _(q: Tensor, k: Tensor) -> Tensor:
        B, H, T, _ = q.shape
        return q.new_empty(B * H, triton.cdiv(T, PROBE_BLOCK_M), dtype=torch.float32)
