"""Property-based comparison with torch over random shapes, layouts, scales and settings."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchnorm


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rank=st.integers(2, 5),
    batch=st.integers(2, 5),
    channels=st.integers(1, 6),
    spatial=st.integers(1, 4),
    channels_last=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    offset=st.sampled_from([0.0, 5.0, -100.0]),
    affine=st.booleans(),
    momentum=st.sampled_from([0.1, 0.5, None]),
    seed=st.integers(0, 2**16),
)
def test_random_configurations_match_torch(
    rank, batch, channels, spatial, channels_last, scale, offset, affine, momentum, seed
):
    torch.manual_seed(seed)
    shape = (batch, channels, *([spatial] * (rank - 2)))
    ours_cls = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d, 5: batchnorm.BatchNorm3d}
    torch_cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
    ours = ours_cls[rank](channels, affine=affine, momentum=momentum).double()
    theirs = torch_cls[rank](channels, affine=affine, momentum=momentum).double()
    x = torch.randn(shape, dtype=torch.float64) * scale + offset
    if channels_last and rank in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if rank == 4 else torch.channels_last_3d)
    dy = torch.randn(shape, dtype=torch.float64)
    for training in (True, True, False):
        ours.train(training)
        theirs.train(training)
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ours(a), theirs(b)
        ya.backward(dy)
        yb.backward(dy)
        tol = dict(rtol=1e-7, atol=1e-7 * max(1.0, 1 / scale))
        torch.testing.assert_close(ya, yb, **tol)
        torch.testing.assert_close(a.grad, b.grad, **tol)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-9, atol=1e-9 * abs(offset) + 1e-12)
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-7, atol=1e-12)
        assert ours.num_batches_tracked == theirs.num_batches_tracked
