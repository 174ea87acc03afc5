"""Population statistics (Algorithm 2): both estimators, split invariance, restored state."""

import pytest
import torch

import batchnorm
from batchnorm import population_statistics


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        batchnorm.BatchNorm1d(8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 4),
        torch.nn.BatchNorm1d(4),  # torch's layer too
    )


def _split(data, sizes):
    out, start = [], 0
    for size in sizes:
        out.append(data[start : start + size])
        start += size
    return out


def test_exact_is_split_invariant_and_matches_one_batch():
    """The first layer's inputs do not depend on the batch; later layers see batch-normalized
    activations, as in training (Algorithm 2), so only the first is split-invariant."""
    data = torch.randn(128, 6) * 3 + 1
    whole, pieces = _model(), _model()
    population_statistics(whole, [data], estimator="exact")
    population_statistics(pieces, _split(data, [2, 2, 4, 8, 16, 32, 64]), estimator="exact")
    torch.testing.assert_close(whole[1].running_mean, pieces[1].running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole[1].running_var, pieces[1].running_var, rtol=1e-5, atol=1e-6)
    paper = _model()
    population_statistics(paper, _split(data, [2, 2, 4, 8, 16, 32, 64]), estimator="paper")
    assert not torch.allclose(paper[1].running_var, whole[1].running_var, rtol=1e-2)


def test_exact_equals_statistics_of_first_layer_inputs():
    data = torch.randn(100, 6, dtype=torch.float64)
    model = _model().double()
    population_statistics(model, _split(data, [10, 30, 60]), estimator="exact")
    with torch.no_grad():
        inputs = model[0](data)
    torch.testing.assert_close(model[1].running_mean, inputs.mean(0))
    torch.testing.assert_close(model[1].running_var, inputs.var(0))  # unbiased


def test_paper_estimator_formula():
    data = torch.randn(60, 6, dtype=torch.float64)
    batches = _split(data, [20, 40])
    model = _model().double()
    population_statistics(model, batches, estimator="paper")
    with torch.no_grad():
        stats = [model[0](b) for b in batches]
    mean = (20 * stats[0].mean(0) + 40 * stats[1].mean(0)) / 60
    var = (20 * stats[0].var(0) + 40 * stats[1].var(0)) / 60  # unbiased batch variances, weighted
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)


def test_state_restored_and_weights_unchanged():
    model = _model()
    model.eval()
    model[1].momentum = None
    weights = {k: v.clone() for k, v in model.named_parameters()}
    counters = [m.num_batches_tracked.clone() for m in (model[1], model[4])]
    population_statistics(model, [(torch.randn(16, 6), torch.zeros(16))] * 3, progress=True, max_batches=2)
    assert not any(m.training for m in model.modules())
    assert model[1].momentum is None and model[4].momentum == 0.1
    for name, value in model.named_parameters():
        assert torch.equal(value, weights[name])
    assert [m.num_batches_tracked for m in (model[1], model[4])] == counters


def test_bad_estimator():
    with pytest.raises(ValueError, match=r"^estimator must be one of \['exact', 'paper'\], got estimator='mean'$"):
        population_statistics(_model(), [], estimator="mean")
