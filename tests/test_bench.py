"""The bench scripts' CPU smoke modes end to end: each writes its PNG, prints its table last, and the
numbers hold what they should (exact optimizer-state bytes, MuonClip's clip landing on tau)."""

import math

import pytest

from bench import memory, muon_vs_adamw, muonclip, toy_power20


def last_line(capsys) -> str:
    return capsys.readouterr().out.rstrip().splitlines()[-1]


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_muon_vs_adamw_smoke(tmp_path, capsys):
    result = muon_vs_adamw.main(["--smoke", "--out", str(tmp_path / "muon_vs_adamw.png")])
    assert last_line(capsys).startswith("| Muon / AdamW tokens |")
    assert_png(tmp_path / "muon_vs_adamw.png")
    for name, run in result["runs"].items():
        steps, tokens, seconds, losses = zip(*run["val"])
        assert run["cfg"].optim.optimizer == name and run["cfg"].optim.lr == result["best"][name]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, (name, losses)
        assert list(tokens) == sorted(tokens) and list(seconds) == sorted(seconds)
        assert result["best"][name] == min(result["sweeps"][name], key=lambda r: r[1])[0]
    assert math.isnan(result["ratio"]) or 0 < result["ratio"] <= 1


def test_memory_smoke_state_bytes_are_exact(tmp_path, capsys):
    rows = {row["optimizer"]: row for row in memory.main(["--smoke", "--out", str(tmp_path / "memory.png")])}
    line = last_line(capsys)
    assert line.startswith("| adamw |") and line.endswith("| n/a (CUDA only) |")
    assert_png(tmp_path / "memory.png")
    muon, adamw = rows["muon"], rows["adamw"]
    assert muon["state"] == muon["expected"] and adamw["state"] == adamw["expected"]
    # The hidden matrices: Muon one fp32 buffer (4 bytes a weight); AdamW two fp32 moments and a step.
    assert adamw["state"] - muon["state"] == 4 * muon["muon_params"] + 4 * muon["muon_tensors"]
    assert muon["peak"] is None and adamw["peak"] is None


def test_muonclip_smoke(tmp_path, capsys):
    result = muonclip.main(["--smoke", "--out", str(tmp_path / "muonclip.png")])
    assert last_line(capsys).startswith("| control: the clip alone")
    assert_png(tmp_path / "muonclip.png")
    free, clipped = result["runs"].values()
    tau = result["tau"]
    assert max(free["max_logit"]) > 3 * tau  # the high lr does grow the logits ...
    assert max(clipped["max_logit"]) < max(free["max_logit"]) / 2  # ... and the clip holds them down
    assert sum(clipped["clipped_heads"]) > 0 and not free["clipped_heads"]
    # With the step moving nothing, the clip puts the batch's max logit on tau exactly (fp32).
    control_tau = result["control_tau"]
    (_, reprobed), = result["control"]["reprobed"]
    assert reprobed == pytest.approx(control_tau, rel=1e-3)
    assert reprobed <= control_tau * (1 + 1e-3)


def test_toy_power20_plot(tmp_path, capsys):
    toy_power20.main(["--out", str(tmp_path / "toy.png")])
    assert last_line(capsys).startswith("| orthogonalised | 0.2 |")
    assert_png(tmp_path / "toy.png")
