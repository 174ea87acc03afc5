"""GhostBatchNorm1d/2d/3d (ghost.py) three ways: the chunk-by-chunk formula in float64, torch's
BatchNorm2d run on each chunk, and BatchNorm itself when the chunk is the batch; the running
statistics by Keras' rule; gradcheck; the refusals."""

import re

import pytest
import torch

import batchnorm
from batchnorm import crossover


@pytest.fixture(params=["torch", "kernels"])
def destination(request, monkeypatch):
    monkeypatch.setattr(crossover, "OVERRIDE", crossover.TOP + 1 if request.param == "torch" else 0)
    return request.param


def _chunk_formula(x, v, weight, bias, eps=1e-5):
    """Each chunk of v examples normalized with its own biased statistics, float64."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    out, means, variances = [], [], []
    for chunk in x.double().split(v):
        mu = chunk.mean(dims, keepdim=True)
        var = ((chunk - mu) ** 2).mean(dims, keepdim=True)
        out.append(weight.double().view(shape) * (chunk - mu) / torch.sqrt(var + eps) + bias.double().view(shape))
        means.append(mu.flatten())
        variances.append(var.flatten())
    return torch.cat(out), torch.stack(means).mean(0), torch.stack(variances).mean(0)


def test_chunks_normalize_alone_and_the_running_statistics_follow_keras(destination):
    torch.manual_seed(0)
    layer = batchnorm.GhostBatchNorm2d(5, virtual_batch_size=4).double()
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, 5))
        layer.bias.copy_(torch.linspace(-1, 1, 5))
    x = torch.randn(12, 5, 3, 3, dtype=torch.float64) * 2 + torch.arange(12.0, dtype=torch.float64).view(12, 1, 1, 1)
    y = layer(x)
    expected, mean, var = _chunk_formula(x, 4, layer.weight, layer.bias)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    m = 4 * 9
    torch.testing.assert_close(layer.running_mean, 0.1 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * var * m / (m - 1), rtol=1e-12, atol=1e-12)
    assert layer.num_batches_tracked.item() == 1
    # against torch's layer run on each chunk: the outputs
    theirs = torch.nn.BatchNorm2d(5).double()
    theirs.load_state_dict({k: v for k, v in layer.state_dict().items()})
    torch.testing.assert_close(y, torch.cat([theirs(chunk) for chunk in x.split(4)]), rtol=1e-12, atol=1e-12)
    layer.eval()  # eval: the running statistics, as BatchNorm
    plain = batchnorm.BatchNorm2d(5).double().eval()
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), plain(x))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_chunk_is_batchnorm(momentum, destination):
    ghost = batchnorm.GhostBatchNorm1d(6, virtual_batch_size=8, momentum=momentum).double()
    plain = batchnorm.BatchNorm1d(6, momentum=momentum).double()
    for _ in range(2):
        x = torch.randn(8, 6, 5, dtype=torch.float64)
        torch.testing.assert_close(ghost(x), plain(x))
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(ghost.state_dict()[key], value)


def test_gradients_by_gradcheck_and_against_the_chunks():
    torch.manual_seed(0)
    layer = batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2, track_running_stats=False).double()
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    g = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    grads = torch.autograd.grad(f(x, w, b), (x, w, b), g)
    theirs = torch.autograd.grad(_chunk_formula(x, 2, w, b)[0], (x, w, b), g)
    for ours, expected in zip(grads, theirs, strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


def test_a_nonfinite_chunk_leaves_the_running_statistics():
    layer = batchnorm.GhostBatchNorm1d(2, virtual_batch_size=2)
    x = torch.randn(4, 2)
    x[3, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        layer(x)
    assert torch.equal(layer.running_mean, torch.zeros(2)) and torch.equal(layer.running_var, torch.ones(2))
    assert layer.num_batches_tracked.item() == 0


def test_refusals_and_the_state_dict():
    with pytest.raises(
        ValueError, match=re.escape("virtual_batch_size must be a positive integer, got virtual_batch_size=0")
    ):
        batchnorm.GhostBatchNorm2d(3, 0)
    layer = batchnorm.GhostBatchNorm2d(3, 4)
    with pytest.raises(
        ValueError,
        match=re.escape("GhostBatchNorm2d(virtual_batch_size=4) needs a batch that it divides, got a batch of 6"),
    ):
        layer(torch.randn(6, 3, 2, 2))
    assert layer.num_batches_tracked.item() == 0
    assert list(layer.state_dict()) == list(torch.nn.BatchNorm2d(3).state_dict())
    assert "virtual_batch_size=4" in repr(layer)


def test_compile_fullgraph():
    layer = batchnorm.GhostBatchNorm2d(3, 2)
    twin = batchnorm.GhostBatchNorm2d(3, 2)
    x = torch.randn(4, 3, 5, 5)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))
    torch.testing.assert_close(twin.running_var, layer.running_var)
