"""The README's code, run as a user would run it: the `muon.py on its own` snippet, as written, on a
tiny attention model of the kind the README describes (not our GPT)."""

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

import muon

README = Path(__file__).resolve().parent.parent / "README.md"


def snippet(section: str) -> str:
    """The first python code block after the README heading `section`."""
    text = README.read_text()
    after = text[text.index(section):]
    return re.search(r"```python\n(.*?)```", after, flags=re.S).group(1)


class Attention(torch.nn.Module):
    """Plain causal multi-head attention with the layout the README asks for: q and k rows by head
    in wq and wk, and the forward keeps muon.max_logits(q, k)."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.wq, self.wk, self.wv, self.wo = (torch.nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = (w(x).view(B, T, self.n_heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        self.max_logits = muon.max_logits(q, k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.wo(y.transpose(1, 2).reshape(B, T, d))


class TinyModel(torch.nn.Module):
    def __init__(self, vocab=50, d=32, n_heads=4, n_layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(Attention(d, n_heads) for _ in range(n_layers))
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return F.cross_entropy(self.lm_head(x)[:, :-1].flatten(0, 1), idx[:, 1:].flatten())


def test_the_muon_snippet_runs_as_written_and_clips_the_heads_past_tau():
    torch.manual_seed(0)
    model = TinyModel()
    with torch.no_grad():  # the first layer's first two heads with logits past the snippet's tau of 100
        model.layers[0].wq.weight[:16] *= 40
        model.layers[0].wk.weight[:16] *= 40
    batch = torch.randint(0, 50, (4, 16))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    *lines, clip_line = snippet("## `muon.py` on its own").strip().splitlines()
    assert clip_line.startswith("clipped = muon.qk_clip_(")
    namespace = {"model": model, "batch": batch}
    exec("\n".join(lines), namespace)  # the snippet up to MuonClip: a step of Muon and AdamW
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())  # every tensor stepped
    with torch.no_grad():
        model(batch)
    stepped = torch.stack([layer.max_logits for layer in model.layers])
    exec(clip_line, namespace)

    measured, clipped = namespace["max_logits"], namespace["clipped"]  # measured in the step's forward
    assert measured.shape == (2, 4)
    over = measured > 100.0
    assert over[0, :2].all() and not over[1].any()  # as set up: only those two heads
    assert clipped.item() == over.sum().item()
    # MuonClip after the step, as Kimi K2 runs it: a clipped head's logits scale by tau / S, S being
    # its max logit in the step's forward; the other heads are untouched.
    with torch.no_grad():
        model(batch)
    after = torch.stack([layer.max_logits for layer in model.layers])
    gamma = torch.where(over, 100.0 / measured, 1.0)
    torch.testing.assert_close(after[0], stepped[0] * gamma[0], rtol=1e-5, atol=0)
    # ...and max_logits is the formula: softmax_scale q.k over the causal pairs, head by head
    x = model.embed(batch)
    layer = model.layers[0]
    q = (x @ layer.wq.weight.T).view(4, 16, 4, 8)
    k = (x @ layer.wk.weight.T).view(4, 16, 4, 8)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(8)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    torch.testing.assert_close(after[0], scores.masked_fill(~causal, -math.inf).amax(dim=(0, 2, 3)).detach())
