"""torch.fx symbolic tracing, torch.jit.trace and torch.jit.script with the layers and the
functional form, against torch's layers traced the same way."""

import re

import pytest
import torch
from torch import nn

import batchnorm
import routing
from batchnorm import functional as F

SHAPES = [(4, 3, 10, 10), (64, 3, 34, 34)]  # torch's kernel, the Numba kernels


@pytest.fixture(autouse=True)
def _routing(monkeypatch):
    monkeypatch.setattr(batchnorm.crossover, "OVERRIDE", routing.TABLE)  # conftest sets 0; keep both routes


def _pair():
    ours = nn.Sequential(nn.Conv2d(3, 8, 3), batchnorm.BatchNorm2d(8), nn.ReLU(inplace=True))
    theirs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _same_state(ours, theirs):
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("shape", SHAPES, ids=["small", "kernels"])
def test_fx_symbolic_trace_keeps_the_layer_as_one_module_call(shape):
    """As torch's layer (a leaf): one call_module node, so that the GraphModule keeps the
    layer's state and its modes; training updates the running statistics as torch's."""
    ours, theirs = _pair()
    graph_ours, graph_theirs = torch.fx.symbolic_trace(ours), torch.fx.symbolic_trace(theirs)
    nodes = [(n.op, n.target) for n in graph_ours.graph.nodes]
    assert nodes == [(n.op, n.target) for n in graph_theirs.graph.nodes]
    assert ("call_module", "1") in nodes
    assert isinstance(graph_ours.get_submodule("1"), batchnorm.BatchNorm2d)
    for _ in range(2):
        x = torch.randn(shape)
        torch.testing.assert_close(graph_ours(x), graph_theirs(x), rtol=1e-5, atol=1e-5)
    _same_state(graph_ours, graph_theirs)
    assert int(graph_ours.get_submodule("1").num_batches_tracked) == 2
    graph_ours.eval(), graph_theirs.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(graph_ours(x), graph_theirs(x), rtol=1e-5, atol=1e-5)


def test_fx_symbolic_trace_of_the_functional_form():
    """batchnorm.functional.batch_norm in a traced forward: one call_function node, which
    runs it."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(3))
            self.register_buffer("var", torch.ones(3))

        def forward(self, x):
            return F.batch_norm(x, self.mean, self.var, training=True, momentum=0.5)

    graph = torch.fx.symbolic_trace(Net())
    assert [n.target for n in graph.graph.nodes if n.op == "call_function"] == [F.batch_norm]
    x = torch.randn(8, 3, 5) * 2 + 1
    mean, var = torch.zeros(3), torch.ones(3)
    expected = nn.functional.batch_norm(x, mean, var, training=True, momentum=0.5)
    torch.testing.assert_close(graph(x), expected)
    torch.testing.assert_close(graph.mean, mean)
    torch.testing.assert_close(graph.var, var)


@pytest.mark.parametrize("shape", SHAPES, ids=["small", "kernels"])
def test_jit_trace_in_training_and_eval(shape):
    """torch.jit.trace records the ops (the Numba kernels and the update by address are not
    called while tracing): the traced model computes torch's outputs and updates the
    running statistics as torch's layer does."""
    ours, theirs = _pair()
    x = torch.randn(shape)
    traced = torch.jit.trace(ours, x, check_trace=False)
    theirs(x)
    _same_state(ours, theirs)
    x = torch.randn(shape)
    torch.testing.assert_close(traced(x), theirs(x), rtol=1e-5, atol=1e-5)
    _same_state(ours, theirs)
    assert int(ours[1].num_batches_tracked) == 2
    ours.eval(), theirs.eval()
    traced = torch.jit.trace(ours, x)
    x = torch.randn(shape)
    torch.testing.assert_close(traced(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: batchnorm.BatchNorm2d(3), lambda: _pair()[0]], ids=["layer", "in a model"])
def test_jit_script_is_refused_with_the_way_out(make):
    """TorchScript (deprecated in torch 2.13) does not take the layers: a clear refusal that
    names torch.compile, before anything is compiled; torch's layer scripts (the control)."""
    with pytest.raises(RuntimeError, match=re.escape("torch.jit.script does not take batchnorm's BatchNorm2d")) as info:
        torch.jit.script(make())
    assert "torch.compile" in str(info.value)
    torch.jit.script(nn.BatchNorm2d(3))
