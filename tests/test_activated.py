"""BatchNormAct1d/2d/3d (activated.py): act(BN(x) + residual) in the kernels' own passes,
against torch's BatchNorm followed by torch's add and activation, and against the formula
written out in float64; gradients by gradcheck and gradgradcheck."""

import re

import pytest
import torch
import torch.nn.functional as TF

import batchnorm
from batchnorm import route

ACT = {
    "identity": lambda z: z,
    "relu": TF.relu,
    "leaky_relu": lambda z: TF.leaky_relu(z, 0.2),
    "elu": lambda z: TF.elu(z, 0.5),
    "silu": TF.silu,
    "gelu": TF.gelu,
    "gelu_tanh": lambda z: TF.gelu(z, approximate="tanh"),
}
FUSED = {2: batchnorm.BatchNormAct1d, 3: batchnorm.BatchNormAct1d, 4: batchnorm.BatchNormAct2d}
TORCH = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}


def _pair(C, activation, dtype=torch.float64):
    ours = FUSED[4](C, activation, negative_slope=0.2, alpha=0.5).to(dtype)
    theirs = TORCH[4](C).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.linspace(0.5, 1.5, C))
        ours.bias.copy_(torch.linspace(-1, 1, C))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _formula(x, r, weight, bias, activation, eps=1e-5):
    """act(BN(x) + r) written out in float64, channels on axis 1, batch statistics."""
    x = x.double()
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    z = weight.double().view(shape) * (x - mu) / torch.sqrt(var + eps) + bias.double().view(shape)
    return ACT[activation](z if r is None else z + r.double())


@pytest.fixture
def kernels_taken(routes):
    """Asserts, after the test, that every call of the fused layer went to the kernels."""
    yield routes
    assert routes and set(routes) <= {route.KERNELS, route.KERNELS_RECORDED}


def _train_and_eval_three_ways(x, r, activation, tolerance=None):
    """The fused layer, torch's layer + add + activation, and the float64 formula: outputs and
    every gradient in training, the running statistics, then the output and gradients in eval."""
    C = x.shape[1]
    ours, theirs = _pair(C, activation, x.dtype)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, r, x, r)]
    a, ra, b, rb = leaves
    y = ours(a, ra)
    z = ACT[activation](theirs(b) if rb is None else theirs(b) + rb)
    torch.testing.assert_close(y, z, **(tolerance or {}))
    torch.testing.assert_close(y.double(), _formula(x, r, ours.weight, ours.bias, activation), rtol=1e-9, atol=1e-9)
    assert y.stride() == x.stride()
    g = torch.randn_like(y)
    y.backward(g)
    z.backward(g)
    torch.testing.assert_close(a.grad, b.grad, **(tolerance or {}))
    if r is not None:
        torch.testing.assert_close(ra.grad, rb.grad, **(tolerance or {}))
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **(tolerance or {}))
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **(tolerance or {}))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert ours.num_batches_tracked.item() == 1
    ours.eval(), theirs.eval()
    a2, b2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = ours(a2, r)
    z = ACT[activation](theirs(b2) if r is None else theirs(b2) + r)
    torch.testing.assert_close(y, z, **(tolerance or {}))
    y.backward(g)
    z.backward(g)
    torch.testing.assert_close(a2.grad, b2.grad, **(tolerance or {}))


@pytest.mark.parametrize("residual", [True, False])
def test_every_nchw_kernel_family(kernel_order, residual, kernels_taken):
    x = torch.randn(8, 6, 5, 5, dtype=torch.float64) * 2 + 1
    _train_and_eval_three_ways(x, torch.randn_like(x) if residual else None, "relu")


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_channels_last_and_rows(activation, kernels_taken):
    """channels_last (N*H*W, C) rows and (N, C) input of BatchNormAct1d."""
    x = (torch.randn(8, 16, 4, 4, dtype=torch.float64) * 2 + 1).contiguous(memory_format=torch.channels_last)
    _train_and_eval_three_ways(x, torch.randn_like(x), activation)
    rows = torch.randn(64, 16, dtype=torch.float64)
    ours = batchnorm.BatchNormAct1d(16, activation, negative_slope=0.2).double()
    torch.testing.assert_close(ours(rows), ACT[activation](TF.batch_norm(rows, None, None, training=True)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_against_float32(dtype, kernels_taken):
    """Half-precision data computed in float32 and rounded once, as torch's float32 result rounded."""
    x = torch.randn(8, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x)
    ours = batchnorm.BatchNormAct2d(16)
    y = ours(x.to(dtype).requires_grad_(True), r.to(dtype))
    expected = TF.relu(TF.batch_norm(x.to(dtype).float(), None, None, training=True) + r.to(dtype).float())
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)
    y.backward(torch.ones_like(y))


def test_residual_with_other_strides_and_only_the_residual_learning(kernels_taken):
    """A channels_last residual for NCHW input (copied to x's strides), and a residual that wants
    a gradient while the input does not."""
    x = torch.randn(8, 6, 7, 7, dtype=torch.float64)
    r = torch.randn_like(x).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    ours, theirs = _pair(6, "silu")
    y = ours(x, r)
    r2 = r.detach().clone().requires_grad_(True)
    z = TF.silu(theirs(x) + r2)
    torch.testing.assert_close(y, z)
    g = torch.randn_like(y)
    y.backward(g), z.backward(g)
    torch.testing.assert_close(r.grad, r2.grad)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck(training, kernels_taken):
    ours = batchnorm.BatchNormAct2d(3, "silu").double().train(training)
    with torch.no_grad():
        ours.running_var.fill_(1.5)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.linspace(0.5, 1.5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.linspace(-1, 1, 3, dtype=torch.float64, requires_grad=True)

    def f(x, r, w, b):
        return torch.func.functional_call(ours, {"weight": w, "bias": b}, (x, r))

    assert torch.autograd.gradcheck(f, (x, r, w, b))
    assert torch.autograd.gradgradcheck(f, (x, r, w, b))


def test_state_dict_is_torchs_and_modes_are_torchs():
    ours, theirs = batchnorm.BatchNormAct2d(4, "elu", alpha=0.5), torch.nn.BatchNorm2d(4)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, batchnorm.BatchNorm2d)
    assert "activation='elu', alpha=0.5" in repr(ours)
    x = torch.randn(2, 4, 3, 3)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), TF.elu(theirs(x), 0.5))


def test_fx_trace_keeps_the_layer_and_its_residual():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.bn = batchnorm.BatchNormAct2d(4)

        def forward(self, x):
            return self.bn(self.conv(x), x)

    block = Block()
    traced = torch.fx.symbolic_trace(block)
    nodes = [n for n in traced.graph.nodes if n.op == "call_module" and n.target == "bn"]
    assert len(nodes) == 1 and len(nodes[0].args) == 2
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(traced(x), block(x))


def test_compile_fullgraph():
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNormAct2d(4, "leaky_relu"))
    x = torch.randn(4, 3, 6, 6)
    expected = block(x)
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), expected)
    assert block[1].num_batches_tracked.item() == 2


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(activation="tanh"), ValueError,
         "activation must be one of identity, relu, leaky_relu, elu, silu, gelu, gelu_tanh, got activation='tanh'"),
        (dict(inplace=True), NotImplementedError,
         "inplace=True (in-place activated batch norm, which keeps only the output for backward) is not available "
         "yet; use inplace=False"),
    ],
)  # fmt: skip
def test_bad_options_are_refused(kwargs, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        batchnorm.BatchNormAct2d(4, **kwargs)


def test_a_residual_of_another_shape_is_refused_before_the_update():
    layer = batchnorm.BatchNormAct2d(3)
    with pytest.raises(ValueError, match=re.escape("residual must have the input's shape, dtype and device")):
        layer(torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 1))
    assert layer.num_batches_tracked.item() == 0
    assert torch.equal(layer.running_var, torch.ones(3))
