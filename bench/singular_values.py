"""Tweak a trained model's singular values and talk to it again; and the spectra Muon and AdamW leave.

    python train.py --config configs/demo.toml                                                  # Muon
    python train.py --config configs/demo.toml --optim.optimizer adamw --optim.lr 0.002 --train.run_dir runs/demo-adamw
    python -m bench.singular_values --muon runs/demo/ckpt_000600.pt --adamw runs/demo-adamw/ckpt_000600.pt

For every hidden matrix W = U S V^T of the Muon-trained model (the embedding, head and gains
stay), one edit at a time, applied to all of them at once:

    top k x f     the k largest singular values times f
    tail x f      every singular value but the k largest times f
    flat          U V^T scaled to W's Frobenius norm: every singular value equal, the "fully
                  orthogonalised weight"

then the val loss on the checkpoint's own val tokens and a greedy completion of --prompt. And
for both checkpoints, the trained weights' spectra per matrix kind (mean over layers): stable
rank ||W||_F^2 / ||W||_2^2, condition number s_max / s_min, and the share of ||W||_F^2 in the top
3 singular values. Writes a plot (the normalised spectra of both models, and the edits' val
losses) and prints the spectra table, the completions, then the edits' table last. CPU, a minute.
"""

import argparse
from collections import defaultdict
from pathlib import Path

import torch

import muon
import sample
import train
from bench.figure import plt, save
from data.demo import ensure_demo_shards
from data.loader import ValLoader
from model import GPT


def load(path: str, data_dir: str | None):
    """(model, tokenizer, val loader, cfg) of a train.py checkpoint, on the CPU, in fp32."""
    model, tokenizer, cfg = sample.load_model(Path(path), torch.device("cpu"))
    d = cfg.data
    d.dir = data_dir or d.dir
    if d.demo:
        ensure_demo_shards(d.dir)
    val = ValLoader(Path(d.dir) / d.val_files, d.val_tokens, cfg.train.micro_batch_size, d.seq_len, 0, 1,
                    torch.device("cpu"))
    cfg.train.bf16 = False
    return model, tokenizer, val, cfg


def edited(weight: torch.Tensor, edit: str, k: int, factor: float) -> torch.Tensor:
    """weight with its singular values edited (float64 SVD, back in weight's dtype)."""
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    if edit == "flat":
        S = torch.full_like(S, S.norm().item() / S.numel() ** 0.5)  # same Frobenius norm
    elif edit == "top":
        S = torch.cat([S[:k] * factor, S[k:]])
    elif edit == "tail":
        S = torch.cat([S[:k], S[k:] * factor])
    return ((U * S) @ Vh).to(weight.dtype)


def spectrum_stats(weight: torch.Tensor) -> tuple[float, float, float]:
    """(stable rank, condition number, top-3 energy share) of a matrix."""
    s = torch.linalg.svdvals(weight.double())
    energy = s.square()
    return (energy.sum() / energy[0]).item(), (s[0] / s[-1]).item(), (energy[:3].sum() / energy.sum()).item()


def kind(name: str) -> str:
    """'blocks.3.attn.wo.weight' -> 'attn.wo'."""
    return ".".join(name.split(".")[2:-1])


def greedy(model: GPT, tokenizer, prompt: str, tokens: int) -> str:
    idx = torch.tensor(tokenizer.encode_ordinary(prompt))
    return tokenizer.decode(model.generate(idx, tokens, greedy=True)[len(idx):].tolist())


@torch.no_grad()
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--muon", default="runs/demo/ckpt_000600.pt", help="a checkpoint trained with Muon")
    parser.add_argument("--adamw", default="runs/demo-adamw/ckpt_000600.pt", help="one trained with AdamW")
    parser.add_argument("--data-dir", default=None, help="the val shards' folder, if not the checkpoints' data.dir")
    parser.add_argument("--k", type=int, default=3, help="how many singular values count as the top")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--tokens", type=int, default=40, help="tokens of each greedy completion")
    parser.add_argument("--out", default="bench/results/singular_values.png")
    args = parser.parse_args(argv)

    models = {name: load(path, args.data_dir) for name, path in (("Muon", args.muon), ("AdamW", args.adamw))}
    spectra, stats = {}, defaultdict(list)
    for name, (model, *_) in models.items():
        for param_name, p in muon.param_groups(model)[0]["params"]:
            s = torch.linalg.svdvals(p.double())
            spectra.setdefault(name, {}).setdefault(kind(param_name), []).append((s / s[0]).numpy())
            stats[(kind(param_name), name)].append(spectrum_stats(p))
    print("| matrix | optimizer | stable rank | condition number | top-3 energy |")
    print("|---|---|---:|---:|---:|")
    for (matrix, name), rows in sorted(stats.items()):
        mean = [sum(column) / len(column) for column in zip(*rows)]
        print(f"| {matrix} | {name} | {mean[0]:.1f} | {mean[1]:.3g} | {mean[2]:.2f} |")

    model, tokenizer, val, cfg = models["Muon"]
    matrices = muon.param_groups(model)[0]["params"]
    original = {name: p.detach().clone() for name, p in matrices}
    edits = [("trained weights", "none", 1.0)] + [(f"top {args.k} x {f:g}", "top", f) for f in (0.5, 2.0)] + [
        (f"tail x {f:g}", "tail", f) for f in (0.5, 1.5, 0.0)] + [("flat (U V^T, same norm)", "flat", 1.0)]
    results = []
    for label, edit, factor in edits:
        for name, p in matrices:
            p.copy_(original[name] if edit == "none" else edited(original[name], edit, args.k, factor))
        loss = train.evaluate(model, val, cfg, torch.device("cpu"))
        results.append((label, loss, greedy(model, tokenizer, args.prompt, args.tokens)))
    for name, p in matrices:
        p.copy_(original[name])

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, style in (("Muon", "-"), ("AdamW", "--")):
        for i, (matrix, curves) in enumerate(sorted(spectra[name].items())):
            mean = sum(curves) / len(curves)
            left.plot(mean, style, color=f"C{i}", label=f"{matrix} ({name})")
    left.set(yscale="log", xlabel="index", ylabel="singular value / largest", title="trained weights' spectra (mean over layers)")
    left.legend(fontsize=6, ncol=2)
    right.barh([label for label, *_ in results][::-1], [loss for _, loss, _ in results][::-1])
    right.set(xlabel="val loss", title="Muon model, every hidden matrix edited")
    fig.tight_layout()
    save(fig, args.out)

    print(f"\ngreedy completions of {args.prompt!r}:")
    for label, _, completion in results:
        print(f"  {label:>24}: {completion!r}")
    print("\n| edit of every hidden matrix | val loss |")
    print("|---|---:|")
    for label, loss, _ in results:
        print(f"| {label} | {loss:.4f} |")
    return {"results": results, "stats": dict(stats)}


if __name__ == "__main__":
    main()
