"""sample.py: a checkpoint's completions are GPT.generate's on the same weights, greedy is
deterministic, and every bad input is one line that names it."""

import dataclasses
import subprocess
import sys

import pytest
import torch

import checkpoint as checkpoint_module
import sample
from config import ConfigError, build_config, gpt_config
from data.tokenizer import get_tokenizer
from model import GPT
from tests.test_train import REPO, tiny_config, tiny_data  # noqa: F401
import train


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("sample")
    train.main(["--config", tiny_config(tmp, tiny_data)])
    return tmp / "run" / "ckpt_000006.pt"


def generate_directly(path, prompt, rows, max_new_tokens, seed, **kwargs):
    """What sample.py should print, from GPT.generate on the checkpoint's weights."""
    ckpt = torch.load(path, weights_only=True)
    cfg = build_config(ckpt["config"], "test", [])
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    model = GPT(gpt_config(cfg, tokenizer.n_vocab))
    model.load_state_dict(ckpt["model"])
    idx = torch.tensor(tokenizer.encode_ordinary(prompt)).expand(rows, -1)
    torch.manual_seed(seed)
    out = model.eval().generate(idx, max_new_tokens, **kwargs)
    return [tokenizer.decode(row[idx.size(1):].tolist()) for row in out]


def test_sampled_completions_are_generate_on_the_checkpoints_weights(checkpoint, capsys):
    got = sample.main(["--ckpt", str(checkpoint), "--prompt", "the cat", "--num-samples", "3",
                       "--max-new-tokens", "12", "--temperature", "1.3", "--top-k", "5", "--seed", "7"])
    expected = generate_directly(checkpoint, "the cat", 3, 12, 7, temperature=1.3, top_k=5)
    assert got == [("the cat", expected)]
    assert len(set(expected)) > 1  # three samples, not one repeated
    assert "the cat" + expected[0] in capsys.readouterr().out


def test_greedy_is_deterministic_and_is_generates_argmax(checkpoint):
    args = ["--ckpt", str(checkpoint), "--prompt", "the dog", "--prompt", "a mat", "--greedy", "--max-new-tokens", "20"]
    first, again = sample.main(args + ["--seed", "1"]), sample.main(args + ["--seed", "2"])
    assert first == again
    assert first[0] == ("the dog", generate_directly(checkpoint, "the dog", 1, 20, 0, greedy=True))


def test_a_prompt_file_gives_one_prompt_a_line(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n\nthe dog\n")
    got = sample.main(["--ckpt", str(checkpoint), "--prompt-file", str(prompts), "--greedy", "--max-new-tokens", "4"])
    assert [prompt for prompt, _ in got] == ["the cat", "the dog"]


@pytest.mark.parametrize("make, message", [
    (lambda p, tmp: tmp / "nowhere.pt", r"--ckpt .*nowhere.pt: no such checkpoint file"),
    (lambda p, tmp: truncated(p, tmp), r"--ckpt .*cut.pt: not a readable checkpoint"),
    (lambda p, tmp: foreign(tmp), r"--ckpt .*weights.pt: a torch file, but not one of train.py's checkpoints"),
])
def test_a_bad_checkpoint_is_one_line_naming_it(checkpoint, tmp_path, make, message):
    with pytest.raises(ConfigError, match=message):
        sample.main(["--ckpt", str(make(checkpoint, tmp_path)), "--prompt", "the"])


def truncated(path, tmp):
    cut = tmp / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return cut


def foreign(tmp):
    torch.save({"weight": torch.ones(2)}, tmp / "weights.pt")
    return tmp / "weights.pt"


def test_a_checkpoint_from_before_the_model_options_loads_as_the_model_it_holds(checkpoint, tmp_path):
    """A saved config without model.embed_norm, value_embeds, ... was written when they did not
    exist: the checkpoint holds the model without them, and that is the model sample.py builds."""
    old = torch.load(checkpoint, weights_only=True)
    for key in checkpoint_module.MODEL_KEYS_ADDED:
        del old["config"]["model"][key]
    cfg = build_config(old["config"], "test", [])
    plain = dataclasses.replace(gpt_config(cfg, 257), **checkpoint_module.MODEL_KEYS_ADDED)
    torch.manual_seed(0)
    old["model"] = GPT(plain).state_dict()
    torch.save(old, tmp_path / "old.pt")
    model, _, loaded = sample.load_model(tmp_path / "old.pt", torch.device("cpu"))
    assert model.config == plain and not loaded.model.value_embeds and loaded.model.init == "speedrun"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in old["model"].items())


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "x" * 40], r"the prompt .xxx.* is 40 tokens, longer than the model.s context of 32 tokens"),
    (["--prompt", "the", "--temperature", "0"], r"--temperature 0.0: expected > 0 \(or --greedy\)"),
    (["--prompt", "the", "--num-samples", "0"], r"--num-samples 0: expected a positive integer"),
    (["--prompt-file", "/nonexistent/prompts.txt"], r"--prompt-file /nonexistent/prompts.txt: No such file"),
])
def test_bad_prompts_and_options_are_named(checkpoint, argv, message):
    with pytest.raises(ConfigError, match=message):
        sample.main(["--ckpt", str(checkpoint)] + argv)


def test_the_script_prints_errors_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "none.pt"), "--prompt", "a"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: --ckpt ")
