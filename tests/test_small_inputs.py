"""Small inputs go to torch's CPU kernel in eager mode, or to the kernels, as route.route
decides from the crossovers of crossover.py (here routing.TABLE, fixed: the kernels for maps
from 2^17 values recorded and 2^15 not, for folded short rows from 2^15); the semantics stay
this project's."""

import re

import pytest
import torch

import batchnorm
import routing
from batchnorm import crossover, route

import oracle


@pytest.fixture(autouse=True)
def _table(monkeypatch):
    monkeypatch.setattr(crossover, "OVERRIDE", routing.TABLE)


def _kernels(x, module, training=True, affine=True):
    """Whether route.route sends ``x`` through ``module`` (its buffers, and its weight and bias
    unless ``affine`` is False) to the kernels rather than torch's kernel."""
    weight, bias = (module.weight, module.bias) if affine else (None, None)
    if training:
        running = (module.running_mean, module.running_var, module.num_batches_tracked, 2, 0.1)
    else:
        running = (module.running_mean, module.running_var, None, 0, 0.0)
    where = route.route(x, weight, bias, running, training, 1)
    assert where in (route.TORCH, route.KERNELS, route.KERNELS_RECORDED)
    return where is not route.TORCH


@pytest.fixture
def torch_kernel_calls(monkeypatch):
    """How many times ops called torch's kernel (torch.native_batch_norm)."""
    calls = []
    native = torch.native_batch_norm

    def counted(*args):
        calls.append(args[0].shape)
        return native(*args)

    monkeypatch.setattr(torch, "native_batch_norm", counted)
    return calls


@pytest.mark.parametrize(
    "shape, kernels",
    [
        ((256, 1024), False),
        ((128, 16, 40), False),
        ((4, 16, 5, 5), False),
        ((64, 32, 8, 10), True),
        ((256, 64, 2, 2), True),
        ((64, 64, 2, 2), False),
        ((128, 32, 8), True),  # rows of 8 float64 (64 bytes) fold too
        ((128, 32, 4, 4), False),
    ],
)
def test_small_inputs_match_oracle_and_torch(shape, kernels, torch_kernel_calls):
    """Training with autograd: torch's kernel, except NCHW-like data of more than 2^17 values
    and short rows that the folded kernels take (launch.folds) from 2^15 values (2x2 maps and
    rows of 8 here; 2^14 values of them, and rows of 16, stay on torch's kernel)."""
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    assert x.numel() <= crossover.TOP
    ours = batchnorm.BatchNorm(shape[1], momentum=None).double()
    theirs = (
        torch.nn.BatchNorm1d(shape[1], momentum=None).double()
        if len(shape) < 4
        else torch.nn.BatchNorm2d(shape[1], momentum=None).double()
    )
    for step in range(3):
        xs = x * (step + 1)
        a, b = xs.clone().requires_grad_(True), xs.clone().requires_grad_(True)
        assert _kernels(a, ours) == kernels
        ya, yb = ours(a), theirs(b)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        y_ref, _, _ = oracle.train_forward(xs, None, None)
        torch.testing.assert_close(ya, y_ref)
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-9, atol=1e-12)
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 3
    assert len(torch_kernel_calls) == (0 if kernels else 3)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


def test_small_input_nan_batch_still_skipped():
    module = batchnorm.BatchNorm1d(4)
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="^batch norm: the training batch has NaN"):
        module(x)
    assert torch.equal(module.running_mean, torch.zeros(4)) and module.num_batches_tracked.item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_input_running_stats_match_torch(dtype):
    """The variance comes back from torch's 1/sqrt(var + eps) inside the update kernel
    (one entry point per dtype)."""
    ours, theirs = batchnorm.BatchNorm1d(16, dtype=dtype), torch.nn.BatchNorm1d(16, dtype=dtype)
    for step in range(4):
        x = (torch.randn(128, 16, 40) * (step + 1) + step).to(dtype)
        assert not _kernels(x, ours)
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(
    "shape, kernels",
    [
        ((128, 16, 40), True),
        ((16, 16, 8, 16), True),
        ((8, 8, 4, 8, 16), True),
        ((128, 64, 4), True),
        ((8, 1024, 4), True),  # too few rows to fold: the maps kernels
        ((4, 16, 5, 5), False),
    ],
)
def test_unrecorded_small_inputs_three_ways(shape, kernels, affine, dtype, torch_kernel_calls):
    """Train mode under no_grad: data of at least 2^15 values in rows of more than one value
    goes to the kernels (folded or not: launch.folds takes 128 rows of 4, not 8), the rest to
    torch's; output, running statistics and num_batches_tracked against torch and the float64
    oracle either way."""
    x = torch.randn(shape, dtype=torch.float64) * 3 + 5
    ours = batchnorm.BatchNorm(shape[1], affine=affine).to(dtype)
    theirs = {3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[len(shape)](
        shape[1], affine=affine
    ).to(dtype)
    if affine:
        with torch.no_grad():
            for module in (ours, theirs):
                module.weight.copy_(torch.linspace(0.5, 2, shape[1]))
                module.bias.copy_(torch.linspace(-1, 1, shape[1]))
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    rm_ref, rv_ref = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    m = x.numel() // shape[1]
    with torch.no_grad():
        for step in range(3):
            xs = (x * (step + 1)).to(dtype)
            assert _kernels(xs, ours) == kernels
            y_ref, mu, var = oracle.train_forward(xs, ours.weight, ours.bias)
            rm_ref, rv_ref = oracle.running_update(rm_ref, rv_ref, mu, var, m, 0.1)
            ya, yb = ours(xs), theirs(xs)
            torch.testing.assert_close(ya.double(), y_ref, **tol)
            torch.testing.assert_close(ya, yb, **tol)
    assert len(torch_kernel_calls) == (0 if kernels else 3)
    torch.testing.assert_close(ours.running_mean.double(), rm_ref, **tol)
    torch.testing.assert_close(ours.running_var.double(), rv_ref, **tol)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3


def test_kernels_for_small_inputs_only_where_autograd_does_not_record(torch_kernel_calls):
    module = batchnorm.BatchNorm1d(8)
    x = torch.randn(64, 8, 64)  # 2^15 values, rows of 64

    def takes(t, affine=True):
        return _kernels(t, module, affine=affine)

    assert not takes(x)  # weight requires grad
    module(x)
    assert len(torch_kernel_calls) == 1
    with torch.no_grad():
        assert takes(x)
        module(x)
        assert len(torch_kernel_calls) == 1
        assert not takes(x[:, :, :63].contiguous())  # fewer than 2^15 values
        assert takes(x.reshape(8, 1024, 4))  # rows of 4, too few of them to fold: the maps kernels
        assert takes(x.reshape(1024, 8, 4))  # rows of 4, folded
        assert takes(x.reshape(512, 8, 8))
        assert not takes(x[:, :, ::2].contiguous()[:, :, :31])  # gaps in memory: torch's kernel reads them
        assert not takes(x.reshape(4096, 8))  # (N, C): rows of one value
    assert takes(x.reshape(1024, 8, 4))  # folded rows: from 2^15 values recorded too
    assert takes(x.reshape(512, 8, 8))  # rows of 8 fold too
    assert takes(x, affine=False)
    assert not takes(x.requires_grad_(True), affine=False)
    larger = torch.randn(64, 16, 130)  # more than 2^17 values: the kernels, recorded or not
    assert takes(larger) and not takes(larger[:, :, :128].contiguous())
    assert takes(larger.reshape(64 * 65, 16, 2)) and not takes(larger.reshape(64 * 130, 16, 1))


def test_unrecorded_small_input_large_offset_and_nan_batch(torch_kernel_calls):
    # mean 1e4, standard deviation 1, in float32: the shifted float64 sums keep the variance
    big = (torch.randn(64, 3, 256, dtype=torch.float64) + 1e4).float()
    module = batchnorm.BatchNorm1d(3, momentum=1.0)
    with torch.no_grad():
        assert _kernels(big, module)
        module(big)
    _, _, var = oracle.train_forward(big, None, None)
    m = big.numel() // 3
    torch.testing.assert_close(module.running_var.double(), var * m / (m - 1), rtol=1e-3, atol=0)
    module = batchnorm.BatchNorm1d(3)
    big[0, 0, 0] = float("nan")
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="^batch norm: the training batch has NaN"):
        module(big)
    assert torch.equal(module.running_mean, torch.zeros(3)) and module.num_batches_tracked.item() == 0
    assert torch_kernel_calls == []


def test_update_outside_the_address_path():
    """Buffers the address path does not take (bfloat16) get the torch-ops update, with the
    same skip of a non-finite batch; float64 buffers with float32 data are refused, as torch
    refuses them, and left as they were."""
    ours, theirs = batchnorm.BatchNorm2d(3).to(torch.bfloat16), torch.nn.BatchNorm2d(3).to(torch.bfloat16)
    x = (torch.randn(4, 3, 5, 5) * 2 + 1).to(torch.bfloat16)
    ours(x)
    theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=2e-2, atol=2e-2)
    before = ours.running_mean.clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="^batch norm: the training batch has NaN"):
        ours(x)
    assert torch.equal(ours.running_mean, before) and ours.num_batches_tracked.item() == 1

    data = torch.randn(8, 3, 4) * 2 + 1
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for batch_norm in (batchnorm.functional.batch_norm, torch.nn.functional.batch_norm):
        with pytest.raises(RuntimeError, match="^mixed dtype"):
            batch_norm(data, rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3, dtype=torch.float64)) and torch.equal(rv, torch.ones(3, dtype=torch.float64))


def test_small_input_variance_past_float32_skips_the_update():
    """torch's float32 kernel returns invstd 0 when its variance overflows (values of
    +-1e19, ten of them): the update refuses the infinite variance, with the warning, instead of
    dividing by zero; the output is torch's."""
    module, theirs = batchnorm.BatchNorm1d(4), torch.nn.BatchNorm1d(4, track_running_stats=False)
    x = torch.randn(8, 4, 5)
    x[0, 1], x[1, 1] = 1e19, -1e19
    assert not _kernels(x, module) and torch.native_batch_norm(x, None, None, None, None, True, 0.0, 1e-5)[2][1] == 0
    with pytest.warns(RuntimeWarning, match="^batch norm: the training batch has NaN"):
        y = module(x)
    torch.testing.assert_close(y, theirs(x))
    assert torch.equal(module.running_mean, torch.zeros(4)) and torch.equal(module.running_var, torch.ones(4))
    assert module.num_batches_tracked.item() == 0


# ------------------------------------------------- the route a module's call takes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(60, 100), (4, 16, 5, 5), (128, 16, 40), (2, 8, 3, 3, 3)])
@pytest.mark.parametrize("momentum, affine", [(0.1, True), (None, True), (0.3, False)])
def test_module_training_on_torchs_kernel_three_ways(shape, dtype, momentum, affine, routes, torch_kernel_calls):
    """A small training batch takes torch's kernel from the layer and from functional.batch_norm:
    the same output, gradients and running statistics, bit for bit, from both, and as torch's
    layer and the float64 oracle within rounding."""
    C = shape[1]
    ours = batchnorm.BatchNorm(C, momentum=momentum, affine=affine).to(dtype)
    theirs = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[
        len(shape)
    ](C, momentum=momentum, affine=affine).to(dtype)
    weight = torch.linspace(0.5, 2, C, dtype=dtype, requires_grad=True) if affine else None
    bias = torch.linspace(-1, 1, C, dtype=dtype, requires_grad=True) if affine else None
    if affine:
        with torch.no_grad():
            for module in (ours, theirs):
                module.weight.copy_(weight)
                module.bias.copy_(bias)
    rm, rv, count = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype), torch.tensor(0)
    rm_ref, rv_ref = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    m = torch.Size(shape).numel() // C
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    for step in range(3):
        x = (torch.randn(shape, dtype=torch.float64) * (step + 1) + step).to(dtype)
        a, b, c = (x.clone().requires_grad_(True) for _ in range(3))
        ya, yb = ours(a), theirs(b)
        yc = batchnorm.functional.batch_norm(c, rm, rv, weight, bias, True, momentum, 1e-5, num_batches_tracked=count)
        dy = torch.randn_like(ya)
        for y in (ya, yb, yc):
            y.backward(dy)
        assert torch.equal(ya, yc) and torch.equal(a.grad, c.grad)
        if affine:
            assert torch.equal(ours.weight.grad, weight.grad) and torch.equal(ours.bias.grad, bias.grad)
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol)
        torch.testing.assert_close(ya, yb, **tol)
        torch.testing.assert_close(a.grad, b.grad, **tol)
        _, mu, var = oracle.train_forward(x, None, None)
        factor = 1 / (step + 1) if momentum is None else momentum
        rm_ref, rv_ref = oracle.running_update(rm_ref, rv_ref, mu, var, m, factor)
    assert routes == [route.TORCH] * 6 and len(torch_kernel_calls) == 6
    assert torch.equal(ours.running_mean, rm) and torch.equal(ours.running_var, rv)
    assert ours.num_batches_tracked.item() == count.item() == theirs.num_batches_tracked.item() == 3
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)
    torch.testing.assert_close(ours.running_mean.double(), rm_ref, **tol)
    torch.testing.assert_close(ours.running_var.double(), rv_ref, **tol)


def _strided_running_var(module):
    module.running_var = torch.ones(2 * module.num_features)[::2]


def _counter_in_int32(module):
    module.num_batches_tracked = module.num_batches_tracked.int()


@pytest.mark.parametrize(
    "change, shape, dtype, where",
    [
        (_strided_running_var, (60, 8), torch.float32, route.TORCH),  # the torch-ops update
        (_counter_in_int32, (60, 8), torch.float32, route.TORCH),
        (torch.nn.Module.half, (60, 8), torch.float16, route.KERNELS_RECORDED),  # half: the kernels at any size
        (None, (64, 16, 130), torch.float32, route.KERNELS_RECORDED),  # more than 2^17 values in rows of 130
    ],
    ids=["strided-running-var", "int32-counter", "float16", "kernels"],
)
def test_buffers_and_dtypes_off_the_update_kernel(change, shape, dtype, where, routes):
    """Buffers the update kernel does not take, half precision and a larger batch: output and
    running statistics against the float64 oracle."""
    module = batchnorm.BatchNorm(shape[1])
    if change is not None:
        change(module)
    rm_ref, rv_ref = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    m = torch.Size(shape).numel() // shape[1]
    for step in range(2):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + step).to(dtype)
        y = module(x.requires_grad_(True))
        y_ref, mu, var = oracle.train_forward(x, None, None)
        rm_ref, rv_ref = oracle.running_update(rm_ref, rv_ref, mu, var, m, 0.1)
        torch.testing.assert_close(y.double(), y_ref, rtol=2e-3, atol=2e-3)
    assert routes == [where, where]
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.running_mean.double(), rm_ref, **tol)
    torch.testing.assert_close(module.running_var.double(), rv_ref, **tol)
    assert module.num_batches_tracked.item() == 2


def test_a_parameter_input_and_a_dispatch_mode(routes):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    ours, theirs = batchnorm.BatchNorm1d(8), torch.nn.BatchNorm1d(8)
    x = torch.randn(60, 8) * 3 + 1
    torch.testing.assert_close(ours(torch.nn.Parameter(x)), theirs(x))
    with Seen() as seen:
        torch.testing.assert_close(ours(x), theirs(x))
    assert "batchnorm.forward_train.default" in seen.ops
    assert routes == [route.TORCH, route.OP]
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_compile_function_modes_and_transforms_take_the_ops(routes):
    """torch.compile(fullgraph=True) and a TorchFunctionMode see this project's ops; inside
    torch.func.grad the running update is refused as in torch's layer."""
    from torch.overrides import TorchFunctionMode

    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.functions = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.functions.append(str(func))
            return func(*args, **(kwargs or {}))

    def model(norm):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 8), norm(8))

    eager, compiled = model(batchnorm.BatchNorm1d), model(batchnorm.BatchNorm1d)
    run = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    x = torch.randn(60, 5)
    torch.testing.assert_close(run(x), eager(x))
    assert routes == [route.OP, route.TORCH]  # traced by dynamo (its append replayed), then eager's
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value)

    with Seen() as seen:
        y = eager(x)
    torch.testing.assert_close(y, model(torch.nn.BatchNorm1d)(x))
    assert any("batchnorm.forward_train" in name for name in seen.functions)

    h = torch.randn(60, 8) * 2 + 1
    for module in (batchnorm.BatchNorm1d(8), torch.nn.BatchNorm1d(8)):
        with pytest.raises(RuntimeError, match="would mutate a captured Tensor"):
            torch.func.grad(lambda w, m=module: torch.func.functional_call(m, {"weight": w}, (h,)).sum())(torch.ones(8))
        assert module.num_batches_tracked.item() == 0
    assert routes[-2:] == [route.OP, route.REFERENCE]  # the TorchFunctionMode, then torch.func.grad


@pytest.mark.parametrize(
    "change, shape, error, message",
    [
        (lambda m: setattr(m, "weight", torch.nn.Parameter(torch.ones(5))), (60, 8), RuntimeError,
         "weight should contain 8 elements not 5"),
        (lambda m: setattr(m, "running_var", torch.ones(9)), (60, 8), RuntimeError,
         "running_var should contain 8 elements not 9"),
        (lambda m: setattr(m, "momentum", 1.5), (60, 8), ValueError,
         "momentum must be in [0, 1] or None, got momentum=1.5"),
        (lambda m: setattr(m, "momentum", "0.1"), (60, 8), TypeError,
         "momentum must be a number in [0, 1] or None, got momentum='0.1'"),
        (lambda m: setattr(m, "eps", 0.0), (60, 8), ValueError,
         "batch_norm eps must be positive during training, but got 0.0"),
        (lambda m: setattr(m, "eps", None), (60, 8), TypeError, "eps must be a number, got eps=None"),
        (lambda m: setattr(m, "running_mean", torch.zeros(8, dtype=torch.float64)), (60, 8), RuntimeError,
         "mixed dtype: running_mean is torch.float64, expected torch.float32 for torch.float32 input"),
        (lambda m: m.running_mean.requires_grad_(True), (60, 8), RuntimeError,
         "The function 'batch_norm' is not differentiable with respect to argument 'running_mean'. "
         "This input cannot have requires_grad True."),
        (None, (1, 8), ValueError,
         "Expected more than 1 value per channel when training, got input size torch.Size([1, 8]); "
         "use eval mode (model.eval()), a batch with more than one value per channel, a layer built with "
         "single_value='use_running' (the running statistics for such a batch), or a normalization "
         "that does not depend on the batch (LayerNorm, GroupNorm)"),
        (None, (60, 9), ValueError, "BatchNorm1d(num_features=8) expected input with 8 channels on axis 1, got 9 "
         "(input size (60, 9))"),
    ],
)  # fmt: skip
def test_errors_before_the_route_leave_the_state(change, shape, error, message, routes):
    module = batchnorm.BatchNorm1d(8)
    module(torch.randn(60, 8) + 1)
    if change is not None:
        change(module)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        module(torch.randn(shape))
    assert routes == [route.TORCH]
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_nan_batch_on_torchs_kernel_warns_and_keeps_the_statistics(routes):
    module = batchnorm.BatchNorm1d(4, momentum=None)
    module(torch.randn(8, 4))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(8, 4)
    x[3, 2] = float("inf")
    with pytest.warns(RuntimeWarning, match="^batch norm: the training batch has NaN"):
        module(x)
    assert routes == [route.TORCH, route.TORCH]
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]), key
