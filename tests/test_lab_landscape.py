"""Santurkar et al.'s measures against hand computation on linear least squares (where the
gradient, its change along -g and the ICS step have closed forms), and the promise that a
measure leaves the model, its buffers, its gradients and the random state as they were."""

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm import layers
from batchnorm.lab.landscape import MULTIPLIERS, internal_covariate_shift, landscape, measure


def squared(out, y):
    return 0.5 * ((out - y) ** 2).sum()


def _data(n=12, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(n, k))


def test_landscape_of_least_squares_is_the_closed_form():
    x, y = _data()
    w = np.random.default_rng(1).normal(size=(3, 5))
    model = nn.Linear(5, 3, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w))
    lr = 0.01
    shape = landscape(model, torch.from_numpy(x), torch.from_numpy(y), lr, squared)
    # L(W) = 1/2 ||X W^T - Y||^2, g = (X W^T - Y)^T X; along -eta g the gradient moves by eta g X^T X
    g = (x @ w.T - y).T @ x
    hg = g @ x.T @ x
    etas = [m * lr for m in MULTIPLIERS]
    losses = [0.5 * np.sum((x @ (w - eta * g).T - y) ** 2) for eta in etas]
    changes = [eta * np.linalg.norm(hg) for eta in etas]
    assert shape.steps == pytest.approx(etas)
    assert shape.losses == pytest.approx(losses, rel=1e-10)
    assert shape.gradient_changes == pytest.approx(changes, rel=1e-10)
    assert shape.loss_range == pytest.approx(max(losses) - min(losses), rel=1e-10)
    assert shape.gradient_change == pytest.approx(max(changes), rel=1e-10)
    # a quadratic's effective smoothness is the same at every step: ||H g|| / ||g||
    assert shape.beta_smoothness == pytest.approx(np.linalg.norm(hg) / np.linalg.norm(g), rel=1e-10)


def test_internal_covariate_shift_of_a_two_layer_linear_network():
    x, y = _data(d=4, k=2)
    rng = np.random.default_rng(2)
    w1, w2 = rng.normal(size=(6, 4)), rng.normal(size=(2, 6))
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Linear(6, 2, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w1))
        model[1].weight.copy_(torch.from_numpy(w2))
    lr = 0.003
    shifts = internal_covariate_shift(model, torch.from_numpy(x), torch.from_numpy(y), lr, squared)
    # out = X W1^T W2^T, r = out - Y: dL/dW2 = r^T X W1^T, dL/dW1 = W2^T r^T X
    r = x @ w1.T @ w2.T - y
    g2 = r.T @ x @ w1.T
    moved_w1 = w1 - lr * (w2.T @ r.T @ x)
    g2_after = (x @ moved_w1.T @ w2.T - y).T @ x @ moved_w1.T
    assert [s.layer for s in shifts] == ["1"]  # the first weight has nothing below it
    (shift,) = shifts
    assert shift.distance == pytest.approx(np.linalg.norm(g2 - g2_after), rel=1e-10)
    assert shift.relative == pytest.approx(np.linalg.norm(g2 - g2_after) / np.linalg.norm(g2), rel=1e-10)
    cosine = np.sum(g2 * g2_after) / np.linalg.norm(g2) / np.linalg.norm(g2_after)
    assert shift.cosine == pytest.approx(cosine, rel=1e-10)
    (first,) = internal_covariate_shift(model, torch.from_numpy(x), torch.from_numpy(y), lr, squared, layers=["0"])
    assert first.distance == 0.0 and first.cosine == pytest.approx(1.0)


def _bn_network():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16, bias=False), layers.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(16, 16, bias=False), layers.BatchNorm1d(16), nn.Sigmoid(), nn.Linear(16, 4),
    )  # fmt: skip


def test_measures_leave_the_model_and_the_random_state_as_they_were():
    model = _bn_network().train()
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    numbers = measure(model, x, y, lr=0.1)
    assert set(numbers) == {"loss_range", "gradient_change", "beta_smoothness", "ics_distance", "ics_relative",
                            "ics_cosine"}  # fmt: skip
    assert all(np.isfinite(v) for v in numbers.values())
    assert numbers["loss_range"] > 0 and numbers["gradient_change"] > 0 and -1 <= numbers["ics_cosine"] <= 1
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # weights and running statistics alike
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert model.training


def test_measures_are_repeatable_under_dropout():
    model = _bn_network().train()
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    torch.manual_seed(5)
    first = measure(model, x, y, lr=0.1)
    torch.manual_seed(5)
    assert measure(model, x, y, lr=0.1) == first


def test_bad_arguments_are_named():
    model = _bn_network()
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    with pytest.raises(ValueError, match="lr must be a positive finite number, got lr=0"):
        landscape(model, x, y, 0)
    with pytest.raises(
        ValueError, match="multipliers must be positive finite numbers, got multipliers=\\(1.0, -2.0\\)"
    ):
        landscape(model, x, y, 0.1, multipliers=(1.0, -2.0))
    with pytest.raises(ValueError, match="layers: '2' is not a module of the model with a trainable weight"):
        internal_covariate_shift(model, x, y, 0.1, layers=["1", "2"])  # BN's gamma is a weight; ReLU has none
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        landscape(squared, x, y, 0.1)
