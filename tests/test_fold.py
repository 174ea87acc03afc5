"""batchnorm.fold and fold_weights (fold.py): the folded weights against torch.nn.utils.fusion
and the formula, and folded models (torch's layers, and converted ones with fused layers)
against the unfolded model in eval, float32, within 1e-5 relative."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import batchnorm
from batchnorm import crossover
from model_zoo import ZOO

# batch norms that do not follow a convolution directly (DenseNet's pre-activation ones)
UNFOLDED = {"densenet121": 7}


@pytest.fixture(autouse=True)
def _torch_kernel(monkeypatch):
    monkeypatch.setattr(crossover, "OVERRIDE", crossover.TOP + 1)


def _trained_statistics(model: nn.Module, seed=0) -> nn.Module:
    """Running statistics, gammas and betas away from their initial values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, batchnorm.layers._BatchNorm)):
                C = module.num_features
                module.running_mean.copy_(torch.randn(C, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(C, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(C, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(C, generator=generator) * 0.2)
    return model.eval()


def _norms(model):
    return [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, batchnorm.layers._BatchNorm))]


def test_fold_weights_is_the_formula_and_torchs():
    torch.manual_seed(0)
    w, b = torch.randn(6, 3, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    mean, var = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.1
    gamma, beta = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    fw, fb = batchnorm.fold_weights(w, b, mean, var, 1e-3, gamma, beta)
    s = gamma / torch.sqrt(var + 1e-3)
    torch.testing.assert_close(fw, w * s.view(6, 1, 1, 1), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(fb, (b - mean) * s + beta, rtol=1e-14, atol=1e-14)
    tw, tb = torch.nn.utils.fusion.fuse_conv_bn_weights(w, b, mean, var, 1e-3, gamma, beta)
    torch.testing.assert_close(fw, tw.detach(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(fb, tb.detach(), rtol=1e-14, atol=1e-14)
    fw, fb = batchnorm.fold_weights(w, None, mean, var, 1e-3)  # no conv bias, no affine
    torch.testing.assert_close(fb, -mean / torch.sqrt(var + 1e-3), rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match=re.escape("running_var must have one value per output channel (6, dim 0")):
        batchnorm.fold_weights(w, b, mean, var[:5], 1e-5)


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("converted", [False, True])
def test_every_family_folds_and_computes_the_same(name, converted):
    make, batch_norms, _ = ZOO[name]
    torch.manual_seed(0)
    model = _trained_statistics(make())
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    source = batchnorm.convert(model).eval() if converted else model
    folded = batchnorm.fold(source)
    assert isinstance(folded, fx.GraphModule) and not folded.training
    assert len(_norms(folded)) == UNFOLDED.get(name, 0)
    assert len(_norms(model)) == batch_norms  # the input is left as it was
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


def test_training_mode_is_refused_and_nothing_changes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=re.escape("fold needs a model in eval mode (call model.eval() first)")):
        batchnorm.fold(model)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match=re.escape("fold needs every batch norm in eval mode: 1 (BatchNorm2d) is in")):
        batchnorm.fold(model)
    assert type(model[1]) is nn.BatchNorm2d and model[1].training


class _Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.unstated = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))

    def forward(self, x):
        x = self.features(x)
        if x.sum() > 0:
            x = -x
        return F.relu(self.unstated(x))


@pytest.mark.parametrize("converted", [False, True])
def test_a_model_that_does_not_trace_folds_its_sequential_neighbours(converted):
    torch.manual_seed(0)
    model = _Branching()
    _trained_statistics(model.features)  # the other batch norm has no running statistics
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    if converted:
        with pytest.warns(UserWarning, match="does not trace"):
            model = batchnorm.convert(model).eval()
    with pytest.warns(UserWarning, match=re.escape("batchnorm.fold: _Branching does not trace with torch.fx")):
        folded = batchnorm.fold(model)
    assert [type(m) for m in folded.features] == [nn.Conv2d, nn.Identity, nn.ReLU, nn.Conv2d]
    assert isinstance(folded.unstated[1], (nn.BatchNorm2d, batchnorm.BatchNorm2d))  # batch statistics in eval
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


def test_a_fused_layer_keeps_its_residual_and_activation():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = batchnorm.BatchNormAct2d(4, "leaky_relu", negative_slope=0.2)

        def forward(self, x):
            return self.bn(self.conv(x), x)

    block = _trained_statistics(Block())
    x = torch.randn(2, 4, 5, 5)
    folded = batchnorm.fold(block)
    targets = [node.target for node in folded.graph.nodes if node.op == "call_function"]
    assert targets == [batchnorm.functional.activate] and not _norms(folded)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), block(x), rtol=1e-5, atol=1e-5)
