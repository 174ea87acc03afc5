import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import batchnorm  # noqa: E402

SHAPES = {2: (16, 5), 3: (8, 5, 7), 4: (4, 5, 6, 3), 5: (3, 5, 2, 4, 3)}
OURS = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d, 5: batchnorm.BatchNorm3d}
TORCH = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
LAYOUTS = {
    2: [torch.contiguous_format],
    3: [torch.contiguous_format],
    4: [torch.contiguous_format, torch.channels_last],
    5: [torch.contiguous_format, torch.channels_last_3d],
}


def tolerance(dtype):
    return {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=2e-5)}.get(
        dtype, dict(rtol=2e-2, atol=2e-2)
    )


@pytest.fixture(autouse=True)
def _seed_and_numba_kernels(monkeypatch):
    """Every test runs the Numba kernels for any size, also on the small inputs that in
    use go to torch's kernel (route.py, crossover.py); test_small_inputs.py tests that path."""
    torch.manual_seed(0)
    monkeypatch.setattr(batchnorm.crossover, "OVERRIDE", 0)


@pytest.fixture(params=["in memory order", "channel-major", "folded"])
def kernel_order(request, monkeypatch):
    """Every kernel family for NCHW-like data (B > 1), whatever the test's shapes: the
    memory-order kernels (launch.STREAM_MAX_BYTES), the channel-major ones (with that
    limit at 0), and the folded ones (launch.FOLD_OVERRIDE: any row length)."""
    launch = batchnorm.launch
    monkeypatch.setattr(launch, "FOLD_OVERRIDE", request.param == "folded")
    if request.param == "channel-major":
        monkeypatch.setattr(launch, "STREAM_MAX_BYTES", 0)
    return request.param


@pytest.fixture
def routes(monkeypatch):
    """The destination batchnorm.route.route gave each call."""
    taken = []
    real = batchnorm.route.route

    def recorded(*args):
        where = real(*args)
        taken.append(where)
        return where

    monkeypatch.setattr(batchnorm.route, "route", recorded)
    return taken
