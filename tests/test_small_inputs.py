"""Small inputs go to torch's CPU kernel in eager mode, or to the kernels: in a forward
that autograd does not record (ops.UNRECORDED_KERNELS), and with short rows that the
folded kernels take (ops.FOLDED_KERNELS); the semantics stay this project's."""

import pytest
import torch

import batchnorm
from batchnorm import ops

import oracle


@pytest.fixture(autouse=True)
def _default_threshold(monkeypatch):
    monkeypatch.setattr(ops, "SMALL_INPUT", 1 << 18)


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
        ((128, 32, 8), False),
        ((128, 32, 4, 4), False),
    ],
)
def test_small_inputs_match_oracle_and_torch(shape, kernels, torch_kernel_calls):
    """Training with autograd: torch's kernel, except NCHW-like data of more than 2^17 values
    and rows of fewer than 8 values that the folded kernels take (launch.folds) from 2^15
    values (2x2 maps here; 2^14 values of them, and rows of 8 and 16, which fold, stay on
    torch's kernel)."""
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    assert ops._small(x, 1)
    ours = batchnorm.BatchNorm(shape[1], momentum=None).double()
    theirs = (
        torch.nn.BatchNorm1d(shape[1], momentum=None).double()
        if len(shape) < 4
        else torch.nn.BatchNorm2d(shape[1], momentum=None).double()
    )
    for step in range(3):
        xs = x * (step + 1)
        a, b = xs.clone().requires_grad_(True), xs.clone().requires_grad_(True)
        assert ops._kernels_after_all(a, ours.weight, ours.bias, a.numel()) == kernels
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
        assert ops._small(x, 1) and not ops._kernels_after_all(x, ours.weight, ours.bias, x.numel())
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
        ((8, 1024, 4), False),
        ((4, 16, 5, 5), False),
    ],
)
def test_unrecorded_small_inputs_three_ways(shape, kernels, affine, dtype, torch_kernel_calls):
    """Train mode under no_grad: contiguous data of at least 2^15 values in rows of at least
    8, or in shorter rows the folded kernels take (launch.folds: 128 rows of 4 do, 8 do not),
    goes to the kernels, the rest to torch's; output, running statistics and
    num_batches_tracked against torch and the float64 oracle either way."""
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
            assert ops._kernels_after_all(xs, ours.weight, ours.bias, xs.numel()) == kernels
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

    def takes(t, weight=module.weight, bias=module.bias):
        return ops._kernels_after_all(t, weight, bias, t.numel())

    assert not takes(x)  # weight requires grad
    module(x)
    assert len(torch_kernel_calls) == 1
    with torch.no_grad():
        assert takes(x)
        module(x)
        assert len(torch_kernel_calls) == 1
        assert not takes(x[:, :, :63].contiguous())  # fewer than 2^15 values
        assert not takes(x.reshape(8, 1024, 4))  # rows of 4, too few of them to fold
        assert takes(x.reshape(1024, 8, 4))  # rows of 4, folded
        assert takes(x.reshape(512, 8, 8))
        assert not takes(x.transpose(0, 2).contiguous().transpose(0, 2))  # not contiguous
        assert not takes(x.reshape(4096, 8))  # (N, C): rows of one value
    assert takes(x.reshape(1024, 8, 4))  # folded rows of fewer than 8 values: recorded too
    assert not takes(x.reshape(512, 8, 8))  # rows of 8 fold, but with autograd stay on torch's kernel
    assert takes(x, None, None)
    assert not takes(x.requires_grad_(True), None, None)
    larger = torch.randn(64, 16, 130)  # more than 2^17 values: the kernels, recorded or not
    assert takes(larger) and not takes(larger[:, :, :128].contiguous())
    assert takes(larger.reshape(64 * 65, 16, 2)) and not takes(larger.reshape(64 * 130, 16, 1))


def test_unrecorded_small_input_large_offset_and_nan_batch(torch_kernel_calls):
    # mean 1e4, standard deviation 1, in float32: the shifted float64 sums keep the variance
    big = (torch.randn(64, 3, 256, dtype=torch.float64) + 1e4).float()
    module = batchnorm.BatchNorm1d(3, momentum=1.0)
    with torch.no_grad():
        assert ops._kernels_after_all(big, module.weight, module.bias, big.numel())
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
    """Buffers the address path does not take (bfloat16; float64 with float32 data) get the
    torch-ops update, with the same skip of a non-finite batch."""
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
    batchnorm.functional.batch_norm(data, rm, rv, training=True)
    _, mu, var = oracle.train_forward(data, None, None)
    rm_ref, rv_ref = oracle.running_update(torch.zeros(3), torch.ones(3), mu, var, 32, 0.1)
    torch.testing.assert_close(rm, rm_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-6, atol=1e-7)


def test_small_input_variance_past_float32_skips_the_update():
    """torch's float32 kernel returns invstd 0 when its variance overflows (values of
    +-1e19, ten of them): the update refuses the infinite variance, with the warning, instead of
    dividing by zero; the output is torch's."""
    module, theirs = batchnorm.BatchNorm1d(4), torch.nn.BatchNorm1d(4, track_running_stats=False)
    x = torch.randn(8, 4, 5)
    x[0, 1], x[1, 1] = 1e19, -1e19
    assert ops._small(x, 1) and torch.native_batch_norm(x, None, None, None, None, True, 0.0, 1e-5)[2][1] == 0
    with pytest.warns(RuntimeWarning, match="^batch norm: the training batch has NaN"):
        y = module(x)
    torch.testing.assert_close(y, theirs(x))
    assert torch.equal(module.running_mean, torch.zeros(4)) and torch.equal(module.running_var, torch.ones(4))
    assert module.num_batches_tracked.item() == 0
