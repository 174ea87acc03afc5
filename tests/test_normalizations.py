"""LayerNorm, GroupNorm, InstanceNorm1d/2d/3d: against torch.nn's modules (outputs, gradients,
running statistics, state_dicts both ways), the formula written out in float64, and gradcheck."""

import pytest
import torch

import batchnorm


def _pair(ours, theirs, seed=0):
    """The same random affine parameters in both."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


CASES = [
    ("layer", lambda: (batchnorm.LayerNorm([6, 5]), torch.nn.LayerNorm([6, 5])), (4, 3, 6, 5)),
    ("layer, no bias", lambda: (batchnorm.LayerNorm(5, bias=False), torch.nn.LayerNorm(5, bias=False)), (7, 5)),
    ("group", lambda: (batchnorm.GroupNorm(3, 6), torch.nn.GroupNorm(3, 6)), (4, 6, 5, 5)),
    ("group 1-D", lambda: (batchnorm.GroupNorm(2, 6, affine=False), torch.nn.GroupNorm(2, 6, affine=False)), (5, 6)),
    ("instance 1d", lambda: (batchnorm.InstanceNorm1d(4), torch.nn.InstanceNorm1d(4)), (3, 4, 9)),
    (
        "instance 2d affine",
        lambda: (batchnorm.InstanceNorm2d(4, affine=True), torch.nn.InstanceNorm2d(4, affine=True)),
        (3, 4, 5, 6),
    ),
    (
        "instance 3d tracked",
        lambda: (
            batchnorm.InstanceNorm3d(4, affine=True, track_running_stats=True),
            torch.nn.InstanceNorm3d(4, affine=True, track_running_stats=True),
        ),
        (2, 4, 3, 4, 5),
    ),
]


@pytest.mark.parametrize("name, make, shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_to_torch(name, make, shape, dtype):
    ours, theirs = make()
    ours, theirs = _pair(ours.to(dtype), theirs.to(dtype))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for step in range(2):
        x = (torch.randn(shape, dtype=dtype) * (step + 2) + step).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        y, y2 = ours(x), theirs(x2)
        torch.testing.assert_close(y, y2, **tol)
        dy = torch.randn_like(y)
        y.backward(dy)
        y2.backward(dy)
        torch.testing.assert_close(x.grad, x2.grad, **tol)
        for (n, p), p2 in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(p.grad, p2.grad, **tol, msg=n)
    for key, value in theirs.state_dict().items():
        if key != "num_batches_tracked":  # ours counts the updates; torch's InstanceNorm leaves it 0
            torch.testing.assert_close(ours.state_dict()[key], value, **tol, msg=key)
    ours.eval(), theirs.eval()
    x = torch.randn(shape, dtype=dtype)
    torch.testing.assert_close(ours(x), theirs(x), **tol)


@pytest.mark.parametrize("name, make, shape", CASES, ids=[c[0] for c in CASES])
def test_state_dicts_load_both_ways(name, make, shape):
    ours, theirs = make()
    _pair(ours, theirs, seed=3)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    fresh_ours, fresh_theirs = make()
    fresh_theirs.load_state_dict(ours.state_dict())
    fresh_ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape)
    torch.testing.assert_close(fresh_ours(x), fresh_theirs(x), rtol=1e-5, atol=1e-5)


def test_group_norm_by_the_formula_and_gradcheck():
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    weight = torch.rand(6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    groups = x.reshape(3, 2, 12)
    mean = groups.mean(2, keepdim=True)
    var = ((groups - mean) ** 2).mean(2, keepdim=True)
    expected = ((groups - mean) / torch.sqrt(var + 1e-5)).reshape(3, 6, 4) * weight[:, None] + bias[:, None]
    torch.testing.assert_close(batchnorm.normalizations.group_norm(x, 2, weight, bias), expected)
    assert torch.autograd.gradcheck(
        lambda x, w, b: batchnorm.normalizations.group_norm(x, 2, w, b), (x.requires_grad_(True), weight, bias)
    )
    assert torch.autograd.gradcheck(
        lambda x, w, b: batchnorm.normalizations.layer_norm(x, (6, 4), w, b),
        (x, torch.rand(6, 4, dtype=torch.float64, requires_grad=True), torch.randn(6, 4, dtype=torch.float64)),
    )


def test_instance_norm_running_update_by_hand_and_unbatched_input():
    layer = batchnorm.InstanceNorm1d(3, momentum=0.5, track_running_stats=True, dtype=torch.float64)
    x = torch.randn(4, 3, 6, dtype=torch.float64) * 3
    layer(x)
    expected_mean = 0.5 * x.mean(2).mean(0)
    expected_var = 0.5 + 0.5 * x.var(2).mean(0)  # the mean of the examples' unbiased variances
    torch.testing.assert_close(layer.running_mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, expected_var, rtol=1e-12, atol=1e-12)
    assert int(layer.num_batches_tracked) == 1
    cumulative = batchnorm.InstanceNorm1d(3, momentum=None, track_running_stats=True, dtype=torch.float64)
    batches = [torch.randn(2, 3, 5, dtype=torch.float64) for _ in range(3)]
    for b in batches:
        cumulative(b)
    torch.testing.assert_close(cumulative.running_mean, sum(b.mean(2).mean(0) for b in batches) / 3)
    theirs = torch.nn.InstanceNorm2d(3)
    single = torch.randn(3, 5, 5)
    torch.testing.assert_close(batchnorm.InstanceNorm2d(3)(single), theirs(single), rtol=1e-5, atol=1e-5)


def test_non_finite_batch_leaves_the_instance_buffers():
    layer = batchnorm.InstanceNorm1d(3, track_running_stats=True)
    x = torch.randn(2, 3, 5)
    x[0, 1, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        layer(x)
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.ones(3))


def test_half_precision_and_compile():
    x = torch.randn(4, 6, 5, 5)
    for ours in (batchnorm.LayerNorm(5), batchnorm.GroupNorm(3, 6), batchnorm.InstanceNorm2d(6)):
        y = ours(x.to(torch.bfloat16))
        assert y.dtype is torch.bfloat16
        torch.testing.assert_close(y.float(), ours(x.to(torch.bfloat16).float()), rtol=2e-2, atol=2e-2)
        compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), ours(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: batchnorm.LayerNorm(5)(torch.randn(3, 4)), RuntimeError, r"expected input with shape \[\*, 5\]"),
        (lambda: batchnorm.GroupNorm(4, 6), ValueError, "divisible by num_groups"),
        (lambda: batchnorm.normalizations.group_norm(torch.randn(2, 6), 4), RuntimeError, "num_groups=4"),
        (lambda: batchnorm.InstanceNorm2d(3, affine=True)(torch.randn(2, 4, 3, 3)), ValueError, "num_features"),
        (lambda: batchnorm.InstanceNorm1d(3)(torch.randn(2, 3, 1)), ValueError, "more than 1 spatial element"),
        (lambda: batchnorm.InstanceNorm2d(3)(torch.randn(2, 3)), ValueError, "expected 3D or 4D input"),
        (lambda: batchnorm.LayerNorm(0), ValueError, "normalized_shape must be positive"),
        (lambda: batchnorm.GroupNorm(2, 4, eps=-1), ValueError, "eps must be a non-negative number"),
        (lambda: batchnorm.InstanceNorm1d(3, momentum=2), ValueError, "momentum must be in"),
    ],
)
def test_bad_arguments_are_refused(call, error, message):
    with pytest.raises(error, match=message):
        call()
