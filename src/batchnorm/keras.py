"""Keras' conventions for this project's layers, and Keras' weights in and out.

Keras' ``BatchNormalization(axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True)``
differs from torch's layer in its words, not its evaluation:

    Keras momentum m   the weight of the old moving average: torch's momentum is 1 - m
    epsilon            1e-3 by default (torch's eps 1e-5)
    center, scale      beta and gamma, each optional (torch's affine has both or neither)
    axis               -1: channels last
    weights            [gamma, beta, moving_mean, moving_variance] (those that exist, in order)

``keras_batch_norm`` builds this project's ``BatchNorm`` with Keras' arguments and defaults;
``load_keras_weights`` and ``keras_weights`` move Keras' weight list in and out. Evaluation
is then Keras' to float rounding: y = gamma * (x - moving_mean) / sqrt(moving_variance +
epsilon) + beta, and so is training: the layer is built with ``running_var_correction=0``, so
that the moving variance takes the batch's biased variance as Keras and Flax do (torch's
layers take the unbiased one, a factor m/(m-1) for batches of m values per channel).
"""

from __future__ import annotations

import numpy as np
import torch

from .layers import BatchNorm

__all__ = ["keras_batch_norm", "keras_weights", "load_keras_weights"]


def keras_batch_norm(
    num_features: int,
    axis: int = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    center: bool = True,
    scale: bool = True,
    device=None,
    dtype=None,
    running_var_correction: int = 0,
) -> BatchNorm:
    """This project's BatchNorm with Keras' arguments: momentum ``m`` is torch's ``1 - m``; no
    gamma when ``scale`` is False, no beta when ``center`` is False; the moving variance takes
    the biased batch variance (``running_var_correction=0``, Keras'; 1 for torch's unbiased one)."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
        raise ValueError(f"momentum (Keras' convention) must be a number in [0, 1], got momentum={momentum!r}")
    layer = BatchNorm(
        num_features, epsilon, 1.0 - momentum, scale or center, True, device, dtype, bias=center, axis=axis,
        running_var_correction=running_var_correction,
    )  # fmt: skip
    if not scale and center:  # beta without gamma: torch's layer has no such form, ours takes weight None
        layer.register_parameter("weight", None)
    return layer


def _expected(layer) -> list[str]:
    names = [name for name in ("weight", "bias") if getattr(layer, name) is not None]
    return names + ["running_mean", "running_var"]


_KERAS_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def load_keras_weights(layer, weights) -> None:
    """Set ``layer``'s tensors from Keras' list [gamma, beta, moving_mean, moving_variance]
    (gamma and beta where the layer has them); the layer is left as it was on any error."""
    names = _expected(layer)
    weights = list(weights)
    if len(weights) != len(names):
        keras = ", ".join(_KERAS_NAMES[n] for n in names)
        raise ValueError(f"weights must be the {len(names)} arrays [{keras}] of this layer, got {len(weights)}")
    arrays = []
    for name, value in zip(names, weights, strict=True):
        array = np.asarray(value)
        if array.shape != (layer.num_features,):
            raise ValueError(
                f"{_KERAS_NAMES[name]} must have shape ({layer.num_features},), got shape {tuple(array.shape)}"
            )
        arrays.append(array)
    with torch.no_grad():
        for name, array in zip(names, arrays, strict=True):
            target = getattr(layer, name)
            target.copy_(torch.as_tensor(array, dtype=target.dtype, device=target.device))


def keras_weights(layer) -> list[np.ndarray]:
    """``layer``'s tensors as Keras' weight list (numpy arrays): [gamma, beta, moving_mean, moving_variance]."""
    return [getattr(layer, name).detach().cpu().numpy().copy() for name in _expected(layer)]
