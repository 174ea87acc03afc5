"""Half-precision data in the kernels (kernels/cpu.py, "half precision"): the conversions
against torch's own, and each kernel family's results within one unit in the last place
of the float64 oracle rounded to the data's dtype."""

import numpy as np
import pytest
import torch
from numba import njit

import batchnorm
from batchnorm import launch
from batchnorm.kernels.cpu import _down, _up

import oracle

HALF = [torch.float16, torch.bfloat16]


@njit
def _convert(bits, widened, values, narrowed):
    """widened = the half-precision ``bits`` as float32; narrowed = the float32 ``values`` stored as half."""
    for i in range(bits.shape[0]):
        widened[i] = _up(bits[i])
    for i in range(values.shape[0]):
        narrowed[i] = _down(values[i], narrowed)


def _bits(t: torch.Tensor) -> np.ndarray:
    """The bits of a half-precision tensor as the kernels get them (launch.STORED)."""
    return t.view(torch.int16).numpy().view(launch.STORED[t.dtype].dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_conversions_match_torch(dtype):
    """Every one of the 65536 bit patterns widened as torch widens it; float32 values
    rounded as torch rounds them: random bit patterns (NaN, infinities and subnormals
    among them), every half value, and every midpoint of two neighbours (the ties, to even)."""
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = every[every.isfinite()].float().sort().values.unique()
    midpoints = (finite[:-1].double() + finite[1:].double()) / 2  # exact in float32 for both formats
    assert torch.equal(midpoints.float().double(), midpoints)
    random_bits = torch.randint(-(1 << 31), 1 << 31, (1 << 18,), dtype=torch.int64).to(torch.int32)
    values = torch.cat([random_bits.view(torch.float32), finite, midpoints.float()])
    widened = np.empty(len(every), np.float32)
    narrowed = np.empty(len(values), launch.STORED[dtype].dtype)
    _convert(_bits(every), widened, values.numpy(), narrowed)
    torch.testing.assert_close(torch.from_numpy(widened), every.float(), rtol=0, atol=0, equal_nan=True)
    ours = torch.from_numpy(narrowed.view(np.int16)).view(dtype)
    theirs = values.to(dtype)
    nan = theirs.isnan()
    assert torch.equal(ours.isnan(), nan)
    assert torch.equal(ours[~nan].view(torch.int16), theirs[~nan].view(torch.int16))


def _ulps(ours: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """How many representable values of ``ours``'s dtype lie between it and ``exact`` (float64)
    rounded to that dtype."""

    def ordered(t):
        bits = t.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(ours) - ordered(exact.to(ours.dtype))).abs()


def assert_within_an_ulp(ours, exact, scale):
    """At most one unit in the last place from the oracle, or (where terms cancel to
    nearly nothing, and float32's rounding shows) within 1e-5 of the terms' ``scale``."""
    assert ours.dtype in HALF and ours.shape == exact.shape
    near = (ours.double() - exact).abs() <= 1e-5 * scale
    far = (_ulps(ours, exact) > 1) & ~near
    assert not far.any(), f"{int(far.sum())} values more than 1 ulp off, e.g. {ours[far][:3]} vs {exact[far][:3]}"


SHAPES = [
    ((6, 8, 5, 7), torch.contiguous_format),  # B > 1: channel-major or memory-order kernels
    ((6, 8, 5, 7), torch.channels_last),  # B == 1: the rows kernels
    ((64, 40), torch.contiguous_format),  # B == 1
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape,layout", SHAPES)
def test_kernels_within_an_ulp_of_the_oracle(dtype, shape, layout, kernel_order):
    """Train forward, backward and eval on half-precision data (float32 parameters and
    buffers, as under autocast) against the float64 oracle on the same half values."""
    module = batchnorm.BatchNorm2d(8) if len(shape) == 4 else batchnorm.BatchNorm1d(40)
    channels = shape[1]
    with torch.no_grad():
        module.weight.copy_(torch.rand(channels) + 0.5)
        module.bias.copy_(torch.randn(channels))
    x = (torch.randn(shape) * 3 + 2).to(dtype).contiguous(memory_format=layout).requires_grad_()
    grad = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
    y = module(x)
    y.backward(grad)
    assert y.dtype == dtype and x.grad.dtype == dtype and y.stride() == x.stride()
    expected, mu, var = oracle.train_forward(x, module.weight, module.bias)
    assert_within_an_ulp(y.detach(), expected, scale=4.0)
    dx, dweight, dbias = oracle.train_backward(grad, x, module.weight)
    assert_within_an_ulp(x.grad, dx, scale=dx.abs().max().item())
    torch.testing.assert_close(module.weight.grad.double(), dweight, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(module.bias.grad.double(), dbias, rtol=1e-5, atol=1e-4)
    m = x.numel() // channels
    running_mean, running_var = oracle.running_update(torch.zeros(channels), torch.ones(channels), mu, var, m, 0.1)
    torch.testing.assert_close(module.running_mean.double(), running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(module.running_var.double(), running_var, rtol=1e-6, atol=1e-6)
    module.eval()
    with torch.no_grad():
        evaluated = module(x)
    assert evaluated.stride() == x.stride()
    expected = oracle.eval_forward(x, module.running_mean, module.running_var, module.weight, module.bias)
    assert_within_an_ulp(evaluated, expected, scale=expected.abs().max().item())


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_half_precision_stores_past_the_caches(dtype, layout, kernel_order, monkeypatch):
    """With launch.NONTEMPORAL_MIN_BYTES at 0, rows of whole cache lines (64 half values in
    NCHW, 32 channels in channels_last) go through the 16-byte non-temporal stores that
    narrow float32 vectors in registers; results as in the plain-store test above."""
    monkeypatch.setattr(launch, "NONTEMPORAL_MIN_BYTES", 0)
    decided = []
    decide = launch._past_caches
    monkeypatch.setattr(launch, "_past_caches", lambda *args: decided.append(decide(*args)) or decided[-1])
    module = batchnorm.BatchNorm2d(32)
    with torch.no_grad():
        module.weight.copy_(torch.rand(32) + 0.5)
        module.bias.copy_(torch.randn(32))
    x = (torch.randn(3, 32, 4, 16) * 3 + 2).to(dtype).contiguous(memory_format=layout).requires_grad_()
    grad = torch.randn(3, 32, 4, 16).to(dtype).contiguous(memory_format=layout)
    y = module(x)
    y.backward(grad)
    expected, _, _ = oracle.train_forward(x, module.weight, module.bias)
    assert_within_an_ulp(y.detach(), expected, scale=4.0)
    dx, _, _ = oracle.train_backward(grad, x, module.weight)
    assert_within_an_ulp(x.grad, dx, scale=dx.abs().max().item())
    module.eval()
    with torch.no_grad():
        evaluated = module(x)
    expected = oracle.eval_forward(x, module.running_mean, module.running_var, module.weight, module.bias)
    assert_within_an_ulp(evaluated, expected, scale=expected.abs().max().item())
    assert decided == [True] * 3  # forward, backward, eval


@pytest.mark.parametrize("dtype", HALF)
def test_non_finite_half_batch_leaves_the_running_statistics(dtype):
    """A half-precision NaN reaches the float32 statistics: the update is refused with a
    warning, as for float32 data, and the output carries the NaN."""
    module = batchnorm.BatchNorm2d(4)
    module(torch.randn(8, 4, 5, 5).to(dtype))
    before = [b.clone() for b in module.buffers()]
    x = torch.randn(8, 4, 5, 5).to(dtype)
    x[3, 2, 1, 1] = float("nan")
    with pytest.warns(RuntimeWarning):
        y = module(x)
    assert y[:, 2].isnan().all() and not y[:, [0, 1, 3]].isnan().any()
    for kept, now in zip(before, module.buffers(), strict=True):
        assert torch.equal(kept, now)
