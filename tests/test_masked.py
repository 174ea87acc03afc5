"""Masked batch norm (layer(x, mask=...)): statistics over the unmasked positions only.

Three ways: torch.nn.BatchNorm1d on the unmasked positions gathered into (M, C) (outputs,
gradients, running statistics), the formula written out in float64 with gradcheck, and an
all-True mask against the unmasked call on this project's kernels.
"""

import pytest
import torch

import batchnorm


def _data(N=4, C=3, L=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, L, generator=g, dtype=dtype) * 2 + 1
    lengths = torch.tensor([9, 5, 7, 2])[:N]
    mask = torch.arange(L)[None, :] < lengths[:, None]  # padded sequences: (N, L)
    x = torch.where(mask[:, None, :], x, torch.full_like(x, 1e3))  # padding far from the data
    return x, mask


def test_equals_torch_on_the_gathered_positions():
    x, mask = _data()
    ours = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    theirs = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
        theirs.load_state_dict(ours.state_dict())
    x1 = x.clone().requires_grad_(True)
    y = ours(x1, mask=mask)
    gathered = x.detach().permute(0, 2, 1)[mask].clone().requires_grad_(True)  # (M, C)
    expected = theirs(gathered)
    torch.testing.assert_close(y.permute(0, 2, 1)[mask], expected, rtol=1e-12, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-12, atol=1e-12)
    # a loss on the unmasked outputs only: the gradients of torch's gathered computation
    g = torch.randn_like(expected)
    (y.permute(0, 2, 1)[mask] * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(x1.grad.permute(0, 2, 1)[mask], gathered.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x1.grad.permute(0, 2, 1)[~mask], torch.zeros(int((~mask).sum()), 3, dtype=x.dtype))
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-10, atol=1e-12)


def test_masked_positions_by_the_formula_and_gradcheck():
    x, mask = _data()
    x = x / 1e3 + torch.where(mask[:, None, :], 0.0, 5.0)  # padding values of the same order
    w = mask[:, None, :].double()
    m = w.sum() / 1  # values per channel
    mean = (x * w).sum((0, 2)) / m
    var = (w * (x - mean[None, :, None]) ** 2).sum((0, 2)) / m
    layer = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    y = layer(x, mask=mask)
    expected = (x - mean[None, :, None]) / torch.sqrt(var[None, :, None] + 1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)  # the masked positions too

    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, weight, bias):
        return batchnorm.functional.batch_norm(x, None, None, weight, bias, True, mask=mask)

    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True), weight, bias))
    # a masked position's gradient is weight * invstd * dy, nothing through the statistics
    x2 = x.clone().requires_grad_(True)
    dy = torch.randn_like(x)
    f(x2, weight, bias).backward(dy)
    direct = (weight / torch.sqrt(var + 1e-5))[None, :, None] * dy
    torch.testing.assert_close(x2.grad.permute(0, 2, 1)[~mask], direct.detach().permute(0, 2, 1)[~mask])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_all_true_mask_equals_no_mask(layout):
    x = torch.randn(8, 5, 6, 6).contiguous(memory_format=layout)
    plain, masked = batchnorm.BatchNorm2d(5), batchnorm.BatchNorm2d(5)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    dy = torch.randn_like(x)
    plain(x1).backward(dy)
    masked(x2, mask=torch.ones(8, 1, 1, dtype=torch.bool)).backward(dy)  # broadcasts to (8, 6, 6)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(masked.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-4)


def test_eval_ignores_the_mask():
    x, mask = _data(dtype=torch.float32)
    layer = batchnorm.BatchNorm1d(3)
    layer(x / 1e3)
    layer.eval()
    torch.testing.assert_close(layer(x, mask=mask), layer(x), rtol=0, atol=0)


def test_half_precision_and_channels_last_axis():
    x, mask = _data(dtype=torch.float32)
    reference = batchnorm.BatchNorm(3, axis=-1)
    half = batchnorm.BatchNorm(3, axis=-1)
    xl = x.permute(0, 2, 1).contiguous()  # (N, L, C), mask (N, L)
    y = reference(xl, mask=mask)
    yh = half(xl.to(torch.bfloat16), mask=mask)
    assert yh.dtype is torch.bfloat16
    torch.testing.assert_close(yh.float()[mask], y[mask], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(half.running_mean, reference.running_mean, rtol=1e-2, atol=1e-2)


def test_compile_and_accumulate():
    x, mask = _data(dtype=torch.float32)
    eager, compiled_layer = batchnorm.BatchNorm1d(3), batchnorm.BatchNorm1d(3)
    compiled = torch.compile(compiled_layer, backend="aot_eager")
    torch.testing.assert_close(compiled(x, mask=mask), eager(x, mask=mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_layer.running_var, eager.running_var, rtol=1e-6, atol=1e-7)

    layer = batchnorm.BatchNorm1d(3, momentum=1.0, dtype=torch.float64)
    x64 = x.double()
    with batchnorm.accumulate(layer, steps=2):
        layer(x64[:2], mask=mask[:2])
        layer(x64[2:], mask=mask[2:])
    gathered = x64.permute(0, 2, 1)[mask]
    torch.testing.assert_close(layer.running_mean, gathered.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, gathered.var(0), rtol=1e-12, atol=1e-12)


def test_a_model_with_a_mask_converts_and_traces():
    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(3, 4, 3, padding=1)
            self.bn = batchnorm.BatchNorm1d(4)

        def forward(self, x, mask):
            return torch.relu(self.bn(self.conv(x), mask))

    model = Tagger()
    x, mask = _data(dtype=torch.float32)
    converted = batchnorm.convert(model)
    torch.testing.assert_close(converted(x, mask), model(x, mask), rtol=1e-5, atol=1e-5)
    traced = torch.fx.symbolic_trace(model)
    call = [n for n in traced.graph.nodes if n.op == "call_module" and n.target == "bn"]
    assert len(call) == 1 and len(call[0].args) == 2


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(4, 9), "mask must be a torch.bool tensor, got torch.float32"),
        (torch.ones(4, 3, 9, dtype=torch.bool), r"without its channel axis 1, \(4, 9\)"),
        (torch.ones(5, 9, dtype=torch.bool), r"got mask of shape \(5, 9\)"),
        (torch.zeros(4, 9, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True)[:, :] & False, "got 0"),
        ([[True] * 9] * 4, "mask must be a torch.bool tensor, got list"),
    ],
)
def test_bad_masks_are_refused_and_change_nothing(mask, message):
    x, _ = _data(dtype=torch.float32)
    layer = batchnorm.BatchNorm1d(3)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        layer(x, mask=mask)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_one_unmasked_value_is_refused():
    x, _ = _data(dtype=torch.float32)
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[0, 0] = True
    with pytest.raises(ValueError, match="more than 1 unmasked value per channel when training, got 1"):
        batchnorm.BatchNorm1d(3)(x, mask=mask)
