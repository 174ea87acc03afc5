"""Property-based tests: against torch over random shapes, layouts, scales and settings, and
against the float64 oracle over random arrangements of memory, channel axes and dtypes."""

import contextlib

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchnorm

import oracle
from conftest import tolerance


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


# what each data dtype's results may differ from the float64 oracle by: float64 and float32
# as everywhere in the tests; half-precision data is computed in float32 and each output
# then rounded to nearest once, half a unit in the last place (2^-11 of the value for
# float16, 2^-8 for bfloat16; here with a quarter more for the float32 arithmetic before
# the rounding), much less than the tests' tolerance against torch's half kernels
ORACLE_TOLERANCE = {
    torch.float64: tolerance(torch.float64),
    torch.float32: tolerance(torch.float32),
    torch.float16: dict(rtol=1.25 * 2**-11, atol=1e-4),
    torch.bfloat16: dict(rtol=1.25 * 2**-8, atol=1e-3),
}


def _arranged(x: torch.Tensor, memory: str, order: list[int], expanded: int | None) -> torch.Tensor:
    """x with its values in another arrangement of memory: dense in the permuted order of
    the dimensions, with gaps (every other value of the last dimension), or with dimension
    ``expanded`` made from its first values (stride 0)."""
    if memory == "permuted":
        inverse = sorted(range(x.dim()), key=order.__getitem__)
        return x.permute(order).contiguous().permute(inverse)
    if memory == "sliced":
        return torch.stack([x, torch.full_like(x, float("nan"))], -1).flatten(-2)[..., ::2]
    return x.narrow(expanded, 0, 1).expand(x.shape)


class _Passthrough(torch.overrides.TorchFunctionMode):
    """A mode that changes nothing; under any mode the layer calls its custom ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def expand_channels(t: torch.Tensor, rank: int, channel: int) -> torch.Tensor:
    return t.detach().double().view([-1 if d == channel else 1 for d in range(rank)])


def assert_sums_close(actual: torch.Tensor, expected: torch.Tensor, sizes: torch.Tensor, tolerance: dict) -> None:
    """Per-channel sums within ``rtol`` of the sum of their terms' absolute values."""
    error = (actual.double() - expected).abs()
    assert (error <= tolerance["rtol"] * sizes + tolerance["atol"]).all(), (error, sizes)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 8), min_size=5, max_size=5),
    rank=st.integers(2, 5),
    axis_choice=st.integers(0, 9),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    memory=st.sampled_from(["permuted", "sliced", "expanded"]),
    order_seed=st.integers(0, 2**16),
    offset=st.sampled_from([0.0, 3.0, -50.0]),
    half_layer=st.booleans(),
    through_ops=st.booleans(),
    family=st.sampled_from(["in memory order", "channel-major", "folded"]),
    pooled=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_memory_arrangements_and_dtypes_match_the_float64_oracle(
    sizes, rank, axis_choice, dtype, memory, order_seed, offset, half_layer, through_ops, family, pooled, seed
):
    """The kernels (every size goes to them here, see conftest.py) on data in any order of
    memory, with gaps or expanded, on any channel axis, in each dtype, against the algorithm
    written plainly in float64 on the same values: training output, the three gradients, the
    running update, and evaluation with the updated statistics. Half-precision data meets
    float32 parameters and buffers (as under autocast) or, with ``half_layer``, its own dtype
    (a layer made with ``.half()``): computed in float32 either way. ``through_ops`` calls the
    custom ops (as under torch.compile or any mode) instead of the eager path; ``family`` sends
    NCHW-like data to the kernels in memory order, the channel-major ones or the folded ones
    (launch.folds, its limits lifted), whatever its shape; ``pooled``
    takes the outputs from the buffer pool, with stores past the caches where rows are whole
    cache lines."""
    torch.manual_seed(seed)
    axis = axis_choice % rank - (rank if axis_choice >= rank else 0)  # negative ones too
    channel = axis % rank
    shape = sizes[:rank]
    many = 1 if channel == 0 else 0
    shape[many] += 2  # at least three values per channel (with two, dx cancels to about eps)
    expanded = max(d for d in range(rank) if d not in (channel, many)) if rank > 2 else None
    if memory == "expanded" and expanded is None:
        memory = "sliced"  # no dimension left to expand without making a channel constant
    elif memory == "expanded":
        shape[expanded] += 1
    order = torch.randperm(rank, generator=torch.Generator().manual_seed(order_seed)).tolist()
    stat = torch.float64 if dtype is torch.float64 else torch.float32  # the compute dtype
    layer = dtype if half_layer else stat  # of the parameters and buffers
    channels = shape[axis]

    base = (torch.randn(shape, dtype=torch.float64) + offset).to(dtype).requires_grad_(True)
    x = _arranged(base, memory, order, expanded)
    x.retain_grad()
    weight = (torch.rand(channels, dtype=stat) + 0.5).to(layer).requires_grad_(True)
    bias = torch.randn(channels, dtype=stat).to(layer).requires_grad_(True)
    running_mean, running_var = torch.randn(channels).to(layer), (torch.rand(channels) + 0.5).to(layer)
    rm0, rv0 = running_mean.clone(), running_var.clone()
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)

    launch, pool = batchnorm.launch, batchnorm.buffers.pool
    limits = launch.STREAM_MAX_BYTES, launch.NONTEMPORAL_MIN_BYTES, pool.min_bytes
    fold = launch.FOLD_OVERRIDE
    mode = _Passthrough() if through_ops else contextlib.nullcontext()
    try:
        if family == "channel-major":
            launch.STREAM_MAX_BYTES = 0
        launch.FOLD_OVERRIDE = family == "folded"
        if pooled:
            launch.NONTEMPORAL_MIN_BYTES = pool.min_bytes = 0
        with mode:
            assert batchnorm.route.eager(x) is not through_ops
            y = batchnorm.functional.batch_norm(
                x, running_mean, running_var, weight, bias, training=True, momentum=0.3, axis=axis
            )
            y.backward(dy)
            y_eval = batchnorm.functional.batch_norm(
                x.detach(), running_mean, running_var, weight.detach(), bias.detach(), training=False, axis=axis
            )
    finally:
        launch.STREAM_MAX_BYTES, launch.NONTEMPORAL_MIN_BYTES, pool.min_bytes = limits
        launch.FOLD_OVERRIDE = fold

    values = x.detach()
    y_ref, mu, var = oracle.train_forward(values, weight, bias, axis=axis)
    dx_ref, dw_ref, db_ref = oracle.train_backward(dy, values, weight, axis=axis)
    rm_ref, rv_ref = oracle.running_update(rm0, rv0, mu, var, values.numel() // channels, 0.3)
    # parameter gradients and buffers: float32 sums, rounded once more in a half-precision layer
    data, computed = ORACLE_TOLERANCE[dtype], ORACLE_TOLERANCE[layer]
    # dx's own magnitude: gamma / sqrt(var + eps) times dy, large when a channel's values are close
    dx_scale = float((weight.detach().double() / torch.sqrt(var + 1e-5)).max() * dy.double().abs().max())
    assert y.dtype == dtype and x.grad.dtype == dtype and y.shape == x.shape
    assert weight.grad.dtype == bias.grad.dtype == running_mean.dtype == running_var.dtype == layer
    torch.testing.assert_close(y.double(), y_ref, **data)
    torch.testing.assert_close(x.grad.double(), dx_ref, rtol=data["rtol"], atol=data["atol"] * max(1.0, dx_scale))
    # the per-channel sums against the sums of their terms' sizes: float32 statistics (the
    # mean rounded to float32 as torch stores it) shift every term of sum(dy * xhat) a little
    others = [d for d in range(rank) if d != channel]
    xhat = (y_ref - expand_channels(bias, rank, channel)) / expand_channels(weight, rank, channel)
    dw_size = (dy.double() * xhat).abs().sum(others)
    assert_sums_close(weight.grad, dw_ref, dw_size, computed)
    assert_sums_close(bias.grad, db_ref, dy.double().abs().sum(others), computed)
    torch.testing.assert_close(running_mean.double(), rm_ref, **computed)
    torch.testing.assert_close(running_var.double(), rv_ref, **computed)
    y_eval_ref = oracle.eval_forward(values, running_mean, running_var, weight, bias, axis=axis)
    torch.testing.assert_close(y_eval.double(), y_eval_ref, **data)
