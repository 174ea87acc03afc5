"""The layers on a CUDA device (the torch-ops path of ops.py) against torch's layers on the same
device, the float64 oracle and gradcheck. Skipped where there is no CUDA device (as in CI);
run where there is one."""

import warnings

import pytest
import torch

import batchnorm

import oracle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
MODULES = {
    3: (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d),
    4: (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d),
    5: (batchnorm.BatchNorm3d, torch.nn.BatchNorm3d),
}
SHAPES = {3: (16, 6, 20), 4: (8, 6, 7, 5), 5: (4, 6, 3, 4, 5)}


def _pair(rank, dtype=torch.float32, **options):
    ours_type, theirs_type = MODULES[rank]
    ours = ours_type(6, **options).to(CUDA, dtype)
    theirs = theirs_type(6, **options).to(CUDA, dtype)
    if ours.weight is not None:
        with torch.no_grad():
            for module in (ours, theirs):
                module.weight.copy_(torch.linspace(0.5, 1.5, 6))
                module.bias.copy_(torch.linspace(-1, 1, 6))
    return ours, theirs


@pytest.mark.parametrize("rank,layout", [(3, "contiguous"), (4, "contiguous"), (4, "channels_last"), (5, "contiguous")])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_matches_torch_on_cuda_over_steps(rank, layout, momentum, affine, track):
    """Three training steps and an eval step: outputs (device, layout), input and parameter
    gradients, running statistics and num_batches_tracked as torch's layer on the device."""
    ours, theirs = _pair(rank, momentum=momentum, affine=affine, track_running_stats=track)
    generator = torch.Generator(CUDA).manual_seed(0)
    for _ in range(3):
        x = torch.randn(SHAPES[rank], device=CUDA, generator=generator) * 3 + 2
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(x.shape, device=CUDA, generator=generator)
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_ours, y_theirs = ours(a), theirs(b)
        assert y_ours.device == x.device and y_ours.stride() == x.stride()
        torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
        y_ours.backward(dy)
        y_theirs.backward(dy)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
        if affine:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-4)
    for key, value in theirs.state_dict().items():
        assert ours.state_dict()[key].device == value.device, key
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    ours.eval(), theirs.eval()
    x = torch.randn(SHAPES[rank], device=CUDA, generator=generator) * 3 + 2
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_against_the_float64_oracle_on_cuda():
    """Output, statistics and the input gradient on the device against the algorithm in float64."""
    x = (torch.randn(32, 5, 6, 6, dtype=torch.float64) * 2 + 1).to(CUDA)
    weight, bias = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    module = batchnorm.BatchNorm2d(5, momentum=1.0).to(CUDA, torch.float64)
    with torch.no_grad():
        module.weight.copy_(weight), module.bias.copy_(bias)
    leaf = x.clone().requires_grad_(True)
    y = module(leaf)
    dy = torch.randn_like(x)
    y.backward(dy)
    y_ref, mu, var = oracle.train_forward(x.cpu(), weight, bias)
    m = x.numel() // 5
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module.running_mean.cpu(), mu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module.running_var.cpu(), var * m / (m - 1), rtol=1e-10, atol=1e-12)
    dx_ref = oracle.train_backward(dy.cpu(), x.cpu(), weight)[0]
    torch.testing.assert_close(leaf.grad.cpu(), dx_ref, rtol=1e-9, atol=1e-10)


def test_large_offset_variance_on_cuda():
    """Mean 1e4, standard deviation 1, float32 on the device: the variance to 1e-3 relative."""
    x = torch.randn(64, 3, 16, 16, dtype=torch.float64) + 1e4
    module = batchnorm.BatchNorm2d(3, momentum=1.0).to(CUDA)
    module(x.float().to(CUDA))
    _, _, var = oracle.train_forward(x.float(), None, None)
    m = x.numel() // 3
    torch.testing.assert_close(module.running_var.cpu().double(), var * m / (m - 1), rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_data_through_float32_layers_on_cuda(dtype):
    """Half data through float32 parameters and buffers (as under autocast): output and input
    gradient in the data's dtype, as torch's layer; dgamma and dbeta against the float64
    oracle, since torch's CUDA layer sums them less exactly in bfloat16 (0.2 off on sums near
    1.5 here); running statistics in float32."""
    ours, theirs = _pair(4)
    generator = torch.Generator(CUDA).manual_seed(0)
    x = (torch.randn(16, 6, 8, 8, device=CUDA, generator=generator) * 2 + 1).to(dtype)
    dy = torch.randn(x.shape, device=CUDA, generator=generator).to(dtype)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours, y_theirs = ours(a), theirs(b)
    assert y_ours.dtype == dtype
    torch.testing.assert_close(y_ours.float(), y_theirs.float(), rtol=2e-2, atol=2e-2)
    y_ours.backward(dy), y_theirs.backward(dy)
    assert a.grad.dtype == dtype
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=2e-2, atol=2e-2)
    weight = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    _, dgamma, dbeta = oracle.train_backward(dy.cpu(), x.cpu(), weight)
    torch.testing.assert_close(ours.weight.grad.cpu().double(), dgamma, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad.cpu().double(), dbeta, rtol=1e-4, atol=1e-4)
    assert ours.running_var.dtype == torch.float32
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-3, atol=1e-3)


def test_nonfinite_batch_on_cuda_leaves_the_running_statistics():
    """As on the CPU, a NaN or Inf batch leaves every buffer as it was; on the device without
    a host sync, so without the CPU's warning (docs/api.md, "Where this differs from torch, on purpose")."""
    module = batchnorm.BatchNorm2d(3).to(CUDA)
    module(torch.randn(4, 3, 2, 2, device=CUDA))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4, 3, 2, 2, device=CUDA)
        x[1, 2, 0, 1] = bad
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            y = module(x)
        assert torch.isfinite(y[:, :2]).all()
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]), key
    module(torch.randn(4, 3, 2, 2, device=CUDA))  # a finite batch updates again
    assert int(module.num_batches_tracked) == 2


def test_gradcheck_and_gradgradcheck_on_cuda():
    x = torch.randn(6, 3, 4, 2, dtype=torch.float64, device=CUDA, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, device=CUDA, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, device=CUDA, requires_grad=True)

    def f(x, weight, bias):
        return batchnorm.functional.batch_norm(x, None, None, weight, bias, training=True)

    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradgradcheck(f, (x, weight, bias))


def test_state_dict_moves_between_devices_and_torch():
    """A checkpoint of our CUDA layer loads into torch's CPU layer and back, values intact."""
    ours, _ = _pair(4)
    ours(torch.randn(8, 6, 5, 5, device=CUDA))
    theirs = torch.nn.BatchNorm2d(6)
    theirs.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value.cpu()), key
    back = batchnorm.BatchNorm2d(6).to(CUDA)
    back.load_state_dict(theirs.state_dict())
    assert back.running_var.device.type == "cuda" and torch.equal(back.running_var, ours.running_var)


def test_compile_fullgraph_on_cuda():
    """torch.compile(fullgraph=True) of a model with the layer, on the device: the same
    output, gradients and running statistics as eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), batchnorm.BatchNorm2d(6), torch.nn.ReLU()).to(CUDA)
    twin = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), batchnorm.BatchNorm2d(6), torch.nn.ReLU()).to(CUDA)
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(twin, fullgraph=True)
    x = torch.randn(8, 3, 10, 10, device=CUDA)
    y, y_compiled = model(x), compiled(x)
    torch.testing.assert_close(y_compiled, y, rtol=1e-5, atol=1e-5)
    y.sum().backward(), y_compiled.sum().backward()
    torch.testing.assert_close(twin[0].weight.grad, model[0].weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(twin[1].running_var, model[1].running_var, rtol=1e-5, atol=1e-6)
    assert int(twin[1].num_batches_tracked) == 1


def test_population_statistics_on_cuda():
    """Algorithm 2 on a CUDA model: the exact estimator gives the float64 mean and unbiased
    variance of the layer's inputs over all batches, whatever the split."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(batchnorm.BatchNorm1d(4)).to(CUDA)
    data = torch.randn(128, 4, device=CUDA) * 3 + 5
    sizes = [2, 2, 4, 8, 16, 32, 64]
    batches = list(torch.split(data, sizes))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batchnorm.population_statistics(model, batches, estimator="exact")
    values = data.double()
    torch.testing.assert_close(model[0].running_mean.double(), values.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model[0].running_var.double(), values.var(0), rtol=1e-5, atol=1e-6)
    assert model[0].training
