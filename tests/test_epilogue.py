"""epilogue.py through the route: activation(BN(x) + residual) from every destination
equals torch's BatchNorm followed by torch's activation (output, gradients, running
statistics); bad epilogues are refused before anything changes."""

import re

import pytest
import torch
import torch.nn.functional as TF

import batchnorm
from batchnorm import crossover, route
from batchnorm import functional as F
from batchnorm.epilogue import ACTIVATIONS, Epilogue

TORCH_ACTIVATIONS = {
    "identity": lambda y: y,
    "relu": TF.relu,
    "leaky_relu": lambda y: TF.leaky_relu(y, 0.2),
    "elu": lambda y: TF.elu(y, 0.5),
    "silu": TF.silu,
    "gelu": TF.gelu,
    "gelu_tanh": lambda y: TF.gelu(y, approximate="tanh"),
}


def _destination(name, monkeypatch):
    """Force the destination: torch's kernel (threshold past the top), the kernels (0)."""
    monkeypatch.setattr(crossover, "OVERRIDE", crossover.TOP + 1 if name == "torch" else 0)


@pytest.mark.parametrize("destination", ["torch", "kernels", "custom ops", "reference"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False])
def test_epilogue_matches_torch_from_every_destination(destination, activation, training, monkeypatch, routes):
    _destination(destination, monkeypatch)
    torch.manual_seed(0)
    # channels_last: the kernels' rows family, the cheapest of the fused kernels to compile
    # (every activation is one more specialization; test_activated.py covers the families)
    x = (torch.randn(8, 6, 5, 5, dtype=torch.float64) * 2 + 1).contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x)
    ours, theirs = batchnorm.BatchNorm2d(6).double(), torch.nn.BatchNorm2d(6).double()
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, 6))
            m.bias.copy_(torch.linspace(-1, 1, 6))
            m.running_var.fill_(2.0)
    ours.train(training), theirs.train(training)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ra, rb = r.clone().requires_grad_(True), r.clone().requires_grad_(True)
    epilogue = Epilogue(activation, negative_slope=0.2, alpha=0.5, residual=ra)

    def call():
        return F.normalize(
            a, ours.running_mean, ours.running_var, ours.weight, ours.bias, training, 0.1, 1e-5, 1,
            ours.num_batches_tracked if training else None, ours, epilogue,
        )  # fmt: skip

    if destination == "reference":
        with torch.autograd.forward_ad.dual_level():  # forward-mode AD on: the reference ops
            y = call()
    elif destination == "custom ops":
        from torch.overrides import TorchFunctionMode

        class Passthrough(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        with Passthrough():
            y = call()
    else:
        y = call()
    expected = {"torch": route.TORCH, "kernels": route.KERNELS_RECORDED, "custom ops": route.OP}
    assert routes == [expected.get(destination, route.REFERENCE)]
    z = TORCH_ACTIVATIONS[activation](theirs(b) + rb)
    torch.testing.assert_close(y, z)
    dy = torch.randn_like(y)
    y.backward(dy)
    z.backward(dy)
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(ra.grad, rb.grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize(
    "epilogue, error, message",
    [
        (Epilogue("tanh"), ValueError, "activation must be one of identity, relu, leaky_relu, elu, silu, gelu, "
         "gelu_tanh, got activation='tanh'"),
        (Epilogue(save="both"), ValueError, "save must be 'input' or 'output', got save='both'"),
        (Epilogue("relu", save="output"), ValueError, "save='output' needs an invertible activation (identity, "
         "leaky_relu with negative_slope > 0, elu with alpha > 0), got activation='relu'"),
        (Epilogue("elu", alpha=-1.0, save="output"), ValueError, "save='output' needs an invertible activation: "
         "elu with alpha > 0, got alpha=-1.0"),
        (Epilogue(residual=torch.zeros(4, 3)), ValueError, "residual must have the input's shape, dtype and device "
         "((4, 3, 2), torch.float32, cpu), got ((4, 3), torch.float32, cpu)"),
        (Epilogue(residual=[1.0]), TypeError, "residual must be a tensor, got list"),
    ],
)  # fmt: skip
def test_bad_epilogues_are_refused_before_the_update(epilogue, error, message):
    module = batchnorm.BatchNorm1d(3)
    x = torch.randn(4, 3, 2)
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        F.normalize(
            x, module.running_mean, module.running_var, module.weight, module.bias, True, 0.1, 1e-5, 1,
            module.num_batches_tracked, module, epilogue,
        )  # fmt: skip
    assert module.num_batches_tracked.item() == 0
    assert torch.equal(module.running_mean, torch.zeros(3))


@pytest.mark.parametrize("destination", ["torch", "kernels"])
@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu", "gelu"])
def test_activate_is_the_epilogue_alone(destination, activation, monkeypatch, routes):
    """functional.activate: act(x + residual) exactly, as a batch norm of mean 0, variance 1,
    eps 0 and no affine map (the identity) followed by the epilogue; one fx node."""
    _destination(destination, monkeypatch)
    x = (torch.randn(8, 6, 5, 5, dtype=torch.float64) * 2 + 1).contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x)
    a, ra = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    y = F.activate(a, ra, activation, negative_slope=0.2)
    assert routes == [route.TORCH if destination == "torch" else route.KERNELS_RECORDED]
    b, rb = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    z = TORCH_ACTIVATIONS[activation](b + rb)
    torch.testing.assert_close(y, z, rtol=1e-15, atol=1e-15)
    g = torch.randn_like(y)
    y.backward(g)
    z.backward(g)
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(ra.grad, rb.grad)
    traced = torch.fx.symbolic_trace(lambda x, r: F.activate(x, r, "relu"))
    assert [n.target for n in traced.graph.nodes if n.op == "call_function"] == [F.activate]
