"""The fused layers' custom ops (fused_ops.py): opcheck, one op per fused layer under
torch.compile and export, and their default implementation (what CUDA and other devices run)
against torch's BatchNorm followed by torch's add and activation.

The CPU inputs are float64 and channels_last, with the activations test_epilogue.py and
test_activated.py already compile the kernels for (each new specialization costs seconds)."""

import pytest
import torch
import torch.nn.functional as TF

import batchnorm
from batchnorm import fused_ops
from batchnorm.epilogue import Epilogue

ACT = {
    "leaky_relu": lambda z: TF.leaky_relu(z, 0.2),
    "elu": lambda z: TF.elu(z, 0.5),
    "gelu_tanh": lambda z: TF.gelu(z, approximate="tanh"),
    "relu": TF.relu,
}


def _tensors(residual=True, layout=torch.channels_last):
    torch.manual_seed(0)
    x = (torch.randn(8, 6, 5, 5, dtype=torch.float64) * 2 + 1).contiguous(memory_format=layout)
    weight = torch.tensor([0.7, -1.2, 1.5, 1e-7, 0.5, 2.0], dtype=torch.float64)
    bias = torch.linspace(-1, 1, 6, dtype=torch.float64)
    r = torch.randn_like(x) if residual else None
    return x, weight, bias, r


@pytest.mark.parametrize(
    "activation, save, residual", [("leaky_relu", "input", True), ("elu", "output", False)]
)  # fmt: skip
def test_opcheck_every_fused_op(activation, save, residual):
    x, weight, bias, r = _tensors(residual)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    if r is not None:
        r = r.clone().requires_grad_(True)
    options = (activation, 0.2, 0.5, save)
    torch.library.opcheck(fused_ops.forward_train_act, (*leaves, r, 1e-5, 1, *options))
    running_mean, running_var = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
    torch.library.opcheck(
        fused_ops.forward_eval_act, (leaves[0], running_mean, running_var, *leaves[1:], r, 1e-5, 1, *options)
    )
    r = None if r is None else r.detach()
    out, mean, invstd, _ = fused_ops.forward_train_act(x, weight, bias, r, 1e-5, 1, *options)
    saved = out if save == "output" else x
    dy = torch.randn_like(x)
    torch.library.opcheck(fused_ops.backward_act, (dy, saved, mean, invstd, weight, bias, r, True, 1, *options, True))


def _torch_oracle(x, weight, bias, r, activation, training, running=None):
    """torch's BatchNorm2d, add and activation: out and the gradients of (x, weight, bias, r)."""
    layer = torch.nn.BatchNorm2d(6).double().train(training)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        if running is not None:
            layer.running_mean.copy_(running[0])
            layer.running_var.copy_(running[1])
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, r)]
    y = layer(leaves[0])
    out = ACT[activation](y if r is None else y + leaves[1])
    return out, leaves, layer


# (what backward keeps, a residual, the activation, the layout): kernels the suite compiles anyway
CASES = [
    ("input", True, "gelu_tanh", torch.channels_last),
    ("input", False, "relu", torch.contiguous_format),
    ("output", False, "elu", torch.channels_last),
    ("output", True, "leaky_relu", torch.contiguous_format),
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("save, residual, activation, layout", CASES)
def test_default_implementation_is_torchs(training, save, residual, activation, layout):
    """What the ops compute off the CPU (torch ops: the reference normalization, epilogue.apply,
    torch's activation backward, x-hat recovered from out when save="output") equals torch's
    layers, and the CPU kernels equal it."""
    x, weight, bias, r = _tensors(residual, layout)
    weight = weight.clone()
    if save == "input":
        weight[3] = 0.3  # the vanishing gamma is for the inversion
    running = (torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5)
    options = Epilogue(activation, 0.2, 0.5, r, save)
    if training:
        out, mean, invstd, _ = fused_ops._train_reference(x, weight, bias, 1e-5, 1, options)
    else:
        out = fused_ops._eval_reference(x, *running, weight, bias, 1e-5, 1, options)
        mean, invstd = running[0], torch.rsqrt(running[1] + 1e-5)
    expected, leaves, layer = _torch_oracle(x, weight, bias, r, activation, training, running)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(x)
    expected.backward(dy)
    saved = out if save == "output" else x
    grads = fused_ops._backward_reference(dy, saved, mean, invstd, weight, bias, training, 1, options, True)
    dx, dweight, dbias, dresidual = grads
    tolerance = dict(rtol=1e-7, atol=1e-7) if save == "output" else dict(rtol=1e-12, atol=1e-12)
    keep = slice(None) if save == "input" else [0, 1, 2, 4, 5]  # gamma 1e-7 does not invert
    torch.testing.assert_close(dweight[keep], layer.weight.grad[keep], **tolerance)
    torch.testing.assert_close(dbias, layer.bias.grad, **tolerance)
    if save == "input" or not training:
        torch.testing.assert_close(dx, leaves[0].grad, **tolerance)
    if residual:
        torch.testing.assert_close(dresidual, leaves[1].grad, **tolerance)
    else:
        assert dresidual.numel() == 0
    # the CPU kernels: the same numbers, vanishing gamma included
    kernel = fused_ops._backward_act_cpu(
        dy, saved, mean, invstd, weight, bias, r, training, 1, *options[:3], save, True
    )
    for ours, theirs in zip(kernel, grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


def _block(inplace=False):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 6, 3, padding=1).double().to(memory_format=torch.channels_last)
    activation = "leaky_relu" if inplace else "relu"
    return conv, batchnorm.BatchNormAct2d(6, activation, negative_slope=0.2, inplace=inplace).double()


@pytest.mark.parametrize("inplace", [False, True])
def test_compile_fullgraph_sees_one_op_and_matches_eager(inplace):
    """torch.compile (aot_eager) of conv -> fused layer with a residual: outputs, every
    gradient and the running statistics equal eager's over train, train, eval."""
    pairs = [_block(inplace), _block(inplace)]

    def run(conv, bn, x, r):
        return bn(conv(x), r)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    for training in (True, True, False):
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        r = torch.randn(4, 6, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        results = []
        for (conv, bn), call in zip(pairs, (run, compiled), strict=True):
            bn.train(training)
            a, ra = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
            y = call(conv, bn, a, ra)
            y.backward(torch.ones_like(y))
            results.append((y, a.grad, ra.grad, conv.weight.grad.clone(), bn.weight.grad.clone(), bn.bias.grad.clone()))
            conv.zero_grad(), bn.zero_grad()
        for ours, theirs in zip(*results, strict=True):
            torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(pairs[0][1].running_mean, pairs[1][1].running_mean)
    torch.testing.assert_close(pairs[0][1].running_var, pairs[1][1].running_var)
    assert pairs[1][1].num_batches_tracked.item() == 2

    block = _Block(*_block(inplace))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    r = torch.randn(4, 6, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    for training, name in ((True, "forward_train_act"), (False, "forward_eval_act")):
        exported = torch.export.export(block.train(training), (x, r))
        targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
        assert f"batchnorm.{name}.default" in targets
        assert not any(op in target for target in targets for op in ("relu", "add.Tensor"))
        torch.testing.assert_close(exported.module()(x, r), block(x, r))


class _Block(torch.nn.Module):
    def __init__(self, conv, bn):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x, r):
        return self.bn(self.conv(x), r)
