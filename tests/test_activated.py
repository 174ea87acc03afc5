"""BatchNormAct1d/2d/3d (activated.py): act(BN(x) + residual) in the kernels' own passes,
against torch's BatchNorm followed by torch's add and activation, and against the formula
written out in float64; gradients by gradcheck and gradgradcheck.

Each (activation, residual, dtype, kernel family) is a kernel specialization that a fresh
checkout compiles (10 to 60 s each): the tests share a few, float64 with a residual where
they can; test_epilogue.py takes every activation through the rows family."""

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


def _pair(C, activation, dtype=torch.float64, inplace=False):
    ours = FUSED[4](C, activation, negative_slope=0.2, alpha=0.5, inplace=inplace).to(dtype)
    theirs = TORCH[4](C).to(dtype)
    with torch.no_grad():  # negative gammas too where the output is inverted
        ours.weight.copy_(torch.linspace(-1.5, 1.5, C) if inplace else torch.linspace(0.5, 1.5, C))
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


def _train_and_eval_three_ways(x, r, activation, tolerance=None, inplace=False):
    """The fused layer, torch's layer + add + activation, and the float64 formula: outputs and
    every gradient in training, the running statistics, then the output and gradients in eval."""
    C = x.shape[1]
    ours, theirs = _pair(C, activation, x.dtype, inplace)
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
    ra2, rb2 = (None, None) if r is None else (r.clone().requires_grad_(True), r.clone().requires_grad_(True))
    ours.weight.grad = theirs.weight.grad = None
    y = ours(a2, ra2)
    z = ACT[activation](theirs(b2) if r is None else theirs(b2) + rb2)
    torch.testing.assert_close(y, z, **(tolerance or {}))
    y.backward(g)
    z.backward(g)
    torch.testing.assert_close(a2.grad, b2.grad, **(tolerance or {}))
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **(tolerance or {}))
    if r is not None:
        torch.testing.assert_close(ra2.grad, rb2.grad, **(tolerance or {}))


def test_every_nchw_kernel_family(kernel_order, kernels_taken):
    x = torch.randn(8, 6, 5, 5, dtype=torch.float64) * 2 + 1
    _train_and_eval_three_ways(x, torch.randn_like(x), "relu")


def test_without_residual(kernels_taken):
    x = torch.randn(8, 6, 5, 5, dtype=torch.float64) * 2 + 1
    _train_and_eval_three_ways(x, None, "relu")


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_channels_last_and_rows(activation, kernels_taken):
    """channels_last (N*H*W, C) rows and (N, C) input of BatchNormAct1d."""
    x = (torch.randn(8, 16, 4, 4, dtype=torch.float64) * 2 + 1).contiguous(memory_format=torch.channels_last)
    _train_and_eval_three_ways(x, torch.randn_like(x), activation)
    rows, r = torch.randn(64, 16, dtype=torch.float64), torch.randn(64, 16, dtype=torch.float64)
    ours = batchnorm.BatchNormAct1d(16, activation, negative_slope=0.2).double()
    torch.testing.assert_close(ours(rows, r), ACT[activation](TF.batch_norm(rows, None, None, training=True) + r))


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
    ours, theirs = _pair(6, "relu")
    y = ours(x, r)
    r2 = r.detach().clone().requires_grad_(True)
    z = TF.relu(theirs(x) + r2)
    torch.testing.assert_close(y, z)
    g = torch.randn_like(y)
    y.backward(g), z.backward(g)
    torch.testing.assert_close(r.grad, r2.grad)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck(training, kernels_taken):
    ours = batchnorm.BatchNormAct2d(3, "silu").double().train(training)
    with torch.no_grad():
        ours.running_var.fill_(1.5)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
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
        (dict(inplace=True), ValueError,
         "save='output' needs an invertible activation (identity, leaky_relu with negative_slope > 0, elu with "
         "alpha > 0), got activation='relu'"),
        (dict(activation="leaky_relu", negative_slope=0.0, inplace=True), ValueError,
         "save='output' needs an invertible activation: leaky_relu with negative_slope > 0, got negative_slope=0.0"),
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


# ------------------------------------------------------- in-place activated batch norm


def test_inplace_in_every_nchw_kernel_family(kernel_order, kernels_taken):
    """x-hat recovered from the output (negative gammas too): torch's numbers."""
    x = torch.randn(8, 6, 5, 5, dtype=torch.float64) * 2 + 1
    _train_and_eval_three_ways(x, torch.randn_like(x), "leaky_relu", inplace=True)


@pytest.mark.parametrize("activation", ["identity", "elu"])
def test_inplace_channels_last(activation, kernels_taken):
    x = (torch.randn(8, 6, 4, 4, dtype=torch.float64) * 2 + 1).contiguous(memory_format=torch.channels_last)
    _train_and_eval_three_ways(x, None, activation, inplace=True)


def test_inplace_gradcheck_and_no_double_backward(kernels_taken):
    ours = batchnorm.BatchNormAct2d(3, "leaky_relu", negative_slope=0.3, inplace=True).double()
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.7, -1.2, 1.5], dtype=torch.float64, requires_grad=True)
    b = torch.linspace(-1, 1, 3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(ours, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    y = f(x, w, b)
    with pytest.raises(RuntimeError, match=re.escape("double backward (create_graph=True) through an in-place")):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("inplace", [False, True])
def test_what_backward_keeps(inplace):
    """Conv-BN-LeakyReLU x3: torch's layers keep each BN's input and its output (LeakyReLU's
    input); the fused layer keeps the BN's input; in place, only the output, which the next
    convolution keeps anyway (saved_tensors_hooks, unique storages, parameters left out)."""
    from batchnorm.model_bench import saved_bytes

    def net(fused):
        torch.manual_seed(0)
        layers, inputs = [], 3
        for width in (8, 16, 16):
            layers.append(torch.nn.Conv2d(inputs, width, 3, padding=1, bias=False))
            if fused:
                layers.append(batchnorm.BatchNormAct2d(width, "leaky_relu", inplace=inplace))
            else:
                layers += [torch.nn.BatchNorm2d(width), torch.nn.LeakyReLU(0.01)]
            inputs = width
        return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(16 * 64, 2)).double()

    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    per_map = 4 * 8 * 8 * 8  # bytes of one channel's maps in the batch
    stats = 4 * 8 * (8 + 16 + 16) + 1  # at most four float64 vectors a layer: per-channel statistics
    # torch: x, then each layer's convolution output (the BN's input), the BN's output (the
    # LeakyReLU's input) and the LeakyReLU's output (the next layer's input)
    torch_maps = 3 + 3 * (8 + 16 + 16)
    # fused: no BN output; in place: no BN input either
    our_maps = 3 + (1 if inplace else 2) * (8 + 16 + 16)
    torch_bytes, ours = saved_bytes(net(False), x), saved_bytes(net(True), x)
    assert 0 <= torch_bytes - per_map * torch_maps < stats
    assert 0 <= ours - per_map * our_maps < stats


def test_in_a_forked_child_the_epilogue_is_torch_ops_after_the_normalization(monkeypatch):
    """A forked child (DataLoader worker) must not launch the kernels; the fused layer keeps
    its epilogue there (it was dropped before: the plain normalization came back)."""
    monkeypatch.setattr(batchnorm.ops, "_forked_child", True)
    x, r = torch.randn(8, 6, 5, 5, dtype=torch.float64), torch.randn(8, 6, 5, 5, dtype=torch.float64)
    ours, theirs = _pair(6, "relu")
    torch.testing.assert_close(ours(x, r), TF.relu(theirs(x) + r))
