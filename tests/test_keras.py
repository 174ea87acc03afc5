"""keras.py: Keras' arguments and weight lists, against Keras' BatchNormalization written out
in numpy (Keras does not install here): evaluation, one training step's outputs and moving
averages (Keras' biased moving variance by default, torch's unbiased one when asked), and the
weights."""

import re

import numpy as np
import pytest
import torch

import batchnorm


def _keras_eval(x, gamma, beta, moving_mean, moving_variance, epsilon=1e-3):
    """Keras' BatchNormalization(axis=-1) in inference, in numpy."""
    return gamma * (x - moving_mean) / np.sqrt(moving_variance + epsilon) + beta


def _weights(C, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.5, 1.5, C), rng.normal(size=C), rng.normal(size=C), rng.uniform(0.5, 2.0, C)]


@pytest.mark.parametrize("correction", [0, 1])
def test_the_same_arrays_give_keras_outputs_in_eval_and_one_training_step(correction):
    weights = _weights(5)
    # momentum 0.99, epsilon 1e-3, axis -1; correction 0 is the default (Keras')
    options = {} if correction == 0 else {"running_var_correction": 1}
    layer = batchnorm.keras_batch_norm(5, dtype=torch.float64, **options)
    batchnorm.load_keras_weights(layer, weights)
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(8, 4, 5))
    layer.eval()
    np.testing.assert_allclose(
        layer(torch.from_numpy(x)).detach().numpy(), _keras_eval(x, *weights), rtol=1e-12, atol=1e-12
    )
    layer.train()
    y = layer(torch.from_numpy(x)).detach().numpy()
    mean, var = x.mean((0, 1)), x.var((0, 1))  # Keras normalizes with the biased batch variance
    gamma, beta, moving_mean, moving_variance = weights
    np.testing.assert_allclose(y, gamma * (x - mean) / np.sqrt(var + 1e-3) + beta, rtol=1e-12, atol=1e-12)
    m = 8 * 4
    keras_mean = moving_mean * 0.99 + mean * 0.01
    np.testing.assert_allclose(batchnorm.keras_weights(layer)[2], keras_mean, rtol=1e-12)
    # Keras keeps the biased variance; torch's convention (correction 1) the unbiased one
    batch_var = var if correction == 0 else var * m / (m - 1)
    np.testing.assert_allclose(batchnorm.keras_weights(layer)[3], moving_variance * 0.99 + batch_var * 0.01, rtol=1e-12)


@pytest.mark.parametrize("center, scale, names", [(True, False, 3), (False, True, 3), (False, False, 2)])
def test_center_and_scale_apart(center, scale, names):
    layer = batchnorm.keras_batch_norm(4, center=center, scale=scale, dtype=torch.float64).eval()
    assert (layer.weight is not None, layer.bias is not None) == (scale, center)
    gamma, beta, mean, var = _weights(4)
    given = ([gamma] if scale else []) + ([beta] if center else []) + [mean, var]
    assert len(given) == names
    batchnorm.load_keras_weights(layer, given)
    x = np.random.default_rng(2).normal(size=(6, 4))
    expected = _keras_eval(x, gamma if scale else 1.0, beta if center else 0.0, mean, var)
    np.testing.assert_allclose(layer(torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(batchnorm.keras_weights(layer), given, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_bad_weights_are_refused_and_change_nothing():
    layer = batchnorm.keras_batch_norm(3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=re.escape(
            "weights must be the 4 arrays [gamma, beta, moving_mean, moving_variance] of this layer, got 3"
        ),
    ):
        batchnorm.load_keras_weights(layer, _weights(3)[:3])
    with pytest.raises(ValueError, match=re.escape("moving_variance must have shape (3,), got shape (4,)")):
        batchnorm.load_keras_weights(layer, [*_weights(3)[:3], np.ones(4)])
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(
        ValueError, match=re.escape("momentum (Keras' convention) must be a number in [0, 1], got momentum=1.5")
    ):
        batchnorm.keras_batch_norm(3, momentum=1.5)
    assert batchnorm.keras_batch_norm(3).momentum == pytest.approx(0.01) and batchnorm.keras_batch_norm(3).eps == 1e-3
