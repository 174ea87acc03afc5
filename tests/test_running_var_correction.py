"""running_var_correction: the biased running variance (Keras', Flax') or torch's unbiased one.

Three ways: torch.nn's layers (correction 1, the default, is theirs to the last rounding),
the update written out in float64 from the batch (correction 0), and every route of this
project (kernels of each layout family, torch's kernel for small inputs, the reference ops
under forward-mode AD, the custom ops under torch.compile), which must agree.
"""

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import batchnorm

from conftest import LAYOUTS, OURS, SHAPES, TORCH


def _expected(x, running_var, momentum, correction, axis=1):
    """One update of running_var from batch ``x``, in float64."""
    dims = [d for d in range(x.dim()) if d != axis]
    x64 = x.double()
    m = x.numel() // x.shape[axis]
    var = x64.var(dim=dims, correction=0) * m / (m - correction)
    return (1 - momentum) * running_var.double() + momentum * var


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_biased_update_equals_the_formula_in_every_layout(rank, dtype, kernel_order):
    for layout in LAYOUTS[rank]:
        x = (torch.randn(SHAPES[rank], dtype=dtype) * 3 + 1).contiguous(memory_format=layout)
        layer = OURS[rank](5, momentum=0.3, dtype=dtype, running_var_correction=0)
        layer.running_var.uniform_(0.5, 2.0)
        before = layer.running_var.clone()
        layer(x)
        tol = dict(rtol=1e-12, atol=0) if dtype is torch.float64 else dict(rtol=2e-6, atol=0)
        torch.testing.assert_close(layer.running_var.double(), _expected(x, before, 0.3, 0), **tol)
        assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("rank", [2, 4])
def test_default_is_torch_unbiased_update(rank):
    x = torch.randn(SHAPES[rank]) * 2
    ours, theirs = OURS[rank](5), TORCH[rank](5)
    assert ours.running_var_correction == 1
    ours(x), theirs(x)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-7)


def test_the_two_corrections_differ_by_m_over_m_minus_1():
    x = torch.randn(6, 5, dtype=torch.float64)  # m = 6: a factor 6/5 on the batch's share
    biased = batchnorm.BatchNorm1d(5, momentum=1.0, dtype=torch.float64, running_var_correction=0)
    unbiased = batchnorm.BatchNorm1d(5, momentum=1.0, dtype=torch.float64)
    biased(x), unbiased(x)
    torch.testing.assert_close(unbiased.running_var, biased.running_var * 6 / 5, rtol=1e-14, atol=0)
    torch.testing.assert_close(biased.running_var, x.var(0, correction=0), rtol=1e-14, atol=0)


def test_every_route_agrees(monkeypatch, routes):
    x = torch.randn(4, 5, 3, 3) * 2 + 1
    results = {}

    def step(name, call):
        layer = batchnorm.BatchNorm2d(5, momentum=0.5, running_var_correction=0)
        call(layer)
        results[name] = layer.running_var.clone()

    step("kernels", lambda layer: layer(x))
    monkeypatch.setattr(batchnorm.crossover, "OVERRIDE", None)  # small inputs: torch's kernel
    step("torch's kernel", lambda layer: layer(x))

    def dual(layer):
        with fwAD.dual_level():
            layer(fwAD.make_dual(x, torch.randn_like(x)))

    step("reference", dual)
    step("compiled", lambda layer: torch.compile(layer, backend="aot_eager", fullgraph=True)(x))
    step("half precision", lambda layer: layer(x.to(torch.bfloat16)))
    assert {
        batchnorm.route.KERNELS_RECORDED,
        batchnorm.route.TORCH,
        batchnorm.route.REFERENCE,
        batchnorm.route.OP,
    } <= set(routes)
    expected = _expected(x, torch.ones(5), 0.5, 0).float()
    for name, value in results.items():
        tol = dict(rtol=2e-2, atol=0) if name == "half precision" else dict(rtol=2e-6, atol=0)
        torch.testing.assert_close(value, expected, **tol, msg=name)


def test_cumulative_average_with_the_biased_variance():
    layer = batchnorm.BatchNorm1d(5, momentum=None, dtype=torch.float64, running_var_correction=0)
    batches = [torch.randn(7, 5, dtype=torch.float64) * (k + 1) for k in range(3)]
    for batch in batches:
        layer(batch)
    expected = sum(b.var(0, correction=0) for b in batches) / 3
    torch.testing.assert_close(layer.running_var, expected, rtol=1e-13, atol=0)


def test_accumulate_and_ghost_take_the_layer_correction():
    x = torch.randn(16, 5, dtype=torch.float64) * 2
    layer = batchnorm.BatchNorm1d(5, momentum=1.0, dtype=torch.float64, running_var_correction=0)
    with batchnorm.accumulate(layer, steps=4):
        for chunk in x.chunk(4):
            layer(chunk)
    torch.testing.assert_close(layer.running_var, x.var(0, correction=0), rtol=1e-12, atol=0)

    ghost = batchnorm.GhostBatchNorm1d(5, virtual_batch_size=4, momentum=1.0, dtype=torch.float64)
    ghost.running_var_correction = 0
    ghost(x)
    chunk_vars = torch.stack([c.var(0, correction=0) for c in x.chunk(4)])
    torch.testing.assert_close(ghost.running_var, chunk_vars.mean(0), rtol=1e-12, atol=0)


def test_convert_keeps_it_and_revert_says_torch_has_none():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3), batchnorm.BatchNorm2d(5, running_var_correction=0), torch.nn.ReLU()
    )
    converted = batchnorm.convert(model)
    fused = [m for m in converted.modules() if isinstance(m, batchnorm.BatchNormAct2d)]
    assert len(fused) == 1 and fused[0].running_var_correction == 0
    x = torch.randn(4, 3, 6, 6)
    converted(x)
    features = model[0](x)
    torch.testing.assert_close(
        fused[0].running_var.double(), _expected(features.detach(), torch.ones(5), 0.1, 0), rtol=2e-6, atol=0
    )
    with pytest.warns(UserWarning, match="running_var_correction=0"):
        reverted = batchnorm.revert(converted)
    assert not any(isinstance(m, batchnorm.BatchNorm2d) for m in reverted.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batchnorm.revert(batchnorm.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(5))))


def test_state_dict_and_repr():
    layer = batchnorm.BatchNorm2d(5, running_var_correction=0)
    assert "running_var_correction=0" in repr(layer)
    assert "running_var_correction" not in repr(batchnorm.BatchNorm2d(5))
    assert set(layer.state_dict()) == set(torch.nn.BatchNorm2d(5).state_dict())


@pytest.mark.parametrize("bad", [2, -1, 0.5, True, "biased", None])
def test_bad_correction_is_refused(bad):
    with pytest.raises(ValueError, match=rf"running_var_correction must be 1 .* or 0 .*, got {bad!r}"):
        batchnorm.BatchNorm2d(5, running_var_correction=bad)
    layer = batchnorm.BatchNorm1d(5)
    before = layer.running_var.clone()
    with pytest.raises(ValueError, match="running_var_correction"):
        batchnorm.functional.update_running_stats(
            layer.running_mean, layer.running_var, layer.num_batches_tracked, torch.zeros(5), torch.ones(5), 4, 0.1,
            bad,
        )  # fmt: skip
    assert torch.equal(layer.running_var, before) and int(layer.num_batches_tracked) == 0
