"""Talk to a trained model: complete prompts from a checkpoint.

    python sample.py --ckpt runs/demo/ckpt_000600.pt --prompt "The capital of France is"
    python sample.py --ckpt runs/demo/ckpt_000600.pt --prompt "def " --num-samples 3 --temperature 0.9
    python sample.py --ckpt runs/gpu/ckpt_003200.pt --prompt-file prompts.txt --greedy --max-new-tokens 100

The model, its tokenizer (bytes or GPT-2; --tokenizer-file for GPT-2's rank file offline) and
bf16 on a GPU come from the config saved in the checkpoint. Generation is GPT.generate with the
latent-only KV cache; past the model's context (model.block_size) it keeps the last block_size
tokens. Every problem (a missing, truncated or foreign checkpoint, a prompt longer
than the model's context, a bad option) is one line on stderr and exit code 1.
"""

import argparse
import sys
from pathlib import Path

import torch

from checkpoint import read_checkpoint
from config import ConfigError, build_config, gpt_config
from data.tokenizer import TokenizerDownloadError, get_tokenizer
from model import GPT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a ckpt_NNNNNN.pt that train.py wrote")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt; may be given several times")
    prompts.add_argument("--prompt-file", help="a text file, one prompt a line (blank lines skipped)")
    parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = all (default 50)")
    parser.add_argument("--greedy", action="store_true", help="always take the likeliest token (then one sample a prompt)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--device", default="auto", help='"auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:1", ...')
    parser.add_argument("--tokenizer-file", default="", help="GPT-2's r50k_base.tiktoken, for a GPT-2 model offline")
    return parser


def load_model(path: Path, device: torch.device, tokenizer_file: str = ""):
    """(model in eval mode on device, tokenizer, the checkpoint's Config) from a train.py checkpoint."""
    checkpoint = read_checkpoint(path, flag="--ckpt")
    cfg = build_config(checkpoint["config"], f"{path} (its saved config)", [])
    try:
        tokenizer = get_tokenizer(cfg.data.tokenizer, tokenizer_file or cfg.data.tokenizer_file or None)
    except (ValueError, OSError, RuntimeError) as e:
        hint = "; pass GPT-2's rank file with --tokenizer-file r50k_base.tiktoken" if isinstance(e, TokenizerDownloadError) else ""
        raise ConfigError(f"the checkpoint's tokenizer {cfg.data.tokenizer!r}: {e}{hint}") from None
    model = GPT(gpt_config(cfg, tokenizer.n_vocab))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise ConfigError(f"--ckpt {path}: its weights do not fit its own config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), tokenizer, cfg


def read_prompts(args) -> list[str]:
    if args.prompt:
        return args.prompt
    try:
        lines = Path(args.prompt_file).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"--prompt-file {args.prompt_file}: {e.strerror or e}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompt-file {args.prompt_file}: no prompt in it (one a line)")
    return prompts


def complete(model: GPT, tokenizer, prompt: str, greedy: list[bool], max_new_tokens: int, temperature: float,
             top_k: int, bf16: bool) -> list[str]:
    """One completion of prompt per entry of greedy (the argmax where True, else sampled at temperature
    from the top_k tokens, 0 for all), decoded as one batch; used by train.py too."""
    tokens = tokenizer.encode_ordinary(prompt)
    context = model.config.block_size
    if not tokens:
        raise ConfigError("an empty prompt: give at least one character")
    if len(tokens) > context:  # beyond it generate() would silently drop the prompt's start
        raise ConfigError(f"the prompt {prompt[:20]!r}... is {len(tokens)} tokens, longer than the model's "
                          f"context of {context} tokens (model.block_size); shorten it")
    device = model.lm_head.weight.device
    idx = torch.tensor(tokens, dtype=torch.long, device=device).expand(len(greedy), -1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                             greedy=torch.tensor(greedy, device=device))
    return [tokenizer.decode(row[len(tokens):].tolist()) for row in out]


def check_options(args) -> None:
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    if args.top_k < 0:
        raise ConfigError(f"--top-k {args.top_k}: expected 0 (all tokens) or a positive integer")
    if not args.greedy and not args.temperature > 0:
        raise ConfigError(f"--temperature {args.temperature}: expected > 0 (or --greedy)")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def main(argv: list[str]) -> list[tuple[str, list[str]]]:
    """Print and return (prompt, completions) for every prompt."""
    args = build_parser().parse_args(argv)
    check_options(args)
    device = pick_device(args.device)
    model, tokenizer, cfg = load_model(Path(args.ckpt), device, args.tokenizer_file)
    torch.manual_seed(args.seed)
    results = []
    for prompt in read_prompts(args):
        completions = complete(model, tokenizer, prompt, [args.greedy] * (1 if args.greedy else args.num_samples),
                               args.max_new_tokens, args.temperature, args.top_k, cfg.train.bf16 and device.type == "cuda")
        results.append((prompt, completions))
        for completion in completions:
            print(f"{prompt}{completion}\n---", flush=True)
    return results


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
