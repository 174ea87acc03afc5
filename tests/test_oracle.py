"""Kernels against the algorithm written plainly in float64 (tests/oracle.py)."""

import warnings

import pytest
import torch

import batchnorm
import routing
from batchnorm import functional as F
from batchnorm.kernels import reference

import oracle

AXES = [(2, 1), (2, -1), (3, 1), (3, -1), (3, 0), (4, 1), (4, -1), (4, 2), (5, 1), (5, -1)]


@pytest.mark.parametrize("rank,axis", AXES)
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "sliced", "offset"])
def test_train_forward_and_backward_match_float64_oracle(rank, axis, layout, kernel_order):
    shape = [5, 4, 3, 6, 2][:rank]
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    if layout == "permuted":  # dense memory in another order than the logical one
        order = list(range(rank))[::-1]
        x = x.permute(order).contiguous().permute(order)
    elif layout == "sliced":  # memory with gaps: copied once, still exact
        x = torch.randn([2 * shape[0], *shape[1:]], dtype=torch.float64)[::2]
    elif layout == "offset":  # dense, but not at the start of its storage (the kernels take addresses)
        x = (torch.randn([shape[0] + 1, *shape[1:]], dtype=torch.float64) * 2 + 3)[1:]
    channels = x.shape[axis]

    def per_channel(values):  # every second value of a longer tensor in the "offset" case
        if layout != "offset":
            return values
        return torch.stack([values, torch.full_like(values, float("nan"))], 1).flatten()[::2]

    weight = per_channel(torch.rand(channels, dtype=torch.float64) + 0.5)
    bias = per_channel(torch.randn(channels, dtype=torch.float64))
    running_mean = per_channel(torch.randn(channels, dtype=torch.float64))
    running_var = per_channel(torch.rand(channels, dtype=torch.float64) + 0.5)
    rm0, rv0 = running_mean.clone(), running_var.clone()
    xg = x.clone().requires_grad_(True)
    wg, bg = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    y = F.batch_norm(xg, running_mean, running_var, wg, bg, training=True, momentum=0.3, axis=axis)
    dy = torch.randn_like(x)
    y.backward(dy)

    y_ref, mu, var = oracle.train_forward(x, weight, bias, axis=axis)
    dx_ref, dw_ref, db_ref = oracle.train_backward(dy, x, weight, axis=axis)
    rm_ref, rv_ref = oracle.running_update(rm0, rv0, mu, var, x.numel() // channels, 0.3)
    tol = dict(rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(xg.grad, dx_ref, **tol)
    torch.testing.assert_close(wg.grad, dw_ref, **tol)
    torch.testing.assert_close(bg.grad, db_ref, **tol)
    torch.testing.assert_close(running_mean, rm_ref, **tol)
    torch.testing.assert_close(running_var, rv_ref, **tol)

    y_eval = F.batch_norm(x, running_mean, running_var, weight, bias, training=False, axis=axis)
    y_ref = oracle.eval_forward(x, running_mean, running_var, weight, bias, axis=axis)
    torch.testing.assert_close(y_eval, y_ref, **tol)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_offset_variance_exact(layout, dtype, kernel_order):
    """Mean 1e4, standard deviation 1: E[x^2] - E[x]^2 in float32 gets this wrong."""
    x = (torch.randn(64, 3, 16, 16, dtype=torch.float64) + 1e4).to(dtype).contiguous(memory_format=layout)
    module = batchnorm.BatchNorm2d(3, momentum=1.0).to(dtype)
    module(x)
    _, mu, var = oracle.train_forward(x, None, None)
    m = x.numel() // 3
    torch.testing.assert_close(module.running_var.double(), var * m / (m - 1), rtol=1e-3, atol=0)
    torch.testing.assert_close(module.running_mean.double(), mu, rtol=1e-7, atol=0)
    # evaluation with the same large mean: (x - E[x]) * scale, not x * scale + offset
    module.eval()
    y_eval = module(x)
    y_ref = oracle.eval_forward(x, module.running_mean, module.running_var, module.weight, module.bias)
    torch.testing.assert_close(y_eval.double(), y_ref, rtol=0, atol=1e-5)
    naive = (x.float().square().mean((0, 2, 3)) - x.float().mean((0, 2, 3)).square()).double()
    assert not torch.allclose(naive, var, rtol=1e-3), "the naive formula should fail here"


def test_reference_ops_match_kernels():
    """The torch-ops implementation (other devices) has the CPU kernels' semantics."""
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last) * 3 + 1
    weight, bias = torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    y, mean, invstd, var = batchnorm.ops.forward_train(x, weight, bias, 1e-5, 1)
    mean_ref, var_ref = reference.batch_stats(x, 1)
    y_ref = reference.normalize(x, mean_ref, torch.rsqrt(var_ref + 1e-5), weight, bias, 1)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(var, var_ref)
    dy = torch.randn_like(x)
    got = batchnorm.ops.backward(dy, x, mean, invstd, weight, True, 1, True)
    want = reference.backward(dy, x, mean, invstd, weight, True, 1)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    rm, rv, n = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), torch.tensor(0)
    rm2, rv2, n2 = rm.clone(), rv.clone(), n.clone()
    batchnorm.ops.update_running_stats(rm, rv, n, mean, var, 150, -1.0)
    reference.update_running_stats(rm2, rv2, n2, mean, var, 150, -1.0)
    torch.testing.assert_close((rm, rv, n), (rm2, rv2, n2))


@pytest.mark.parametrize(
    "make_stats",
    [
        pytest.param(lambda m, v: (m, v), id="dense"),
        pytest.param(lambda m, v: (torch.stack([m, m], 1)[:, 0], torch.stack([v, v], 1)[:, 1]), id="strided"),
        pytest.param(lambda m, v: (m, v.float()), id="mixed-dtypes"),
        pytest.param(lambda m, v: (m.reshape(1, -1), v.reshape(-1, 1)), id="2-d"),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, -1.0])
def test_update_op_takes_any_statistics(make_stats, momentum):
    """The update op, given statistics not from this project's forward (strided, of another
    dtype, of another shape), updates the float64 buffers by the formula in float64; a NaN
    leaves them bit for bit as they were (the torch-ops update used to round them through
    the statistics' float32)."""
    mean, var = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    for nan in (False, True):
        if nan:
            mean = mean.clone()
            mean[2] = float("nan")
        rm, rv, n = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64), torch.tensor(3)
        rm2, rv2, n2 = rm.clone(), rv.clone(), n.clone()
        stats = make_stats(mean, var)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batchnorm.ops.update_running_stats(rm, rv, n, *stats, 40, momentum)
        if nan:
            torch.testing.assert_close((rm, rv, n), (rm2, rv2, n2), rtol=0, atol=0)
            assert [str(w.message) for w in caught] == [batchnorm.ops.NONFINITE_WARNING]
        else:  # the formula in float64, from the statistics as given
            factor = 1 / 4 if momentum < 0 else momentum
            batch_mean, batch_var = (t.reshape(-1).double() for t in stats)
            want_mean = (1 - factor) * rm2 + factor * batch_mean
            want_var = (1 - factor) * rv2 + factor * batch_var * 40 / 39
            torch.testing.assert_close((rm, rv, n), (want_mean, want_var, n2 + 1), rtol=1e-15, atol=0)
            assert caught == []


def test_momentum_none_is_cumulative_average():
    module = batchnorm.BatchNorm1d(3, momentum=None).double()
    batches = [torch.randn(10, 3, dtype=torch.float64) * (i + 1) for i in range(4)]
    for batch in batches:
        module(batch)
    means = torch.stack([b.mean(0) for b in batches])
    variances = torch.stack([b.var(0) for b in batches])
    torch.testing.assert_close(module.running_mean, means.mean(0))
    torch.testing.assert_close(module.running_var, variances.mean(0))
    assert module.num_batches_tracked.item() == 4


def test_empty_batch_leaves_running_statistics():
    module = batchnorm.BatchNorm2d(3)
    module(torch.randn(4, 3, 2, 2))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    for shape in [(0, 3, 2, 2), (4, 3, 0, 2)]:
        x = torch.randn(shape, requires_grad=True)
        y = module(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_nonfinite_batch_skips_update_with_warning():
    module = batchnorm.BatchNorm2d(3)
    module(torch.randn(4, 3, 2, 2))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4, 3, 2, 2)
        x[1, 2, 0, 1] = bad
        with pytest.warns(
            RuntimeWarning, match=r"^batch norm: the training batch has NaN or infinite values, or a variance past"
        ):
            y = module(x)
        assert torch.isfinite(y[:, :2]).all()  # the other channels are normalized as usual
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]), key
    module.eval()
    assert torch.isfinite(module(torch.randn(2, 3, 2, 2))).all()


@pytest.mark.parametrize("buffers", ["in the kernel call", "apart"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_running_update_in_the_kernel_call_or_apart(buffers, layout):
    """Dense buffers go with the forward kernel's call (launch.running_addresses); strided
    buffers (every other value of a longer tensor) take the separate update. Both match
    torch's layer over three batches, and both refuse a non-finite batch with the warning."""
    ours, theirs = batchnorm.BatchNorm2d(6), torch.nn.BatchNorm2d(6)
    if buffers == "apart":
        ours.running_mean, ours.running_var = torch.zeros(12)[::2], torch.ones(12)[::2]
        assert not ours.running_mean.is_contiguous()
    for _ in range(3):
        x = (torch.randn(5, 6, 4, 3) * 3 + 2).contiguous(memory_format=layout)
        ours(x), theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == 3
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(5, 6, 4, 3).contiguous(memory_format=layout)
    x[2, 4, 1, 1] = float("nan")
    with pytest.warns(
        RuntimeWarning, match=r"^batch norm: the training batch has NaN or infinite values, or a variance past"
    ):
        ours(x)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((32, 8, 24, 24), torch.contiguous_format),
        ((32, 8, 24, 24), torch.channels_last),
        ((4, 3, 50, 52), torch.contiguous_format),  # rows of 2600: spans of 1024, 1024 and 552
    ],
)
def test_float32_statistics_and_gradients_to_1e_5(shape, layout, kernel_order):
    """float32 data with an offset: the kernels sum runs of values in float32 (blocks of
    rows channels_last, spans of rows otherwise) with float64 carries; statistics and
    weight gradients stay within 1e-5 of float64."""
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 300).float().contiguous(memory_format=layout)
    dy = torch.randn(x.shape, dtype=torch.float64).float().contiguous(memory_format=layout)
    y, mean, _invstd, var = batchnorm.ops.forward_train(x, None, None, 1e-5, 1)
    y_ref, mu_ref, var_ref = oracle.train_forward(x, None, None)
    torch.testing.assert_close(mean.double(), mu_ref, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=1e-4)
    weight = torch.rand(shape[1]) + 0.5
    dx, dweight, dbias = batchnorm.ops.backward(dy, x, mean, _invstd, weight, True, 1, True)
    dx_ref, dweight_ref, dbias_ref = oracle.train_backward(dy, x, weight)
    torch.testing.assert_close(dbias.double(), dbias_ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(dweight.double(), dweight_ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "shape,layout",
    [
        ((16, 3, 6, 6), torch.contiguous_format),
        ((16, 3, 6, 6), torch.channels_last),  # blocks of rows
        ((4, 3, 1100), torch.contiguous_format),  # rows of two spans
        ((200, 3), torch.contiguous_format),
    ],
)
def test_float32_sums_past_the_float32_range_are_redone_in_float64(shape, layout, kernel_order):
    """Values of +-1e19 in float32: their squares overflow a float32 sum, the variance
    (2.5e36) does not. The kernels then sum that span or block again in float64, and the
    statistics, output, weight gradients and running update match the float64 oracle."""
    x = torch.randn(shape)
    x[0, 1], x[1, 1] = 1e19, -1e19
    x = x.contiguous(memory_format=layout)
    y, mean, invstd, var = batchnorm.ops.forward_train(x, None, None, 1e-5, 1)
    y_ref, mu_ref, var_ref = oracle.train_forward(x, None, None)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=1e-5)
    dy = torch.randn(shape).contiguous(memory_format=layout)
    _dx, dweight, dbias = batchnorm.ops.backward(dy, x, mean, invstd, None, True, 1, True)
    _dx_ref, dweight_ref, dbias_ref = oracle.train_backward(dy, x, None)
    torch.testing.assert_close(dweight.double(), dweight_ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(dbias.double(), dbias_ref, rtol=1e-5, atol=1e-3)
    module = batchnorm.BatchNorm(3, momentum=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finite batch: no warning, the update made
        module(x)
    m = x.numel() // 3
    torch.testing.assert_close(module.running_var.double(), var_ref * m / (m - 1), rtol=1e-5, atol=0)


def _call(layer, *args, **kwargs):
    return layer(*args, **kwargs)  # the line the non-finite warning must point at


class _Parent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = batchnorm.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x) + 1  # the line the warning must point at, in a model


def _nan_batch():
    x = torch.randn(4, 3, 5, 5)
    x[1, 1, 1, 1] = float("nan")
    return x


@pytest.mark.parametrize(
    "path",
    ["update in the kernel call", "torch-ops update", "small layer", "functional small"],
)
def test_nonfinite_warning_points_at_the_callers_line(path, monkeypatch):
    """Each place that refuses the update (in order: route._train_cpu after the kernel call,
    ops.update_with_torch, ops.update_from_batch after torch's kernel, from the layer and from
    functional.batch_norm) attributes the warning to the line that called the layer or batch_norm, not to
    a line of this package or of torch, however deep it sits."""
    module = batchnorm.BatchNorm2d(3)
    x = _nan_batch()
    if path == "torch-ops update":  # strided buffers, which no kernel takes
        module.running_mean, module.running_var = torch.zeros(6)[::2], torch.ones(6)[::2]
    elif path in ("small layer", "functional small"):
        monkeypatch.setattr(batchnorm.crossover, "OVERRIDE", routing.TABLE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if path == "functional small":
            _call(F.batch_norm, x, module.running_mean, module.running_var, training=True)
        else:
            _call(module, x)
    [warning] = [w for w in caught if "training batch has NaN" in str(w.message)]
    assert (warning.filename, warning.lineno) == (__file__, _call.__code__.co_firstlineno + 1)
    assert int(module.num_batches_tracked) == 0


def test_nonfinite_warning_in_a_model_points_at_the_models_line():
    model = _Parent()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(_nan_batch())
    [warning] = [w for w in caught if "training batch has NaN" in str(w.message)]
    assert (warning.filename, warning.lineno) == (__file__, _Parent.forward.__code__.co_firstlineno + 1)
