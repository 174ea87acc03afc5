"""batchnorm.convert and batchnorm.revert (conversion.py) on real model definitions
(tests/model_zoo.py): outputs, every gradient and the running statistics equal the
unconverted model's; the fused layers are the ones counted by hand; state_dicts round trip;
a model that does not trace falls back with a warning.

The zoo's layers get inputs below crossover.TOP, which these tests pin to torch's kernel
(test_activated.py and test_epilogue.py test the fused kernels); one ResNet-18 test runs every
layer on the kernels, in float64 and the memory-order family the other tests compile."""

import re
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import batchnorm
from batchnorm import crossover, launch
from batchnorm.conversion import _TORCH_BASES, FusedAway
from model_zoo import ZOO, resnet18

FUSED = (batchnorm.BatchNormAct1d, batchnorm.BatchNormAct2d, batchnorm.BatchNormAct3d)


@pytest.fixture
def torch_kernel(monkeypatch):
    monkeypatch.setattr(crossover, "OVERRIDE", crossover.TOP + 1)


def _fused_kinds(model: fx.GraphModule) -> Counter:
    kinds = Counter()
    for node in model.graph.nodes:
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), FUSED):
            kinds[(model.get_submodule(node.target).activation, len(node.args) == 2)] += 1
    return kinds


def _train_step_agrees(original, converted, x):
    """One training forward and backward, then an eval forward: equal outputs, gradients by
    parameter name and running statistics."""
    for model in (original, converted):
        model.train()
        model.zero_grad()
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = original(a), converted(b)
    torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-10)
    theirs = dict(original.named_parameters())
    for name, parameter in converted.named_parameters():
        torch.testing.assert_close(parameter.grad, theirs[name].grad, rtol=1e-10, atol=1e-10, msg=name)
    expected = original.state_dict()
    for key, value in converted.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    original.eval(), converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(ZOO))
def test_every_family_converts_fuses_and_computes_the_same(name, torch_kernel):
    make, batch_norms, fused = ZOO[name]
    torch.manual_seed(0)
    original = make().double()
    converted = batchnorm.convert(original)
    assert isinstance(converted, fx.GraphModule)
    assert sorted(converted.state_dict()) == sorted(original.state_dict())  # a GraphModule orders by first use
    assert not any(type(m) in _TORCH_BASES for m in converted.modules())
    ours = [m for m in converted.modules() if isinstance(m, batchnorm.layers._BatchNorm)]
    assert len(ours) == batch_norms
    assert _fused_kinds(converted) == Counter(fused)
    # the input model is left as it was
    assert sum(type(m) is nn.BatchNorm2d for m in original.modules()) == batch_norms
    _train_step_agrees(original, converted, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    reverted = batchnorm.revert(converted)
    assert not any(isinstance(m, batchnorm.layers._BatchNorm) for m in reverted.modules())
    assert sum(type(m) is nn.BatchNorm2d for m in reverted.modules()) == batch_norms
    original.load_state_dict(reverted.state_dict())  # the checkpoint is plain PyTorch's again
    _train_step_agrees(original, reverted, torch.randn(2, 3, 32, 32, dtype=torch.float64))


def test_resnet18_on_the_kernels_in_both_layouts(monkeypatch):
    monkeypatch.setattr(crossover, "OVERRIDE", 0)
    monkeypatch.setattr(launch.cpu, "PREFETCH_ROW_BYTES", 1 << 30)
    monkeypatch.setattr(launch, "STREAM_MAX_BYTES", 1 << 40)
    monkeypatch.setattr(launch, "FOLD_OVERRIDE", False)
    torch.manual_seed(0)
    original = resnet18().double()
    converted = batchnorm.convert(original)
    _train_step_agrees(original, converted, torch.randn(2, 3, 16, 16, dtype=torch.float64))


class _Functional(nn.Module):
    """Every activation form convert recognizes, and adds written three ways."""

    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(10))
        self.gelu = nn.GELU(approximate="tanh")
        self.leaky = nn.LeakyReLU(0.3)

    def forward(self, x):
        b = self.bns
        x = F.relu(b[0](x), inplace=True)
        x = torch.relu(b[1](x))
        x = b[2](x).relu()
        x = F.leaky_relu(b[3](x), 0.2)
        x = F.elu(b[4](x), alpha=0.5)
        x = F.gelu(b[5](x), approximate="tanh")
        x = self.gelu(b[6](x))
        x = torch.add(b[7](x), x).relu_()
        x = self.leaky(b[8](x).add(x))
        return F.silu(b[9](x) + x)


def test_functions_methods_and_modules_fuse_with_their_parameters(torch_kernel):
    torch.manual_seed(0)
    original = _Functional().double()
    converted = batchnorm.convert(original)
    layers = [converted.get_submodule(f"bns.{k}") for k in range(10)]
    assert all(isinstance(layer, batchnorm.BatchNormAct2d) for layer in layers)
    assert [layer.activation for layer in layers] == [
        "relu", "relu", "relu", "leaky_relu", "elu", "gelu_tanh", "gelu_tanh", "relu", "leaky_relu", "silu",
    ]  # fmt: skip
    assert (layers[3].negative_slope, layers[4].alpha, layers[8].negative_slope) == (0.2, 0.5, 0.3)
    assert sum(_fused_kinds(converted).values()) == 10
    _train_step_agrees(original, converted, torch.randn(3, 4, 5, 5, dtype=torch.float64))


class _NotFusable(nn.Module):
    def __init__(self):
        super().__init__()
        self.used_twice = nn.BatchNorm2d(4)
        self.shared = nn.BatchNorm2d(4)
        self.sixed = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.used_twice(x)
        x = F.relu(y) + y  # the BN's output is read again: fusing would lose it
        x = F.relu(self.shared(F.relu(self.shared(x))))  # one module called twice
        return x + F.relu6(self.sixed(x))  # relu6 is not one of the activations


def test_what_is_not_fused_stays_a_plain_layer(torch_kernel):
    torch.manual_seed(0)
    original = _NotFusable().double()
    converted = batchnorm.convert(original)
    assert not _fused_kinds(converted)
    assert [type(m) for m in converted.modules() if isinstance(m, batchnorm.layers._BatchNorm)] == [
        batchnorm.BatchNorm2d
    ] * 3
    _train_step_agrees(original, converted, torch.randn(3, 4, 5, 5, dtype=torch.float64))


class _Branching(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
        self.head = nn.BatchNorm1d(4)

    def forward(self, x):
        x = self.features(x)
        if x.sum() > 0:
            x = x * 2
        return F.relu(self.head(x.mean((2, 3))))


def test_a_model_that_does_not_trace_falls_back_with_the_reason(torch_kernel):
    torch.manual_seed(0)
    original = _Branching().double()
    with pytest.warns(
        UserWarning,
        match=r"_Branching does not trace with torch\.fx \(TraceError: .*only batch norm -> activation neigh",
    ):
        converted = batchnorm.convert(original)
    assert not isinstance(converted, fx.GraphModule) and type(converted) is _Branching
    features = converted.features
    assert isinstance(features[1], batchnorm.BatchNormAct2d) and features[1].activation == "relu"
    assert isinstance(features[2], FusedAway) and type(features[3]) is batchnorm.BatchNorm2d
    assert type(converted.head) is batchnorm.BatchNorm1d  # F.relu outside a Sequential: not fused
    _train_step_agrees(original, converted, torch.randn(3, 3, 6, 6, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reverted = batchnorm.revert(converted)
    assert [type(m) for m in reverted.features] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.BatchNorm2d]
    assert type(reverted.head) is nn.BatchNorm1d
    _train_step_agrees(original, reverted, torch.randn(3, 3, 6, 6, dtype=torch.float64))


class _Doubling(nn.BatchNorm2d):
    def forward(self, x):
        return 2 * super().forward(x)


def test_subclasses_are_kept_unless_asked(torch_kernel):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _Doubling(4), nn.ReLU(), nn.BatchNorm2d(4))
    with pytest.warns(
        UserWarning, match=re.escape("batchnorm.convert kept 1 subclass(es) of torch's batch norm (_Doubling)")
    ):
        kept = batchnorm.convert(model)
    assert type(kept.get_submodule("1")) is _Doubling and type(kept.get_submodule("3")) is batchnorm.BatchNorm2d
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(kept(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asked = batchnorm.convert(model, subclasses=True)
    assert isinstance(asked.get_submodule("1"), batchnorm.BatchNormAct2d)  # now this project's, fused, not doubling


def test_inplace_makes_the_invertible_pairs_in_place(torch_kernel):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()
    ).double()
    converted = batchnorm.convert(model, inplace=True)
    leaky, relu = converted.get_submodule("1"), converted.get_submodule("4")
    assert (leaky.activation, leaky.inplace, relu.activation, relu.inplace) == ("leaky_relu", True, "relu", False)
    _train_step_agrees(model, converted, torch.randn(3, 3, 6, 6, dtype=torch.float64))


def test_sync_and_lazy_layers_and_modes(torch_kernel):
    model = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4), nn.Linear(4, 4), nn.BatchNorm1d(4)).double()
    model[3].eval()  # a frozen layer stays frozen: modes are per layer
    converted = batchnorm.convert(model, fuse=False)
    assert type(converted[1]) is batchnorm.SyncBatchNorm and type(converted[3]) is batchnorm.BatchNorm1d
    assert converted.training and converted[1].training and not converted[3].training
    _train_step_agrees(model, converted, torch.randn(5, 3, dtype=torch.float64))
    assert type(batchnorm.revert(converted)[1]) is nn.SyncBatchNorm
    lazy = batchnorm.convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d()), fuse=False)
    assert type(lazy[1]) is batchnorm.LazyBatchNorm2d
    lazy(torch.randn(2, 3, 4, 4))
    assert type(lazy[1]) is batchnorm.BatchNorm2d and lazy[1].num_features == 4
    assert type(batchnorm.revert(lazy)[1]) is nn.BatchNorm2d


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match=re.escape("model must be a torch.nn.Module, got dict")):
        batchnorm.convert({})
    with pytest.raises(TypeError, match=re.escape("model must be a torch.nn.Module, got list")):
        batchnorm.revert([])
    with pytest.raises(ValueError, match=re.escape("revert cannot give a torch layer for BatchNorm with axis=-1")):
        batchnorm.revert(nn.Sequential(batchnorm.BatchNorm(4, axis=-1)))
