"""An in-place op on the layer's output (nn.ReLU(inplace=True), a residual ``out += x``), after
every route a call can take: torch's kernel for small inputs, the kernels with and without
autograd recording, the folded kernels of short rows, memory order and channel by channel,
train and eval, with and without a gradient, NCHW and channels_last. Each against torch's
layer followed by the same op: output, gradients and running statistics."""

import pytest
import torch
from torch import nn

import batchnorm
import routing
from batchnorm import crossover, launch

# each on one side of a threshold of routing.TABLE (torch's kernel up to 2^18 values, the
# kernels for maps from 2^17 recorded and 2^15 not, for folded rows from 2^15) or of
# launch.STREAM_MAX_BYTES
SHAPES = [
    (16, 4),  # torch's kernel
    (1024, 512),  # 2^19 values: the rows kernels
    (4, 8, 8, 8),  # 2^11: torch's kernel
    (32, 16, 8, 8),  # 2^15 in rows of 64: the kernels when not recorded, else torch's
    (64, 32, 8, 10),  # more than 2^17: the kernels, recorded or not
    (512, 16, 2, 2),  # 2^15 in rows of 4: the folded kernels
    (64, 8, 32, 32),  # 2^19, rows of 4 KiB: channel by channel
    (16, 64, 14, 14),  # rows of 784 bytes: memory order
]

OPS = {
    "relu_": lambda y, x: nn.ReLU(inplace=True)(y),
    "add_": lambda y, x: y.add_(x),  # the residual of a ResNet block
    "mul_": lambda y, x: y.mul_(2.0),
}


def _cases():
    for shape in SHAPES:
        layouts = [torch.contiguous_format] + ([torch.channels_last] if len(shape) == 4 else [])
        for layout in layouts:
            yield pytest.param(shape, layout, id=f"{'x'.join(map(str, shape))}-{str(layout)[6:]}")


@pytest.fixture(autouse=True)
def _default_routing(monkeypatch):
    monkeypatch.setattr(crossover, "OVERRIDE", routing.TABLE)


@pytest.mark.parametrize("shape,layout", list(_cases()))
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("op", list(OPS))
def test_inplace_op_after_the_layer(shape, layout, mode, grad, op):
    channels = shape[1]
    ours = (batchnorm.BatchNorm1d if len(shape) == 2 else batchnorm.BatchNorm2d)(channels)
    theirs = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(channels)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
        ours.running_mean.normal_()
        ours.running_var.uniform_(0.5, 2.0)
    theirs.load_state_dict(ours.state_dict())
    ours.train(mode == "train")
    theirs.train(mode == "train")
    x = (torch.randn(shape) * 2 + 0.5).contiguous(memory_format=layout)
    results = []
    for module in (ours, theirs):
        xs = x.clone(memory_format=torch.preserve_format).requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = OPS[op](module(xs), xs.detach())
            if grad:
                y.backward(torch.ones_like(y).mul_(torch.arange(y.numel()).reshape(y.shape) % 7 - 3))
        results.append((y.detach(), xs.grad, [p.grad for p in module.parameters()]))
    (y1, dx1, dp1), (y2, dx2, dp2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=5e-5)
    if grad:
        torch.testing.assert_close(dx1, dx2, rtol=1e-4, atol=5e-4)
        for a, b in zip(dp1, dp2, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=0.05)
    for name, buffer in theirs.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], buffer)


def test_pooled_outputs_are_not_views():
    """The kernels' outputs come from launch's buffer pool; autograd must not see a view."""
    x = torch.randn(64, 8, 32, 32)
    y = launch.pool.empty_like(x)
    assert y._base is None and y.shape == x.shape and y.stride() == x.stride()
    half = launch.pool.empty_like(x.to(torch.bfloat16))
    assert half._base is None and half.dtype is torch.bfloat16
