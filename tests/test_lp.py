"""lp batch norm: l2 against this project's BatchNorm (and so torch's), l1 and linf against the
formulas written out in float64 (outputs, running statistics), gradcheck, and evaluation as
BatchNorm's with the running s^2."""

import pytest
import torch

import batchnorm


def _spread(x, norm):
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dims, keepdim=True)
    deviation = (x - mean).abs()
    if norm == "l1":
        s = deviation.mean(dims)
    elif norm == "linf":
        s = deviation.amax(dims)
    else:
        s = deviation.square().mean(dims).sqrt()
    return mean.flatten(), s


@pytest.mark.parametrize("norm", ["l1", "linf"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_l1_and_linf_by_the_formula(norm, layout):
    layer = batchnorm.LpBatchNorm2d(5, norm=norm, momentum=0.25, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    x = (torch.randn(4, 5, 3, 3, dtype=torch.float64) * 2 + 1).contiguous(memory_format=layout)
    y = layer(x)
    mean, s = _spread(x, norm)
    view = (1, 5, 1, 1)
    expected = (x - mean.view(view)) / torch.sqrt(s.view(view) ** 2 + 1e-5) * layer.weight.view(view) + layer.bias.view(
        view
    )
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_mean, 0.25 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, 0.75 + 0.25 * s**2, rtol=1e-12, atol=1e-12)
    assert int(layer.num_batches_tracked) == 1
    layer.eval()  # BatchNorm's evaluation with the running s^2
    plain = batchnorm.BatchNorm2d(5, dtype=torch.float64).eval()
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["l1", "linf"])
def test_gradcheck(norm):
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    p = batchnorm.torch_stats.NORMS[norm]

    def f(x, weight, bias):
        return batchnorm.functional.normalize(x, None, None, weight, bias, True, 0.1, 1e-5, 1, None, p=p)

    assert torch.autograd.gradcheck(f, (x, weight, bias))


def test_l2_is_batch_norm():
    x = torch.randn(8, 4, 5, 5)
    lp, plain = batchnorm.LpBatchNorm2d(4, norm="l2"), batchnorm.BatchNorm2d(4)
    torch.testing.assert_close(lp(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(lp.running_var, plain.running_var, rtol=0, atol=0)
    mean, s = _spread(x.double(), "l2")
    torch.testing.assert_close(plain.running_var.double(), 0.9 + 0.1 * s**2 * 200 / 199, rtol=1e-6, atol=0)


def test_axis_form_compile_convert_and_state_dict():
    layer = batchnorm.LpBatchNorm(4, norm="l1", axis=-1)
    x = torch.randn(6, 7, 4)
    reference = batchnorm.LpBatchNorm1d(4, norm="l1")
    torch.testing.assert_close(layer(x), reference(x.transpose(1, 2)).transpose(1, 2), rtol=1e-6, atol=1e-6)
    compiled_layer = batchnorm.LpBatchNorm1d(4, norm="linf")
    eager = batchnorm.LpBatchNorm1d(4, norm="linf")
    x2 = torch.randn(6, 4)
    torch.testing.assert_close(torch.compile(compiled_layer, backend="aot_eager")(x2), eager(x2))
    torch.testing.assert_close(compiled_layer.running_var, eager.running_var)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), batchnorm.LpBatchNorm1d(4, norm="l1"), torch.nn.ReLU())
    converted = batchnorm.convert(model)
    kept = [m for m in converted.modules() if isinstance(m, batchnorm.LpBatchNorm1d)]
    assert len(kept) == 1 and kept[0].p == 1  # not fused away into a plain fused layer
    assert not any(isinstance(m, batchnorm.BatchNormAct1d) for m in converted.modules())
    assert set(layer.state_dict()) == set(torch.nn.BatchNorm1d(4).state_dict())
    assert "norm='l1'" in repr(layer)


def test_bad_norm_and_one_value_are_refused():
    with pytest.raises(ValueError, match="norm must be one of 'l1', 'l2', 'linf', got norm='l3'"):
        batchnorm.LpBatchNorm2d(4, norm="l3")
    layer = batchnorm.LpBatchNorm1d(4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.randn(1, 4))
    assert int(layer.num_batches_tracked) == 0
