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


@pytest.mark.parametrize("estimator", ["exact", "paper"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_batches_are_skipped_counted_and_reported(estimator, bad):
    """A batch with NaN or Inf is left out of every layer's estimate that it reaches (here
    all of them: the value spreads through the first layer), never merged: the result is
    that of the other batches alone, on this project's layer and on torch's; one warning
    gives the counts, and the layers' own per-batch warning is not repeated."""
    torch.manual_seed(1)
    data = torch.randn(200, 6) * 2 + 1
    batches = _split(data, [50, 50, 50, 50])
    poisoned = [b.clone() for b in batches]
    poisoned[1][7, 3] = bad
    poisoned[3][0, 0] = bad
    model, reference = _model(), _model()
    population_statistics(reference, [batches[0], batches[2]], estimator=estimator)
    with pytest.warns(RuntimeWarning) as caught:
        counts = population_statistics(model, poisoned, estimator=estimator)
    messages = [str(w.message) for w in caught]
    assert messages == [
        "population_statistics: batches with NaN or infinite values were skipped, not merged (by layer: '1': 2, '4': 2)"
    ]
    assert counts == {"1": 100, "4": 100}
    assert caught[0].filename == __file__  # the line that called population_statistics
    for name in ("1", "4"):
        ours, expected = model.get_submodule(name), reference.get_submodule(name)
        assert torch.isfinite(ours.running_mean).all() and torch.isfinite(ours.running_var).all()
        torch.testing.assert_close(ours.running_mean, expected.running_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours.running_var, expected.running_var, rtol=1e-6, atol=1e-7)
        assert int(ours.num_batches_tracked) == 0


def test_only_nonfinite_batches_keep_the_running_statistics():
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(50, 6)
    x[0, 0] = float("nan")
    with pytest.warns(Warning) as caught:  # the RuntimeWarning of the skip, a UserWarning for each layer
        counts = population_statistics(model, [x])
    assert counts == {"1": 0, "4": 0}
    assert "skipped, not merged" in str(caught[0].message)
    assert [str(w.message) for w in caught[1:]] == [
        f"population_statistics: layer {name!r} saw no batch; its running statistics are unchanged"
        for name in ("1", "4")
    ]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
