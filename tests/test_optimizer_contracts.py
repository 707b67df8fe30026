"""muon.Muon keeps the contracts every torch optimizer keeps (the ones PyTorch's own generic optimizer
tests check for each torch.optim class), in every configuration a user can pick. torch.optim.Muon
runs through the same bodies as a control, where the contract is one it offers too.

The model is the one those contracts are usually stated on: loss = |W x + b|^2 for a (10, 5)
weight and a (10,) bias. Muon takes matrices only, so in the Muon-only configurations the bias
is left out (as torch's own tests do for torch.optim.Muon); the hybrid layout, the one train.py
trains with, puts the bias in an AdamW group beside the Muon group.
"""

import copy
import io
import pickle

import pytest
import torch
from torch import Tensor
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import muon

CONFIGS = {
    "default": {},
    "nesterov off": dict(nesterov=False),
    "original lr rule": dict(lr_rule="original"),
    "normuon rows": dict(normuon=True),
    "normuon larger": dict(normuon=True, normuon_axis="larger"),
    "cautious weight decay": dict(cautious_weight_decay=True),
    "per-head blocks": dict(blocks=True),
    "compile": dict(compile=True),
    "hybrid": dict(hybrid=True, normuon=True),
    "torch.optim.Muon": dict(torch_muon=True),
}
OURS = [name for name in CONFIGS if name != "torch.optim.Muon"]


def make_optimizer(config: str, weight: Tensor, bias: Tensor | None = None, names: bool = False, **settings):
    """The configuration's optimizer for weight (and, in the hybrid layout, bias); settings override its defaults."""
    options = dict(CONFIGS[config])
    pair = (lambda name, p: (name, p)) if names else (lambda name, p: p)
    if options.pop("torch_muon", False):
        settings.pop("lr_rule", None)
        return torch.optim.Muon([pair("weight", weight)], **settings)
    hybrid = options.pop("hybrid", False)
    matrices = dict(params=[pair("weight", weight)])
    if options.pop("blocks", False):
        matrices["blocks"] = [(2, 1) if weight.size(0) % 2 == 0 else (1, 1)]  # two heads' rows
    groups = [matrices]
    if hybrid and bias is not None:
        groups.append(dict(params=[pair("bias", bias)], use_muon=False, lr=3e-3))
    return muon.Muon(groups, **{**options, **settings})


def weight_and_bias(contiguous: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        return Parameter(torch.randn(10, 5, generator=g)), Parameter(torch.randn(10, generator=g))
    return Parameter(torch.randn(10, 5, 2, generator=g)[..., 0]), Parameter(torch.randn(10, 2, generator=g)[..., 0])


def uses_bias(config: str) -> bool:
    return "hybrid" in CONFIGS[config]


def loss_of(weight, bias, x, config):
    y = weight.mv(x) + (bias if uses_bias(config) else 0)
    return y.pow(2).sum()


def closure_for(optimizer, weight, bias, x, config):
    def closure():
        optimizer.zero_grad()
        loss = loss_of(weight, bias, x, config)
        loss.backward()
        return loss
    return closure


def trained(config, steps=3, seed=0, **settings):
    """An optimizer and its parameters after `steps` steps on the model, so that it has state."""
    weight, bias = weight_and_bias(seed=seed)
    optimizer = make_optimizer(config, weight, bias, **settings)
    closure = closure_for(optimizer, weight, bias, torch.randn(5, generator=torch.Generator().manual_seed(seed)), config)
    for _ in range(steps):
        optimizer.step(closure)
    return optimizer, weight, bias, closure


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test's compiled steps start from no graphs: the tests' many shapes would otherwise
    run into dynamo's per-function cache limit and fall back to eager."""
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# Errors


def test_bad_arguments_are_refused_with_the_setting_named():
    W = Parameter(torch.randn(4, 4))
    cases = [
        (dict(lr=-1.0), ValueError, "lr=-1.0"),
        (dict(lr=float("nan")), ValueError, "lr=nan"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, r"lr has shape \(2,\): a tensor lr must have one element"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay=-0.1"),
        (dict(momentum=1.0), ValueError, "momentum=1.0"),
        (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]=1.0"),
        (dict(eps=-1e-8), ValueError, "eps=-1e-08"),
        (dict(normuon_beta2=1.5), ValueError, "normuon_beta2=1.5"),
        (dict(normuon_axis="cols"), ValueError, "normuon_axis='cols'"),
        (dict(lr_rule="rms"), ValueError, "lr_rule='rms'"),
        (dict(ns_coefficients="cubic"), ValueError, "ns_coefficients='cubic'"),
        (dict(ns_steps=6, ns_coefficients="polar_express"), ValueError, "ns_steps=6"),
    ]
    for settings, error, message in cases:
        with pytest.raises(error, match=message):
            muon.Muon([W], **settings)
    with pytest.raises(ValueError, match=r"lr has shape \(2,\)"):  # a group's own lr too
        muon.Muon([dict(params=[W], lr=torch.tensor([1e-3, 1e-3]))])


def test_bad_parameter_lists_are_refused_as_torch_optimizers_refuse_them():
    W, V = Parameter(torch.randn(1, 1)), Parameter(torch.randn(1, 1))
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        muon.Muon(W)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        muon.Muon([W, W])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        muon.Muon([dict(params=[W]), dict(params=[W])])
    with pytest.raises(ValueError, match="all optimizer params should be with/without names"):
        muon.Muon([("weight", W), V])
    with pytest.raises(ValueError, match="Muon takes 2-D matrices only"):
        muon.Muon([Parameter(torch.randn(2, 3, 4))])


def test_complex_parameters_are_refused_by_name():
    complex_weight = Parameter(torch.randn(4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"parameter w is complex \(torch.complex64\).*view_as_real"):
        muon.Muon([("w", complex_weight)])
    with pytest.raises(ValueError, match="parameter #0 is complex"):  # AdamW groups too: their maths is for reals
        muon.Muon([dict(params=[Parameter(torch.randn(4, dtype=torch.complex64))], use_muon=False)])


def test_a_sparse_gradient_is_refused_at_the_step():
    W = Parameter(torch.randn(3, 3))
    optimizer = muon.Muon([W])
    W.grad = torch.eye(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        optimizer.step()


# ----------------------------------------------------------------------------------------------
# The loss goes down: plain, non-contiguous, with lr schedulers, with groups of their own


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non-contiguous"])
@pytest.mark.parametrize("scheduler", [None, "step", "plateau"])
def test_steps_go_the_right_direction(config, contiguous, scheduler):
    weight, bias = weight_and_bias(contiguous)
    x = torch.randn(5, generator=torch.Generator().manual_seed(1))
    optimizer = make_optimizer(config, weight, bias, lr=0.01)
    schedule = {None: None, "step": lambda o: StepLR(o, gamma=0.9, step_size=10),
                "plateau": ReduceLROnPlateau}[scheduler]
    schedule = schedule(optimizer) if schedule else None
    closure = closure_for(optimizer, weight, bias, x, config)
    initial = closure().item()
    for _ in range(20):
        loss = optimizer.step(closure)
        if isinstance(schedule, ReduceLROnPlateau):
            schedule.step(loss)
        elif schedule:
            schedule.step()
    assert closure().item() < initial


@pytest.mark.parametrize("config", CONFIGS)
def test_two_groups_with_their_own_lr_and_a_scheduler_go_the_right_direction(config):
    if config == "torch.optim.Muon":
        pytest.skip("make_optimizer builds one group for torch.optim.Muon")
    weight, other = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10, 5))
    x = torch.randn(5)
    optimizer = make_optimizer(config, weight)
    optimizer.add_param_group(dict(params=[other], lr=0.01))
    scheduler = StepLR(optimizer, gamma=0.9, step_size=5)

    def closure():
        optimizer.zero_grad()
        loss = (weight.mv(x) + other.mv(x)).pow(2).sum()
        loss.backward()
        return loss
    initial = closure().item()
    for _ in range(20):
        optimizer.step(closure)
        scheduler.step()
    assert closure().item() < initial


@pytest.mark.parametrize("config", CONFIGS)
def test_param_group_weight_decay_and_lr_are_each_groups_own(config):
    if config == "torch.optim.Muon":
        pytest.skip("make_optimizer builds one group for torch.optim.Muon")
    weight, bias = weight_and_bias()
    frozen = Parameter(torch.randn(2, 3))  # a group with lr ~0 and no decay: it must not move
    before = frozen.detach().clone()
    optimizer = make_optimizer(config, weight, bias, lr=1e-28, weight_decay=0.1)
    optimizer.param_groups[0].update(lr=0.01, weight_decay=0.0)
    optimizer.add_param_group(dict(params=[frozen]))
    closure = closure_for(optimizer, weight, bias, torch.randn(5), config)
    initial = closure().item()
    for _ in range(20):
        optimizer.step(closure)
        frozen.grad = torch.rand_like(frozen)
    assert closure().item() < initial
    assert torch.equal(frozen.detach(), before)


# ----------------------------------------------------------------------------------------------
# Tensor learning rates


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-dim", "1-element", "1x1"])
def test_a_one_element_tensor_lr_steps_as_the_number_does(config, shape):
    results = []
    for lr in (1e-3, torch.tensor(1e-3).reshape(shape)):
        optimizer, weight, bias, _ = trained(config, steps=5, lr=lr, weight_decay=0.1)
        results.append((weight.detach(), bias.detach()))
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("config", OURS)
def test_a_tensor_lr_changed_in_place_is_what_the_next_step_uses(config):
    """A scheduler that writes into a tensor lr (fill_) changes the step without a new graph."""
    lr = torch.tensor(1e-3)
    optimizer, weight, _, closure = trained(config, steps=1, lr=lr)
    reference, ref_weight, _, ref_closure = trained(config, steps=1, lr=1e-3)
    lr.fill_(5e-3)
    reference.param_groups[0]["lr"] = 5e-3
    optimizer.step(closure)
    reference.step(ref_closure)
    torch.testing.assert_close(weight.detach(), ref_weight.detach(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Steps that change nothing


@pytest.mark.parametrize("config", CONFIGS)
def test_a_step_without_gradients_changes_nothing(config):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    before = [p.detach().clone() for p in params]
    optimizer = make_optimizer(config, params[0], weight_decay=0.1)
    assert optimizer.step(lambda: torch.tensor(1.0)).item() == 1.0  # the closure's loss comes back
    assert torch.equal(params[0].detach(), before[0])
    assert len(optimizer.state) == 0


@pytest.mark.parametrize("config", CONFIGS)
def test_a_step_on_zero_gradients_without_decay_changes_nothing(config):
    weight, bias = weight_and_bias()
    before = weight.detach().clone(), bias.detach().clone()
    optimizer = make_optimizer(config, weight, bias, weight_decay=0.0)
    weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
    optimizer.step()
    assert torch.equal(weight.detach(), before[0]) and torch.equal(bias.detach(), before[1])


@pytest.mark.parametrize("config", CONFIGS)
def test_every_parameter_stepped_has_state(config):
    optimizer, *_ = trained(config, steps=1)
    assert optimizer.state and all(len(state) > 0 for state in optimizer.state.values())


# ----------------------------------------------------------------------------------------------
# State dicts


def assert_identical(a, b, where="state dict"):
    """Equal values, tensors bit for bit with the same dtype, through nested dicts, lists and tuples."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def without_names(state_dict):
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("named", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["unnamed", "named-to-unnamed", "unnamed-to-named", "named"])
def test_a_loaded_state_dict_continues_exactly_and_reads_back_the_same(config, named):
    weight, bias = weight_and_bias()
    x = torch.randn(5)
    optimizer = make_optimizer(config, weight, bias, names=named[0], weight_decay=0.1)
    closure = closure_for(optimizer, weight, bias, x, config)
    for _ in range(10):
        optimizer.step(closure)
    weight_c, bias_c = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
    optimizer_c = make_optimizer(config, weight_c, bias_c, names=named[1], weight_decay=0.1)
    optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    closure_c = closure_for(optimizer_c, weight_c, bias_c, x, config)
    for _ in range(10):
        optimizer.step(closure)
        optimizer_c.step(closure_c)
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    assert_identical(without_names(optimizer_c.state_dict()), without_names(optimizer.state_dict()))
    optimizer_c.param_groups.extend(optimizer_c.param_groups)  # a repeated group reads back the same
    assert without_names(optimizer_c.state_dict())["param_groups"][-1] == \
        without_names(optimizer.state_dict())["param_groups"][-1]
    if any(named):
        assert optimizer_c.state_dict()["param_groups"][0]["param_names"] == ["weight"]


# The group keys each option added after the first release of muon.Muon's state dicts.
LATER_KEYS = ("normuon", "normuon_beta2", "normuon_eps", "normuon_axis", "cautious_weight_decay")


@pytest.mark.parametrize("config", OURS)
def test_a_state_dict_from_before_an_option_existed_loads_with_the_options_defaults(config):
    """Its groups lack the later options' keys: they get the optimizer's defaults, and the next
    step is the one the whole state dict gives."""
    optimizer, weight, bias, _ = trained(config)
    whole = copy.deepcopy(optimizer.state_dict())
    older = copy.deepcopy(whole)
    for group in older["param_groups"]:
        for key in LATER_KEYS:
            group.pop(key)
    results = []
    for saved in (whole, older):
        w, b = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
        loaded = make_optimizer(config, w, b)
        loaded.load_state_dict(saved)
        assert all(group[key] == loaded.defaults[key] for group in loaded.param_groups for key in LATER_KEYS)
        loaded.step(closure_for(loaded, w, b, torch.ones(5), config))
        results.append((w.detach(), b.detach()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dicts_round_trip_through_torch_save_and_weights_only_load(config):
    optimizer, *_ = trained(config)
    state_dict = optimizer.state_dict()
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    for weights_only in (False, True):
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=weights_only)
        assert_identical(loaded, state_dict)


def test_an_adamw_step_saved_as_a_number_loads_and_steps_as_the_tensor_does():
    optimizer, weight, bias, closure = trained("hybrid")
    state_dict = copy.deepcopy(optimizer.state_dict())
    numbers = copy.deepcopy(state_dict)
    for state in numbers["state"].values():
        if "step" in state:
            state["step"] = state["step"].item()
    results = []
    for saved in (state_dict, numbers):
        w, b = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
        loaded = make_optimizer("hybrid", w, b)
        loaded.load_state_dict(saved)
        loaded.step(closure_for(loaded, w, b, torch.ones(5), "hybrid"))
        assert all(torch.is_tensor(s["step"]) for s in loaded.state.values() if "step" in s)
        results.append((w.detach(), b.detach()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ----------------------------------------------------------------------------------------------
# Copies, printing, hooks, closures


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_keeps_every_public_attribute_and_steps_as_the_original(config, how):
    optimizer, weight, bias, _ = trained(config)
    copied = copy.deepcopy(optimizer) if how == "deepcopy" else pickle.loads(pickle.dumps(optimizer))
    public = {k for k in vars(optimizer) if not k.startswith("_")}
    assert {k for k in vars(copied) if not k.startswith("_")} == public
    if config == "torch.optim.Muon":
        return
    assert (copied.compile, copied.distributed) == (optimizer.compile, optimizer.distributed)
    copied_weight = copied.param_groups[0]["params"][0]
    copied_bias = copied.param_groups[1]["params"][0] if uses_bias(config) else bias
    x = torch.randn(5)
    optimizer.step(closure_for(optimizer, weight, bias, x, config))
    copied.step(closure_for(copied, copied_weight, copied_bias, x, config))
    torch.testing.assert_close(copied_weight.detach(), weight.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("config", CONFIGS)
def test_an_optimizer_prints(config):
    weight, bias = weight_and_bias()
    text = repr(make_optimizer(config, weight, bias))
    assert "Parameter Group 0" in text and "lr: 0.001" in text


def test_state_dict_hooks_run_before_and_after():
    optimizer, *_ = trained("hybrid")

    def pre(opt):
        opt.state["marker"] = 1

    def post(opt, state_dict):
        state_dict["ran_pre"] = state_dict["state"].pop("marker", None) == 1
        return state_dict
    optimizer.register_state_dict_pre_hook(pre)
    assert optimizer.state_dict()["state"]["marker"] == 1
    optimizer.register_state_dict_post_hook(post)
    state_dict = optimizer.state_dict()
    assert state_dict["ran_pre"] and "marker" not in state_dict["state"]


def test_load_state_dict_hooks_run_in_order_and_may_replace_the_dict():
    optimizer, *_ = trained("hybrid")
    state_dict = optimizer.state_dict()

    def set_lr(value, replace):
        def hook(opt, sd):
            if replace:
                sd = copy.deepcopy(sd)
            sd["param_groups"][0]["lr"] = value
            return sd if replace else None
        return hook
    optimizer.register_load_state_dict_pre_hook(set_lr(0.002, replace=False))
    optimizer.load_state_dict(state_dict)
    assert optimizer.param_groups[0]["lr"] == 0.002
    optimizer.register_load_state_dict_pre_hook(set_lr(0.003, replace=True), prepend=True)
    optimizer.load_state_dict(state_dict)
    assert optimizer.param_groups[0]["lr"] == 0.002  # the prepended hook ran first, the other after it
    optimizer.register_load_state_dict_post_hook(lambda opt: opt.state.__setitem__("loaded", True))
    optimizer.load_state_dict(state_dict)
    assert optimizer.state["loaded"]


@pytest.mark.parametrize("config", CONFIGS)
def test_step_hooks_global_and_own_run_around_the_step_and_go_when_removed(config):
    weight, bias = weight_and_bias()
    optimizer = make_optimizer(config, weight, bias)
    other = torch.optim.SGD([Parameter(torch.zeros(2))])
    calls = []
    handles = [register_optimizer_step_pre_hook(lambda *_: calls.append("global pre")),
               register_optimizer_step_post_hook(lambda *_: calls.append("global post")),
               optimizer.register_step_pre_hook(lambda *_: calls.append("pre")),
               optimizer.register_step_post_hook(lambda *_: calls.append("post"))]
    try:
        optimizer.step()
        other.step()
        assert calls == ["global pre", "pre", "post", "global post", "global pre", "global post"]
    finally:
        for handle in handles:
            handle.remove()
    optimizer.step()
    assert len(calls) == 6
