"""batchnorm.inspect (health.py): the numbers it reports against hand computation on models
built to show each finding, and the model left exactly as it was."""

import re

import pytest
import torch
from torch import nn

import batchnorm


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), batchnorm.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3))


def test_a_settled_model_has_no_findings_and_its_state_is_untouched():
    model = _model()
    data = [torch.randn(64, 4) for _ in range(5)]
    with torch.no_grad():  # settle the running statistics on the same data
        for _ in range(50):
            for x in data:
                model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = batchnorm.inspect(model, data)
    assert [h.name for h in report.layers] == ["1", "4"] and [h.kind for h in report.layers] == ["BatchNorm1d"] * 2
    assert all(not h.findings for h in report.layers), str(report)
    assert all(h.train_eval_gap < 0.5 and h.mean_drift < 0.25 for h in report.layers)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.training and all(m.training for m in model.modules())
    assert "No findings." in str(report)


def test_each_finding_and_its_numbers():
    model = _model()
    with torch.no_grad():
        model[1].weight[2] = 0.0  # a channel switched off
        model[4].running_mean.fill_(5.0)  # running statistics far from the data
    model[4].eval()  # left in eval mode while the model trains
    data = [(torch.randn(32, 4), torch.zeros(32)) for _ in range(3)]
    report = batchnorm.inspect(model, data, max_batches=2)
    first, second = report.layers
    assert first.dead_channels == 1 and any("|gamma| < 1e-3" in f for f in first.findings)
    assert any("in eval mode while the model trains" in f for f in second.findings)
    assert any("batchnorm.population_statistics" in f for f in second.findings)
    # the drift by hand: population statistics of the second layer's input over the two batches, in eval
    model.eval()
    with torch.no_grad():
        inputs = torch.cat([model[3](model[2](model[1](model[0](x)))) for x, _ in data[:2]]).double()
    var, mean = torch.var_mean(inputs, 0, correction=0)
    expected = ((5.0 - mean).abs() / torch.sqrt(var + 1e-5)).max().item()
    assert second.mean_drift == pytest.approx(expected, rel=1e-9)
    assert "| 4 | BatchNorm1d | 0.1 | eval |" in str(report)


def test_small_batches_show_the_train_eval_gap():
    model = _model()
    report = batchnorm.inspect(model.eval(), [torch.randn(2, 4) * 3 + 1 for _ in range(4)])
    assert report.layers[0].train_eval_gap > 0.5 and any("batches too small" in f for f in report.layers[0].findings)
    assert not model.training  # the eval mode it came in


def test_bad_arguments():
    with pytest.raises(ValueError, match=re.escape("inspect needs at least one batch, got none")):
        batchnorm.inspect(_model(), [])
    with pytest.raises(TypeError, match=re.escape("model must be a torch.nn.Module, got str")):
        batchnorm.inspect("model", [])


def test_a_layer_with_its_channels_last_is_read_on_its_axis():
    """BatchNorm(axis=-1): the population statistics over every axis but the last."""
    torch.manual_seed(0)
    layer = batchnorm.BatchNorm(3, axis=-1)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([1.0, 0.0, -1.0]))
    data = [torch.randn(4, 5, 3) * 2 for _ in range(2)]
    report = batchnorm.inspect(nn.Sequential(layer), data)
    values = torch.cat(data).double().reshape(-1, 3)
    var, mean = torch.var_mean(values, 0, correction=0)
    expected = ((layer.running_mean.double() - mean).abs() / torch.sqrt(var + 1e-5)).max().item()
    assert report.layers[0].mean_drift == pytest.approx(expected, rel=1e-9)
