"""The demo's yardstick: a plain GPT-2-style model trained with torch.optim.Muon on the same data.

    python -m bench.peer                        # 600 steps on the demo shards, val loss every 100
    python -m bench.peer --lr 0.016 --steps 100

What a newcomer would write from nanoGPT and the PyTorch docs: learned positions, tied
embeddings, LayerNorm, GELU MLP, standard attention; torch.optim.Muon (Nesterov,
adjust_lr_fn="match_rms_adamw", so Muon shares AdamW's lr and weight decay) on the hidden
matrices and torch.optim.AdamW (betas 0.9, 0.95) on the rest, 30 warmup steps and a linear
cooldown over the last 40% (the speedrun's trapezoid). Its shape matches the demo's: 4 layers, d=128, 4 heads,
seq 128, 32 sequences a step, the same train batches (our loader, same seed) and the same val
tokens. Nothing here is ours but the loaders, so the comparison is recipe against recipe.
"""

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import muon
from data.demo import ensure_demo_shards
from data.loader import TrainLoader, ValLoader
from data.tokenizer import bytes_tokenizer

PLAN = dict(n_layer=4, n_head=4, n_embd=128, seq_len=128, batch_size=32, micro_batch_size=16,
            val_tokens=32768, steps=600, warmup_steps=30, cooldown_frac=0.4, lr=8e-3, weight_decay=0.1)


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.attn_proj = nn.Linear(d, d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.c_attn(self.ln_1(x)).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class PeerGPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        for name, p in self.named_parameters():  # GPT-2's init
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T  # tied
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def build_optimizers(model: PeerGPT, lr: float, weight_decay: float):
    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith(("wte", "wpe"))]
    embeddings = [model.wte.weight, model.wpe.weight]
    gains = [p for p in model.parameters() if p.ndim < 2]
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, momentum=0.95, nesterov=True,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([dict(params=embeddings, weight_decay=weight_decay),
                               dict(params=gains, weight_decay=0.0)], lr=lr, betas=(0.9, 0.95))
    return [muon, adamw]


def lr_factor(step: int, steps: int, warmup_steps: int, cooldown_frac: float) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    cooldown = round(cooldown_frac * steps)
    return min(1.0, (steps - step) / cooldown)


@torch.no_grad()
def evaluate(model: PeerGPT, val: ValLoader) -> float:
    model.eval()
    loss = sum(model(x, y).item() for x, y in val) / len(val)
    model.train()
    return loss


def train_peer(plan: dict, data_dir: str, seed: int = 0, eval_every: int = 100) -> list[tuple[int, float]]:
    """Train from scratch; returns [(step, val loss)] every eval_every steps and at the end."""
    p = plan
    device = torch.device("cpu")
    train = TrainLoader(f"{data_dir}/train_*.bin", p["micro_batch_size"], p["seq_len"], seed=seed, device=device)
    val = ValLoader(f"{data_dir}/val_*.bin", p["val_tokens"], p["micro_batch_size"], p["seq_len"], device=device)
    torch.manual_seed(seed)
    model = PeerGPT(bytes_tokenizer().n_vocab, p["seq_len"], p["n_layer"], p["n_head"], p["n_embd"])
    optimizers = build_optimizers(model, p["lr"], p["weight_decay"])
    grad_accum = p["batch_size"] // p["micro_batch_size"]
    curve = []
    for step in range(p["steps"] + 1):
        if step % eval_every == 0 or step == p["steps"]:
            curve.append((step, evaluate(model, val)))
            print(f"step {step:4d}/{p['steps']} | val loss {curve[-1][1]:.4f}", flush=True)
        if step == p["steps"]:
            return curve
        factor = lr_factor(step, p["steps"], p["warmup_steps"], p["cooldown_frac"])
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = p["lr"] * factor
        for _ in range(grad_accum):
            x, y = next(train)
            (model(x, y) / grad_accum).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)


def fp32_newton_schulz(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's Newton-Schulz (the classic quintic) in fp32 rather than its fixed bf16."""
    if tuple(ns_coefficients) != muon.NS_COEFFICIENTS["classic"][0]:
        raise ValueError(f"--fp32-newton-schulz runs the classic coefficients, not {ns_coefficients}")
    return muon.newton_schulz(grad, "classic", ns_steps, eps=eps, dtype=torch.float32)


def main(argv=None) -> list[tuple[int, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, default=PLAN["lr"], help="Muon's and AdamW's lr (match_rms_adamw)")
    parser.add_argument("--steps", type=int, default=PLAN["steps"])
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--data-dir", default=None, help="byte-level shards (default: data.demo's)")
    parser.add_argument("--fp32-newton-schulz", action="store_true",
                        help="patch torch.optim.Muon to run Newton-Schulz in fp32: on CPUs without native bf16 "
                             "(AVX2-only) its bf16 matmuls are ~50x slower, which hides the rest of the step's cost")
    args = parser.parse_args(argv)
    if args.fp32_newton_schulz:
        torch.optim._muon._zeropower_via_newtonschulz = fp32_newton_schulz
    plan = dict(PLAN, lr=args.lr, steps=args.steps)
    started = time.perf_counter()
    curve = train_peer(plan, args.data_dir or str(ensure_demo_shards()), eval_every=args.eval_every)
    print(f"peer: lr {args.lr:g}, {args.steps} steps, final val loss {curve[-1][1]:.4f}, "
          f"{time.perf_counter() - started:.1f}s")
    return curve


if __name__ == "__main__":
    main()
