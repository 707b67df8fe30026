"""The bench scripts' CPU smoke modes end to end: each writes its PNG, prints its table last, and the
numbers hold what they should (exact optimizer-state bytes, MuonClip's clip landing on tau, owner
sharding moving fewer bytes, orthogonalising raising the stable rank)."""

import math
from pathlib import Path

import pytest
import torch

import data.demo
import train
from bench import (communication, memory, muon_vs_adamw, muonclip, optimizer_options, optimizer_step, peer, recipe,
                   singular_values, spectrum, toy_power20, train_throughput)
from config import build_config, gpt_config, read_toml, split_argv, validate
from data.demo import ensure_demo_shards
from tests.test_train import metrics, tiny_config, tiny_data  # noqa: F401


def last_line(capsys) -> str:
    return capsys.readouterr().out.rstrip().splitlines()[-1]


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_muon_vs_adamw_smoke(tmp_path, capsys):
    result = muon_vs_adamw.main(["--smoke", "--out", str(tmp_path / "muon_vs_adamw.png")])
    assert last_line(capsys).startswith("| ours + ")
    assert_png(tmp_path / "muon_vs_adamw.png")
    assert list(result["runs"]) == ["muon", "adamw", "torch_muon", "muon_options"]
    for name, run in result["runs"].items():
        steps, tokens, seconds, losses = zip(*run["val"])
        assert run["cfg"].optim.optimizer == ("adamw" if name == "adamw" else "muon")
        for option, value in muon_vs_adamw.OPTIONS.items():  # on in muon_options only
            assert getattr(run["cfg"].optim, option) == (value if name == "muon_options" else False)
        assert run["cfg"].optim.lr == result["best"][name]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, (name, losses)
        assert list(tokens) == sorted(tokens) and list(seconds) == sorted(seconds)
        assert result["best"][name] == min(result["sweeps"][name], key=lambda r: r[1])[0]
    assert math.isnan(result["ratio"]) or 0 < result["ratio"] <= 1


def test_torch_muon_reference_steps_the_matrices_with_torch_optim_muon():
    from model import GPT
    cfg = muon_vs_adamw.make_config(muon_vs_adamw.SMOKE, "unused", "bytes", "torch_muon", 0.02, 4, False,
                                    muon_vs_adamw.torch.device("cpu"))
    reference = muon_vs_adamw.TorchMuonReference(cfg, GPT(train_gpt_config(cfg)))
    assert isinstance(reference.muon, muon_vs_adamw.torch.optim.Muon)
    assert all(p.ndim == 2 for g in reference.muon.param_groups for p in g["params"])
    assert all(not g["use_muon"] for g in reference.adamw.param_groups)
    assert {g["base_lr"] for g in reference.muon.param_groups} == {0.02}


def train_gpt_config(cfg):
    import train
    return gpt_config(cfg, 257)


def test_memory_smoke_state_bytes_are_exact(tmp_path, capsys):
    rows = {row["optimizer"]: row for row in memory.main(["--smoke", "--out", str(tmp_path / "memory.png")])}
    line = last_line(capsys)
    assert line.startswith("| adamw |") and line.endswith("| n/a (CUDA only) |")
    assert_png(tmp_path / "memory.png")
    muon, normuon, adamw = rows["muon"], rows["muon+normuon"], rows["adamw"]
    assert all(row["state"] == row["expected"] for row in rows.values())
    # The hidden matrices: Muon one fp32 buffer (4 bytes a weight); AdamW two fp32 moments and a step.
    assert adamw["state"] - muon["state"] == 4 * muon["muon_params"] + 4 * muon["muon_tensors"]
    assert 0 < normuon["state"] - muon["state"] < 0.05 * (adamw["state"] - muon["state"])  # a vector per matrix
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


def test_the_demo_presets_run_on_the_demo_model(tmp_path, capsys):
    """The CPU presets the README quotes, cut to two steps: same model, data and settings."""
    result = muonclip.main(["--demo", "--steps", "2", "--reprobe-every", "1", "--out", str(tmp_path / "clip.png")])
    assert_png(tmp_path / "clip.png")
    assert result["tau"] == 30.0 and result["control"]
    assert all(run["cfg"].data.seq_len == 128 for run in result["runs"].values())


def test_spectrum_smoke_orthogonalising_raises_the_stable_rank(tmp_path, capsys):
    result = spectrum.main(["--smoke", "--out", str(tmp_path / "spectrum.png")])
    assert_png(tmp_path / "spectrum.png")
    assert last_line(capsys).startswith("| ")
    assert result["table"]
    for row in result["table"]:
        assert 1 <= row["momentum"] <= row["full"] and 1 <= row["adamw"] <= row["full"]
        assert row["momentum"] < row["update"] <= row["full"], row


def test_communication_owner_sharding_keeps_a_share_of_the_momentum_and_balances_the_work(capsys):
    plans = communication.main(["--preset", "gpt124m-mla", "--world", "8"])
    replicated, one_transfer, per_bucket = plans.values()
    assert last_line(capsys).startswith("| owner-sharded, per bucket, overlapped (now) |")
    shapes, adamw_numel = communication.model_parameters("gpt124m-mla")
    fp32_each_way = 2 * 7 / 8 * 4 * sum(a * b for a, b in shapes)  # the least a reduce-scatter + all-gather of fp32
    for plan in (one_transfer, per_bucket):
        assert plan["adamw"] == replicated["adamw"]  # DDP still all-reduces the AdamW gradients
        assert plan["momentum"] < replicated["momentum"] / 8 * 1.2  # about 1/8 of it, the largest share
        assert sum(plan["flops"]) == sum(replicated["flops"]) and max(plan["flops"]) <= max(replicated["flops"])
    assert one_transfer["sent"] < per_bucket["sent"] < replicated["sent"]
    assert fp32_each_way <= per_bucket["sent"] - per_bucket["adamw"] < 1.2 * fp32_each_way  # padding under 20%
    one = communication.owner_plan(*communication.model_parameters("tiny-mla"), world=1, steps=5, per_bucket=True)
    assert one["sent"] == 0  # one rank sends nothing


def test_peer_fp32_newton_schulz_is_torch_optim_muons_in_fp32():
    from torch.optim import _muon
    grad = torch.randn(96, 48, generator=torch.Generator().manual_seed(0))
    coefficients = (_muon.DEFAULT_A, _muon.DEFAULT_B, _muon.DEFAULT_C)
    ours = peer.fp32_newton_schulz(grad, coefficients, 5, 1e-7)
    theirs = _muon._zeropower_via_newtonschulz(grad, coefficients, 5, 1e-7).float()  # bf16 inside
    assert ours.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0) > 0.999
    with pytest.raises(ValueError, match="classic coefficients"):
        peer.fp32_newton_schulz(grad, (1.0, 2.0, 3.0), 5, 1e-7)


def test_peer_trains(tmp_path, capsys):
    data_dir = ensure_demo_shards(tmp_path / "demo")
    curve = peer.main(["--steps", "4", "--eval-every", "4", "--data-dir", str(data_dir)])
    assert [step for step, _ in curve] == [0, 4]
    assert curve[-1][1] < curve[0][1] - 0.5, curve
    assert last_line(capsys).startswith("peer: lr 0.008, 4 steps, final val loss")


def test_train_throughput_times_the_demo_step_in_each_probe_mode(capsys):
    results = train_throughput.main(["--config", str(Path(__file__).resolve().parent.parent / "configs/demo.toml"), "--steps", "1", "--warmup", "0",
                                     "--train.micro_batch_size=4", "--train.batch_tokens=1024",
                                     f"--data.dir={data.demo.DEFAULT_DIR}"])
    assert [label for label, *_ in results] == ["probe off", "probe on", "probe + MuonClip"]
    assert all(ms > 0 and tokens_per_s > 0 for _, ms, tokens_per_s, _ in results)
    assert last_line(capsys).startswith("probe + MuonClip")


def test_singular_values_edits_every_matrix_and_flattening_is_orthogonalising(tiny_data, tmp_path, capsys):  # noqa: F811
    for name, optimizer in (("muon", "muon"), ("adamw", "adamw")):
        train.main(["--config", tiny_config(tmp_path, tiny_data, name), "--optim.optimizer", optimizer])
    result = singular_values.main(["--muon", str(tmp_path / "muon" / "ckpt_000006.pt"), "--adamw",
                                   str(tmp_path / "adamw" / "ckpt_000006.pt"), "--k", "2", "--tokens", "4",
                                   "--out", str(tmp_path / "sv.png")])
    assert_png(tmp_path / "sv.png")
    losses = {label: loss for label, loss, _ in result["results"]}
    assert losses["trained weights"] == pytest.approx(train_losses_at_end(tmp_path / "muon"), rel=1e-6)
    assert all(math.isfinite(loss) for loss in losses.values()) and len(losses) == 7
    assert {name for _, name in result["stats"]} == {"Muon", "AdamW"}
    assert last_line(capsys).startswith("| flat (U V^T, same norm) | ")
    # The flat edit is the polar factor: every singular value equal, the Frobenius norm kept.
    weight = torch.randn(6, 10, dtype=torch.float64)
    flat = singular_values.edited(weight, "flat", 2, 1.0)
    s = torch.linalg.svdvals(flat)
    assert torch.allclose(s, s[0].expand_as(s)) and torch.isclose(flat.norm(), weight.norm())


def train_losses_at_end(run_dir) -> float:
    """The run's last val loss: the trained weights' val loss, on the same val tokens."""
    return [row["val/loss"] for row in metrics(run_dir) if "val/loss" in row][-1]


def test_optimizer_step_times_each_option(capsys):
    result = optimizer_step.main(["--layers", "1", "--d", "48", "--vocab", "64", "--heads", "4", "--warmup", "1",
                                  "--iters", "2", "--ns-dtype", "float32", "--options"])
    assert [what for what, _ in result["options"]] == ["none", "normuon", "cautious weight decay", "per-head blocks",
                                                       "all three"]
    assert last_line(capsys).startswith("| all three |")


def test_optimizer_options_runs_each_variant_and_tables_them(tmp_path, capsys):
    """Two variants, one seed, four steps each, through train.py as the demo runs them."""
    rows = optimizer_options.main([
        "--variants", "muon", "all", "--seeds", "0", "--root", str(tmp_path / "runs"), "--steps", "4",
        "--out", str(tmp_path / "options.png"), "--extra", f"--data.dir={tmp_path / 'demo'}", "--schedule.steps=4",
        "--log.every=2", "--train.checkpoint_every=0", "--log.sample_every=0", "--log.heatmap_every=0",
        "--schedule.momentum_warmup_steps=2"])
    assert [r["name"] for r in rows] == ["muon", "all"] and all(r["mean"] is not None for r in rows)
    assert rows[0]["mean"] != rows[1]["mean"]  # the options changed the run
    assert "| all | --optim.normuon" in capsys.readouterr().out
    assert_png(tmp_path / "options.png")


def test_every_recipe_variant_is_a_train_py_command_line_that_validates():
    """bench.recipe's variants are overrides of configs/demo.toml, as its runs pass them to train.py."""
    for name, overrides in recipe.VARIANTS.items():
        flags, pairs = split_argv(overrides)
        assert not flags, name
        validate(build_config(read_toml("configs/demo.toml"), f"bench.recipe {name}", pairs), world_size=1, vocab_size=257)
