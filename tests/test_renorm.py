"""BatchRenorm1d/2d/3d and BatchRenorm (renorm.py): every output and statistic against a hand
recomputation in float64 (as Keras's renorm test does), equality with BatchNorm while rmax=1
and dmax=0, gradients by gradcheck with r and d held constant, the clipping engaged, the
schedule."""

import re

import pytest
import torch

import batchnorm
from batchnorm import crossover


@pytest.fixture(params=["torch", "kernels"])
def destination(request, monkeypatch):
    monkeypatch.setattr(crossover, "OVERRIDE", crossover.TOP + 1 if request.param == "torch" else 0)
    return request.param


def _by_hand(x, weight, bias, running_mean, running_var, rmax, dmax, momentum, eps=1e-5):
    """The paper's Algorithm 1 of batch renorm, written out in float64 (channels on axis 1)."""
    x = x.double()
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu_b = x.mean(dims)
    sigma_b = torch.sqrt(((x - mu_b.view(shape)) ** 2).mean(dims) + eps)
    sigma = torch.sqrt(running_var.double() + eps)
    r = torch.clamp(sigma_b / sigma, 1 / rmax, rmax)
    d = torch.clamp((mu_b - running_mean.double()) / sigma, -dmax, dmax)
    xhat = (x - mu_b.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
    y = weight.double().view(shape) * xhat + bias.double().view(shape)
    new_mean = running_mean.double() + momentum * (mu_b - running_mean.double())
    new_sigma = sigma + momentum * (sigma_b - sigma)
    return y, new_mean, new_sigma**2 - eps, r, d


def _layer(C, **options):
    layer = batchnorm.BatchRenorm2d(C, warmup_steps=0, rmax_steps=0, dmax_steps=0, momentum=0.1, **options).double()
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, C))
        layer.bias.copy_(torch.linspace(-1, 1, C))
        layer.running_mean.copy_(torch.linspace(-2, 2, C))
        layer.running_var.copy_(torch.linspace(0.05, 9, C))
    return layer


def test_outputs_and_statistics_by_hand_with_the_clipping_engaged(destination):
    torch.manual_seed(0)
    layer = _layer(5, rmax=1.5, dmax=0.5)
    x = torch.randn(8, 5, 4, 4, dtype=torch.float64) * 2 + 1
    y_hand, mean, var, r, d = _by_hand(
        x, layer.weight, layer.bias, layer.running_mean, layer.running_var, 1.5, 0.5, 0.1
    )
    assert ((r == 1.5) | (r == 1 / 1.5)).any() and (d.abs() == 0.5).any()  # clipped channels
    assert ((r < 1.5) & (r > 1 / 1.5)).any()  # and one that is not
    y = layer(x)
    torch.testing.assert_close(y, y_hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, var, rtol=1e-12, atol=1e-12)
    layer.eval()  # BatchNorm's evaluation with the running mean and standard deviation
    sigma = torch.sqrt(var + 1e-5)
    expected = layer.weight.view(1, -1, 1, 1) * (x - mean.view(1, -1, 1, 1)) / sigma.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected + layer.bias.view(1, -1, 1, 1), rtol=1e-10, atol=1e-10)


def test_rmax_1_and_dmax_0_is_batchnorm(destination):
    torch.manual_seed(0)
    renorm = _layer(4, rmax=1.0, dmax=0.0)
    plain = batchnorm.BatchNorm2d(4).double()
    plain.load_state_dict(renorm.state_dict())
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = renorm(a), plain(b)
    torch.testing.assert_close(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(renorm.weight.grad, plain.weight.grad)
    torch.testing.assert_close(renorm.bias.grad, plain.bias.grad)


def test_gradients_hold_r_and_d_constant():
    """gradcheck of the layer, and its gradients against autograd of the hand formula with r and d detached."""
    torch.manual_seed(0)
    layer = _layer(3, rmax=1.2, dmax=0.3)
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, 0.0, -0.2], dtype=torch.float64, requires_grad=True)
    state = {k: v.clone() for k, v in layer.state_dict().items()}

    def f(x, w, b):
        layer.load_state_dict(state)  # the same running statistics for every evaluation
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    # gradcheck perturbs x, and with it r and d, unless they sit on their clips: there they are
    # constant, as the layer's gradient takes them
    clipped = dict(state, running_mean=torch.tensor([10.0, -10.0, 10.0], dtype=torch.float64),
                   running_var=torch.full((3,), 0.01, dtype=torch.float64))  # fmt: skip
    unclipped, state = state, clipped
    assert torch.autograd.gradcheck(f, (x, w, b))
    state = unclipped  # off the clips: against the formula with r and d detached
    g = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    grads = torch.autograd.grad(f(x, w, b), (x, w, b), g)
    shape = (1, -1, 1, 1)
    dims = (0, 2, 3)
    mu = x.mean(dims)
    sigma_b = torch.sqrt(((x - mu.view(shape)) ** 2).mean(dims) + 1e-5)
    sigma = torch.sqrt(state["running_var"] + 1e-5)
    r = (sigma_b / sigma).clamp(1 / 1.2, 1.2).detach()
    d = ((mu - state["running_mean"]) / sigma).clamp(-0.3, 0.3).detach()
    y = w.view(shape) * ((x - mu.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)) + b.view(shape)
    for ours, expected in zip(grads, torch.autograd.grad(y, (x, w, b), g), strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


def test_the_schedule_widens_from_plain_batchnorm():
    layer = batchnorm.BatchRenorm1d(2)  # the paper's: 5k warm-up, rmax 3 at 40k, dmax 5 at 25k
    assert layer.limits(0) == (1.0, 0.0) and layer.limits(5000) == (1.0, 0.0)
    assert layer.limits(22500) == pytest.approx((1.0 + 2 * 17500 / 35000, 5 * 17500 / 20000))
    assert layer.limits(25000) == (pytest.approx(1.0 + 2 * 20000 / 35000), 5.0)
    assert layer.limits(40000) == (3.0, 5.0) and layer.limits(10**6) == (3.0, 5.0)
    x = torch.randn(16, 2)
    layer(x)
    assert layer.num_batches_tracked.item() == 1


def test_a_nonfinite_batch_updates_nothing_and_axis_last():
    layer = batchnorm.BatchRenorm(3, axis=-1, warmup_steps=0, rmax_steps=0, dmax_steps=0)
    x = torch.randn(4, 5, 3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x[0, 0, 1] = float("inf")
    with pytest.warns(RuntimeWarning, match="batch renorm: the training batch's statistics are not finite"):
        layer(x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    y = layer(torch.randn(4, 5, 3) * 3)
    assert y.shape == (4, 5, 3) and layer.num_batches_tracked.item() == 1


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(rmax=0.5), "rmax must be a number >= 1.0, got rmax=0.5"),
        (dict(dmax=-1), "dmax must be a number >= 0.0, got dmax=-1"),
        (dict(momentum=None), "batch renorm needs a momentum in [0, 1] (its running standard deviation), got None"),
        (dict(warmup_steps=10, rmax_steps=5), "rmax_steps must be at least warmup_steps=10, got rmax_steps=5"),
        (dict(warmup_steps=-1), "warmup_steps must be a non-negative integer, got warmup_steps=-1"),
    ],
)
def test_bad_arguments(options, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        batchnorm.BatchRenorm2d(3, **options)


def test_state_dict_is_batchnorms():
    renorm, plain = batchnorm.BatchRenorm2d(3), torch.nn.BatchNorm2d(3)
    assert list(renorm.state_dict()) == list(plain.state_dict())
    renorm.load_state_dict(plain.state_dict())


def test_torch_compile_matches_eager():
    """The schedule reads the step on the host: a graph break, not an error (no fullgraph)."""
    eager, twin = _layer(3, rmax=1.5, dmax=0.5), _layer(3, rmax=1.5, dmax=0.5)
    compiled = torch.compile(twin, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(4, 3, 3, 3, dtype=torch.float64) * 2
        torch.testing.assert_close(compiled(x), eager(x))
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[key], value)
