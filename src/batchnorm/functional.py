"""Stateless batch normalization with torch's signature, plus the channel axis.

    batch_norm(input, running_mean, running_var, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, axis=1)

Training (Algorithm 1), per channel c over the m values of the batch:

    mu   = (1/m) sum x_i
    var  = (1/m) sum (x_i - mu)^2                      biased: used to normalize
    y_i  = gamma * (x_i - mu) / sqrt(var + eps) + beta
    running_mean = (1 - momentum) * running_mean + momentum * mu
    running_var  = (1 - momentum) * running_var  + momentum * var * m/(m-1)   unbiased

Evaluation: y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta.

``momentum`` is the weight of the new batch (torch's convention, 0.1); Keras and
Flax call ``1 - momentum`` their momentum (0.99). ``momentum=None`` gives the
cumulative average, factor 1/num_batches_tracked, and needs ``num_batches_tracked``.
``axis`` is the channel axis: 1 as in torch, -1 for (N, ..., C) data as Keras lays it out.

Where this differs from torch, on purpose:
- a training batch with NaN or infinite values leaves running_mean, running_var and
  num_batches_tracked unchanged, with a RuntimeWarning on the CPU (torch writes NaN
  into them and every later evaluation is NaN);
- an empty batch leaves them unchanged too, num_batches_tracked included;
- bad arguments raise errors that name the argument, its value and what is allowed.
"""

from __future__ import annotations

import numbers

import torch

from . import epilogue as epilogues
from . import ops, route, synced, torch_stats
from .kernels import reference

Tensor = torch.Tensor

__all__ = [
    "batch_statistics",
    "update_running_stats",
    "activate",
    "batch_norm",
    "check_channel_tensors",
    "check_eps",
    "check_input",
    "check_correction",
    "check_momentum",
    "check_options",
    "normalize",
]


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_momentum(momentum: float | None) -> None:
    """None (the cumulative average) or a number in [0, 1]; stricter than torch, which takes any
    number (a momentum of 2 extrapolates the running averages past the batch)."""
    if momentum is None:
        return
    if not _real(momentum):
        raise TypeError(f"momentum must be a number in [0, 1] or None, got momentum={momentum!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got momentum={momentum!r}")


def check_correction(correction: int) -> None:
    """The running variance's Bessel correction, torch.var's word: 1 (the unbiased var, torch's
    layers) or 0 (the biased var, Keras' and Flax')."""
    if isinstance(correction, bool) or correction not in (0, 1):
        raise ValueError(
            f"running_var_correction must be 1 (unbiased, torch's) or 0 (biased, Keras'), got {correction!r}"
        )


def check_eps(eps: float) -> None:
    """A number (torch checks its sign in the forward, as check_options does)."""
    if not _real(eps):
        raise TypeError(f"eps must be a number, got eps={eps!r}")


def check_options(momentum: float | None, eps: float, training: bool) -> None:
    """torch's rule for eps: positive in training, non-negative in evaluation (torch's words);
    momentum as check_momentum, in training only (evaluation does not use it)."""
    if type(eps) is float and (momentum is None or type(momentum) is float and 0.0 <= momentum <= 1.0):
        if eps > 0.0 if training else eps >= 0.0:  # the common case, in one test (on every call)
            return
    check_eps(eps)
    if training:
        check_momentum(momentum)
        if not eps > 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_input(input: Tensor, axis: int) -> int:
    """Check dtype, rank (at least 2, as torch) and the axis; return the axis as a non-negative index."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not input.dtype.is_floating_point:
        raise TypeError(
            f"input must have a floating-point dtype (float16, bfloat16, float32 or float64), "
            f"got input.dtype={input.dtype}"
        )
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    if isinstance(axis, bool) or not isinstance(axis, int) or not -input.dim() <= axis < input.dim():
        raise ValueError(
            f"axis must be in [{-input.dim()}, {input.dim() - 1}] for {input.dim()}D input, got axis={axis!r}"
        )
    return axis % input.dim()


_HALF = (torch.float16, torch.bfloat16)


def check_channel_tensors(
    input: Tensor,
    channels: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
) -> None:
    """torch's rules for the per-channel tensors given, with torch's exception types:

    - one value per channel each (torch's words);
    - one dtype for all of them: the input's, or float32 for float16/bfloat16 input (the
      dtypes torch's CPU kernel takes, on every path here, whatever the size or layout);
    - running_mean and running_var together, and neither requiring a gradient while
      autograd records (batch norm is not differentiable with respect to them).
    """
    dtype = input.dtype
    if dtype is torch.float32 or dtype is torch.float64:  # the common case, in few tests (on every call)
        if running_mean is None:
            running = running_var is None
        else:
            running = (
                running_var is not None and running_mean.dtype is dtype and running_var.dtype is dtype
                and running_mean.numel() == channels and running_var.numel() == channels
                and not (running_mean.requires_grad or running_var.requires_grad)
            )  # fmt: skip
        if (
            running
            and (weight is None or weight.dtype is dtype and weight.numel() == channels)
            and (bias is None or bias.dtype is dtype and bias.numel() == channels)
        ):
            return
    named = (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))
    first = None  # the first tensor given, (name, dtype): the others take its dtype
    for name, tensor in named:
        if tensor is None:
            continue
        if tensor.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {tensor.numel()}")
        if first is None:
            first = (name, tensor.dtype)
            allowed = (input.dtype, torch.float32) if input.dtype in _HALF else (input.dtype,)
            if tensor.dtype not in allowed:
                raise RuntimeError(
                    f"mixed dtype: {name} is {tensor.dtype}, expected {' or '.join(map(str, allowed))} "
                    f"for {input.dtype} input"
                )
        elif tensor.dtype != first[1]:
            raise RuntimeError(
                f"mixed dtype: {name} is {tensor.dtype} and {first[0]} {first[1]}; weight, bias, "
                "running_mean and running_var must share one dtype"
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if running_mean is not None and torch.is_grad_enabled():
        for name, tensor in named[:2]:
            if tensor.requires_grad:
                raise RuntimeError(
                    f"The function 'batch_norm' is not differentiable with respect to argument '{name}'. "
                    "This input cannot have requires_grad True."
                )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    *,
    num_batches_tracked: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Batch normalization over every axis but ``axis`` (see the module docstring).

    With ``training=True`` the batch statistics normalize, and the running buffers,
    when given, are updated in place. With ``training=False`` the running buffers
    normalize; they must be given. A boolean ``mask`` of the input's shape without its
    channel axis restricts the training statistics to its True positions (batchnorm.torch_stats).

    Under torch.fx symbolic tracing, one call_function node.
    """
    if type(input) is not torch.Tensor and isinstance(input, torch.fx.Proxy):
        args = (input, running_mean, running_var, weight, bias, training, momentum, eps, axis)
        kwargs = {"num_batches_tracked": num_batches_tracked, "mask": mask}
        return input.tracer.create_proxy("call_function", batch_norm, args, kwargs)
    return normalize(
        input, running_mean, running_var, weight, bias, training, momentum, eps, axis, num_batches_tracked, mask=mask
    )


def batch_statistics(input: Tensor, axis: int = 1, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(mean, biased var) per channel of ``input`` (channels on ``axis``), accumulated in float64
    (float32 on MPS) and returned so: the statistics every variant shares with the plain layer,
    for the variants that need them before normalizing (batch renorm). No gradient. With a
    ``mask`` (batchnorm.torch_stats), over its True positions only."""
    axis = check_input(input, axis)
    if mask is not None:
        mask = torch_stats.check_mask(mask, input, axis)
    with torch.no_grad():
        return reference.batch_stats(input.detach(), axis, mask)


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
    correction: int = 1,
) -> None:
    """The layers' running update, in place, from a batch's per-channel ``mean`` and biased
    ``var`` over ``count`` values each (the variants that compute their own batch statistics
    call it): running_var takes var * count/(count - correction) (1: unbiased, torch's; 0:
    biased, Keras'); ``momentum=None`` is the cumulative average; a non-finite ``mean`` or
    ``var`` changes nothing (num_batches_tracked included)."""
    check_momentum(momentum)
    check_correction(correction)
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    factor = -1.0 if momentum is None else float(momentum)
    with torch.no_grad():
        ops.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, factor, correction)


def activate(
    input: Tensor,
    residual: Tensor | None = None,
    activation: str = "relu",
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> Tensor:
    """``activation(input + residual)`` in one pass, channels on axis 1: a fused layer's
    epilogue without its normalization, which is what batchnorm.fold leaves after a folded
    convolution. It is the evaluation of a batch norm with mean 0, variance 1, eps 0 and no
    affine map, the identity exactly ((x - 0) * 1 / sqrt(1 + 0)), on the route with its epilogue.

    Under torch.fx symbolic tracing, one call_function node.
    """
    if type(input) is not torch.Tensor and isinstance(input, torch.fx.Proxy):
        args = (input, residual, activation, negative_slope, alpha)
        return input.tracer.create_proxy("call_function", activate, args, {})
    check_input(input, 1)
    epilogue = epilogues.Epilogue(activation, negative_slope, alpha, residual)
    epilogues.check(epilogue, input)
    channels = input.shape[1]
    stat = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    zeros = torch.zeros(channels, dtype=stat, device=input.device)
    running = (zeros, torch.ones(channels, dtype=stat, device=input.device), None, 0, 0.0, 1)
    return route.normalize(input, None, None, 0.0, 1, False, running, epilogue)


def normalize(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    axis: int,
    num_batches_tracked: Tensor | None,
    layer=None,
    epilogue=None,
    correction: int = 1,
    mask: Tensor | None = None,
    p: float = 2,
    process_group=False,
) -> Tensor:
    """batch_norm with every argument given: the checks, then route.normalize (torch_stats.normalize
    for a training call with a ``mask`` or an lp spread, ``p`` 1 or inf; synced.normalize for one
    over a torch.distributed ``process_group`` of more than one process: None is the default
    group, False none).

    The modules call this with ``layer`` (themselves): the input's channels must then be
    their ``num_features``, and an error names the layer. A fused layer passes its
    ``epilogue`` (epilogue.Epilogue: activation, residual, what backward keeps).
    ``correction`` is the running variance's (check_correction): it takes the batch's
    var * m/(m - correction).
    """
    axis = check_input(input, axis)
    channels = input.shape[axis]
    if layer is not None and channels != layer.num_features:
        raise ValueError(
            f"{type(layer).__name__}(num_features={layer.num_features}) expected input with "
            f"{layer.num_features} channels on axis {layer.axis}, got {channels} "
            f"(input size {tuple(input.shape)})"
        )
    check_options(momentum, eps, training)
    check_channel_tensors(input, channels, running_mean, running_var, weight, bias)
    if epilogue is not None:
        epilogues.check(epilogue, input)
    if mask is not None:
        mask = torch_stats.check_mask(mask, input, axis)
    if not training:  # a mask changes nothing: the running statistics normalize every position
        if running_mean is None:
            raise RuntimeError("running_mean must be defined in evaluation mode (training=False)")
        running = (running_mean, running_var, None, 0, 0.0, 1)
        return route.normalize(input, weight, bias, eps, axis, False, running, epilogue)
    count = input.numel() // channels if channels else 0
    synchronized = process_group is not False and synced.world(process_group) > 1
    if count == 1 and mask is None and not synchronized:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}; "
            "use eval mode (model.eval()), a batch with more than one value per channel, "
            "a layer built with single_value='use_running' (the running statistics for such a batch), "
            "or a normalization that does not depend on the batch (LayerNorm, GroupNorm)"
        )
    running = None
    if running_mean is not None:
        if momentum is None and num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        factor = -1.0 if momentum is None else float(momentum)
        running = (running_mean, running_var, num_batches_tracked, count, factor, correction)
    if synchronized:  # every rank takes part, whatever its batch (the statistics are the group's)
        if mask is not None or p != 2 or epilogue is not None:
            raise ValueError("a synchronized batch norm takes no mask, lp spread or fused epilogue yet")
        return synced.normalize(input, weight, bias, eps, axis, running, process_group)
    if (mask is not None or p != 2) and count > 0:  # statistics the kernels do not compute
        return torch_stats.normalize(input, mask, weight, bias, eps, axis, running, epilogue, p)
    return route.normalize(input, weight, bias, eps, axis, True, running, epilogue)
