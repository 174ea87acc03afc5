"""The algorithm written plainly in float64 numpy: the independent oracle of the tests."""

from __future__ import annotations

import numpy as np
import torch


def _channels_last_2d(x: torch.Tensor, axis: int) -> np.ndarray:
    """(m, C) float64 array of the values of each channel."""
    a = x.detach().double().numpy()
    return np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])


def _back(values: np.ndarray, like: torch.Tensor, axis: int) -> torch.Tensor:
    shape = list(np.moveaxis(np.empty(like.shape), axis, -1).shape)
    return torch.from_numpy(np.moveaxis(values.reshape(shape), -1, axis).copy())


def train_forward(x, weight, bias, eps=1e-5, axis=1):
    """Algorithm 1: returns y, mu, biased var (float64)."""
    v = _channels_last_2d(x, axis)
    m = v.shape[0]
    mu = v.sum(0) / m
    var = ((v - mu) ** 2).sum(0) / m
    gamma = np.ones(v.shape[1]) if weight is None else weight.detach().double().numpy()
    beta = np.zeros(v.shape[1]) if bias is None else bias.detach().double().numpy()
    y = gamma * (v - mu) / np.sqrt(var + eps) + beta
    return _back(y, x, axis), torch.from_numpy(mu), torch.from_numpy(var)


def eval_forward(x, running_mean, running_var, weight, bias, eps=1e-5, axis=1):
    v = _channels_last_2d(x, axis)
    gamma = np.ones(v.shape[1]) if weight is None else weight.detach().double().numpy()
    beta = np.zeros(v.shape[1]) if bias is None else bias.detach().double().numpy()
    rm = running_mean.double().numpy()
    rv = running_var.double().numpy()
    return _back(gamma * (v - rm) / np.sqrt(rv + eps) + beta, x, axis)


def train_backward(dy, x, weight, eps=1e-5, axis=1):
    """SPEC's formulas: dx = gamma/sqrt(var+eps)/m * (m*dy - sum dy - xhat*sum(dy*xhat))."""
    v = _channels_last_2d(x, axis)
    g = _channels_last_2d(dy, axis)
    m = v.shape[0]
    mu = v.mean(0)
    var = ((v - mu) ** 2).mean(0)
    xhat = (v - mu) / np.sqrt(var + eps)
    gamma = np.ones(v.shape[1]) if weight is None else weight.detach().double().numpy()
    sum_dy = g.sum(0)
    sum_dy_xhat = (g * xhat).sum(0)
    dx = gamma / np.sqrt(var + eps) / m * (m * g - sum_dy - xhat * sum_dy_xhat)
    return _back(dx, x, axis), torch.from_numpy(sum_dy_xhat), torch.from_numpy(sum_dy)


def running_update(running_mean, running_var, mu, var, m, factor):
    """running = (1 - f) * running + f * batch, the variance made unbiased by m/(m-1)."""
    rm = running_mean.double() * (1 - factor) + factor * mu
    rv = running_var.double() * (1 - factor) + factor * var * m / (m - 1)
    return rm, rv
