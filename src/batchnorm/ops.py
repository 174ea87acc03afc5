"""Batch normalization as four ``torch.library`` custom ops.

    batchnorm::forward_train         Algorithm 1: output and batch statistics
    batchnorm::update_running_stats  the running averages, updated in place
    batchnorm::forward_eval          the affine map of Algorithm 2 with fixed statistics
    batchnorm::backward              (dx, dgamma, dbeta) for either mode

Each op has a default implementation in plain torch ops (kernels/reference.py,
used on CUDA, MPS and any other device), a CPU implementation with the Numba
kernels (kernels/cpu.py), a fake implementation for tracing, and autograd.
torch.compile, torch.export and FX therefore see one op per call.

Below them, one function per destination of route.route and mode (train_kernels,
evaluate_torch, ...): what route.py calls, so that every way to the kernels passes here.

The fused layers' ops (act(BN(x) + residual)) and their calls are in fused_ops.py.

Double backward: when the backward runs with grad mode on (create_graph=True),
the gradient is computed with the differentiable formula of kernels/reference.py,
the statistics recomputed from the input, so that autograd can differentiate it
again; a plain backward uses the fast kernel.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.autograd.forward_ad as forward_ad

from . import launch
from .kernels import reference

Tensor = torch.Tensor

NONFINITE_WARNING = (
    "batch norm: the training batch has NaN or infinite values, or a variance past its dtype's range, "
    "so its statistics are not finite; running_mean, running_var and num_batches_tracked were left unchanged "
    "(the output of this batch is computed with its batch statistics)"
)


# ------------------------------------------------------------------- helpers


_forked_child = False


def _after_fork_in_child() -> None:
    # GNU OpenMP, which Numba's parallel kernels share with torch, is not fork-safe:
    # Numba aborts a forked child that launches a parallel region. Forked children
    # (DataLoader workers) use the torch-ops implementation instead.
    global _forked_child
    _forked_child = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def empty_like_view(x: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty_like(x, dtype=dtype, memory_format=torch.preserve_format)


# ------------------------------------------------------------- forward, train


@torch.library.custom_op("batchnorm::forward_train", mutates_args=())
def forward_train(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, var) with the batch statistics (var biased)."""
    return reference.forward_train(input, weight, bias, eps, axis)


@forward_train.register_kernel("cpu")
def forward_train_cpu(input, weight, bias, eps, axis):
    if _forked_child:
        return reference.forward_train(input, weight, bias, eps, axis)
    channels = input.shape[axis]
    stat = reference.compute_dtype(input.dtype)
    if input.numel() == 0:
        empty = torch.full((channels,), float("nan"), dtype=stat)
        return empty_like_view(input, input.dtype), empty, empty.clone(), empty.clone()
    # three tensors, not views of one: a custom op's outputs must not alias
    mean, invstd, var = (torch.empty(channels, dtype=stat) for _ in range(3))
    y, _ = launch.train(input, weight, bias, eps, axis, mean.data_ptr(), invstd.data_ptr(), var.data_ptr())
    return y, mean, invstd, var


@forward_train.register_fake
def _forward_train_fake(input, weight, bias, eps, axis):
    stat = reference.compute_dtype(input.dtype)
    channels = input.shape[axis]
    return (
        torch.empty_like(input, memory_format=torch.preserve_format),
        *(input.new_empty(channels, dtype=stat) for _ in range(3)),
    )


# --------------------------------------------------------- running statistics


@torch.library.custom_op(
    "batchnorm::update_running_stats",
    mutates_args=("running_mean", "running_var", "num_batches_tracked"),
)
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
    correction: int = 1,
) -> None:
    """The running averages from one batch's mean and biased var over ``count`` values.

    momentum < 0 means the cumulative average (factor 1/num_batches_tracked); running_var
    takes var * count/(count - correction) (1: unbiased, torch's; 0: biased).
    Non-finite batch statistics change nothing (on the CPU, with a RuntimeWarning).
    """
    reference.update_running_stats(
        running_mean, running_var, num_batches_tracked, mean, var, count, momentum, correction
    )


@update_running_stats.register_kernel("cpu")
def _update_running_stats_cpu(running_mean, running_var, num_batches_tracked, mean, var, count, momentum, correction=1):
    running = (running_mean, running_var, num_batches_tracked, count, momentum, correction)
    alike = var.dtype is mean.dtype and var.numel() == mean.numel()
    if alike and mean.is_contiguous() and var.is_contiguous():  # what update_from_batch trusts
        update_from_batch(running, mean, var, False, 0.0)
    else:  # statistics from a caller of the op, not from this project's forward
        update_with_torch(running, mean, var, False, 0.0)


@update_running_stats.register_fake
def _update_running_stats_fake(
    running_mean, running_var, num_batches_tracked, mean, var, count, momentum, correction=1
):
    return None


def update_from_batch(running, mean: Tensor, spread: Tensor, spread_is_invstd: bool, eps: float) -> None:
    """The running update from one CPU batch's mean and var (or torch's 1/sqrt(var + eps)):
    every CPU caller's way in, ``running`` as (running_mean, running_var, num_batches_tracked,
    count, momentum, correction). The kernel by address (launch.update_running) when it takes the
    tensors, else the torch-ops update; a non-finite batch changes nothing and warns."""
    updated = launch.update_running(running, mean, spread, spread_is_invstd, eps)
    if updated is None:
        update_with_torch(running, mean, spread, spread_is_invstd, eps)
    elif not updated:
        warn_nonfinite()


def update_with_torch(running, mean: Tensor, spread: Tensor, spread_is_invstd: bool, eps: float) -> None:
    """update_from_batch in torch ops, for statistics or buffers the kernel does not take."""
    running_mean, running_var, num_batches_tracked, count, momentum, correction = running
    dtype = mean.dtype
    var = (spread.double().pow(-2) - eps).clamp_min(0).to(dtype) if spread_is_invstd else spread
    updated = bool(torch.isfinite(mean).all() and torch.isfinite(var).all())
    reference.update_running_stats(
        running_mean, running_var, num_batches_tracked, mean, var, count, momentum, correction
    )
    if not updated:
        warn_nonfinite()


# frames the non-finite warning looks past: this package's and torch's (nn.Module's call,
# autograd.Function, the custom ops' dispatch)
_INTERNAL_DIRS = tuple(os.path.join(os.path.dirname(os.path.abspath(path)), "") for path in (__file__, torch.__file__))


def warn_nonfinite() -> None:
    """NONFINITE_WARNING, attributed to the first frame outside this package and torch: the
    line that called the layer or batch_norm, however many calls the path in between took
    (warnings.warn's skip_file_prefixes, which Python 3.10 and 3.11 lack)."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(NONFINITE_WARNING, RuntimeWarning, stacklevel=level)


# -------------------------------------------------------------- forward, eval


@torch.library.custom_op("batchnorm::forward_eval", mutates_args=())
def forward_eval(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
) -> Tensor:
    """y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta."""
    return reference.forward_eval(input, running_mean, running_var, weight, bias, eps, axis)


@forward_eval.register_kernel("cpu")
def forward_eval_cpu(input, running_mean, running_var, weight, bias, eps, axis):
    if _forked_child:
        return reference.forward_eval(input, running_mean, running_var, weight, bias, eps, axis)
    if input.numel() == 0:
        return empty_like_view(input, input.dtype)
    return launch.evaluate(input, running_mean, running_var, weight, bias, eps, axis)


@forward_eval.register_fake
def _forward_eval_fake(input, running_mean, running_var, weight, bias, eps, axis):
    return torch.empty_like(input, memory_format=torch.preserve_format)


# ------------------------------------------------------------------ backward


@torch.library.custom_op("batchnorm::backward", mutates_args=())
def backward(
    grad_output: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    training: bool,
    axis: int,
    input_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dgamma, dbeta); dx is an empty tensor when ``input_grad`` is False."""
    return _backward_reference(grad_output, input, mean, invstd, weight, training, axis, input_grad)


def _backward_reference(grad_output, input, mean, invstd, weight, training, axis, input_grad):
    dx, dweight, dbias = reference.backward(grad_output, input, mean, invstd, weight, training, axis)
    stat = reference.compute_dtype(input.dtype)
    if not input_grad:
        dx = input.new_empty(0)
    return dx, dweight.to(stat), dbias.to(stat)


@backward.register_kernel("cpu")
def backward_cpu(grad_output, input, mean, invstd, weight, training, axis, input_grad):
    if _forked_child:
        return _backward_reference(grad_output, input, mean, invstd, weight, training, axis, input_grad)
    if input.numel() == 0:
        channels = input.shape[axis]
        stat = reference.compute_dtype(input.dtype)
        dweight, dbias = torch.zeros(channels, dtype=stat), torch.zeros(channels, dtype=stat)
        return (empty_like_view(input, input.dtype) if input_grad else input.new_empty(0)), dweight, dbias
    stat = reference.compute_dtype(input.dtype)
    channels = input.shape[axis]
    mu, inv = launch.per_channel(mean, stat, 0.0, channels), launch.per_channel(invstd, stat, 1.0, channels)
    return launch.backward(grad_output, input, mu.data_ptr(), inv.data_ptr(), weight, training, axis, input_grad)


@backward.register_fake
def _backward_fake(grad_output, input, mean, invstd, weight, training, axis, input_grad):
    stat = reference.compute_dtype(input.dtype)
    channels = input.shape[axis]
    dx = torch.empty_like(input, memory_format=torch.preserve_format) if input_grad else input.new_empty(0)
    return dx, input.new_empty(channels, dtype=stat), input.new_empty(channels, dtype=stat)


# ------------------------------------------------------------------ autograd


def gradients(ctx, needs, grad_output, input, mean, invstd, weight, training, kernel=None):
    """Fast kernel for a plain backward; the differentiable formula under create_graph.

    ``needs`` says which of (input, weight, bias) want a gradient. The kernel is
    ``kernel``, else ``ctx.backward_kernel``, else the backward op; mean and invstd are
    what it takes: tensors, or addresses for launch.backward (which only a training
    forward passes, and training recomputes them under create_graph).
    """
    needs_input, needs_weight, needs_bias = needs
    if torch.is_grad_enabled():
        if training:  # the statistics are functions of the input
            batch_mean, batch_var = reference.batch_stats(input, ctx.axis)
            invstd = torch.rsqrt(batch_var + ctx.eps)
            mean = batch_mean
        dx, dweight, dbias = reference.backward(grad_output, input, mean, invstd, weight, training, ctx.axis)
    else:
        kernel = kernel or getattr(ctx, "backward_kernel", backward)
        dx, dweight, dbias = kernel(grad_output, input, mean, invstd, weight, training, ctx.axis, needs_input)
    dtype = dbias.dtype if weight is None else weight.dtype
    grad_weight = launch.in_dtype(dweight, dtype) if needs_weight and weight is not None else None
    grad_bias = launch.in_dtype(dbias, dtype) if needs_bias else None
    return (dx if needs_input else None), grad_weight, grad_bias


def _setup_forward_train(ctx, inputs, output):
    input, weight, _bias, eps, axis = inputs
    _y, mean, invstd, _var = output
    ctx.save_for_backward(input, weight, mean, invstd)
    ctx.eps, ctx.axis = eps, axis


def _backward_forward_train(ctx, grad_output, _grad_mean, _grad_invstd, _grad_var):
    input, weight, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias = gradients(ctx, ctx.needs_input_grad[:3], grad_output, input, mean, invstd, weight, True)
    return dx, dweight, dbias, None, None


def setup_forward_eval(ctx, inputs, output):
    input, running_mean, running_var, weight, _bias, eps, axis = inputs
    ctx.save_for_backward(input, running_mean, running_var, weight)
    ctx.eps, ctx.axis = eps, axis


def backward_forward_eval(ctx, grad_output):
    input, running_mean, running_var, weight = ctx.saved_tensors
    invstd = torch.rsqrt(running_var.to(reference.compute_dtype(input.dtype)) + ctx.eps)
    needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:5])  # input, weight, bias
    dx, dweight, dbias = gradients(ctx, needs, grad_output, input, running_mean, invstd, weight, False)
    return dx, None, None, dweight, dbias, None, None


torch.library.register_autograd("batchnorm::forward_train", _backward_forward_train, setup_context=_setup_forward_train)
torch.library.register_autograd("batchnorm::forward_eval", backward_forward_eval, setup_context=setup_forward_eval)


# ------------------------------------------------------------ what route.py calls
#
# One function for each destination of route.route and mode. The dispatcher round trip of
# a Python custom op costs tens of microseconds; in plain eager mode on the CPU the same
# CPU implementations and the same backward are called directly, through an
# autograd.Function when autograd records.


def _train_cpu(input, weight, bias, eps, axis, running, epilogue=None) -> tuple[Tensor, Tensor]:
    """forward_train and the running update in one call: (y, the (3, C) statistics:
    mean, invstd and the biased var). With an ``epilogue`` (a fused layer's; never in a
    forked child or on an empty input, which route.py does not fuse) y is act(y + residual)."""
    updated = None
    if _forked_child or input.numel() == 0:
        y, *stats = forward_train_cpu(input, weight, bias, eps, axis)
        stats = torch.stack(stats)
    else:
        stats = torch.empty(3, input.shape[axis], dtype=reference.compute_dtype(input.dtype))
        mean = stats.data_ptr()
        step = stats.stride(0) * stats.element_size()
        # the kernel call makes the running update too, when launch can pass the buffers
        y, updated = launch.train(
            input, weight, bias, eps, axis, mean, mean + step, mean + 2 * step, running, epilogue=epilogue
        )
    if updated is False:
        warn_nonfinite()
    elif updated is None and running is not None:
        update_from_batch(running, stats[0], stats[2], False, float(eps))
    return y, stats


class _EagerTrain(torch.autograd.Function):
    """_train_cpu under autograd. Only the output is returned; the statistics stay on
    ctx for the backward."""

    @staticmethod
    def forward(ctx, input, weight, bias, eps, axis, running):
        y, stats = _train_cpu(input, weight, bias, eps, axis, running)
        ctx.save_for_backward(input, weight)
        ctx.stats = stats
        ctx.eps, ctx.axis = eps, axis
        return y

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        stats = ctx.stats
        if _forked_child or input.numel() == 0:
            mean, invstd, kernel = stats[0], stats[1], backward_cpu
        else:  # straight to the kernels, the statistics by address
            mean = stats.data_ptr()
            invstd, kernel = mean + stats.stride(0) * stats.element_size(), launch.backward
        needs = ctx.needs_input_grad[:3]
        dx, dweight, dbias = gradients(ctx, needs, grad_output, input, mean, invstd, weight, True, kernel)
        return dx, dweight, dbias, None, None, None


class _EagerEval(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, running_mean, running_var, weight, bias, eps, axis):
        y = forward_eval_cpu(input, running_mean, running_var, weight, bias, eps, axis)
        setup_forward_eval(ctx, (input, running_mean, running_var, weight, bias, eps, axis), y)
        ctx.backward_kernel = backward_cpu
        return y

    @staticmethod
    def backward(ctx, grad_output):
        return backward_forward_eval(ctx, grad_output)


# autograd.Function.apply is a Python wrapper (functorch checks, argument binding) around
# the C implementation; on the development machine the wrapper cost 7 us a call with
# warm caches and 40 us with cold ones (a 4x256x2x2 eval: 36 against 29 us, 86 against
# 46 us). eager() has excluded what the wrapper is for (torch.func transforms, functorch
# wrappers), so the eager route calls the C implementation directly.
_c_apply = torch._C._FunctionBase.__dict__["apply"]
_apply_train = _c_apply.__get__(None, _EagerTrain)
_apply_eval = _c_apply.__get__(None, _EagerEval)


def train_kernels(input, weight, bias, eps, axis, running, recorded: bool) -> Tensor:
    if recorded:
        return _apply_train(input, weight, bias, eps, axis, running)
    return _train_cpu(input, weight, bias, eps, axis, running)[0]


def evaluate_kernels(input, running_mean, running_var, weight, bias, eps, axis, recorded: bool) -> Tensor:
    if recorded:
        return _apply_eval(input, running_mean, running_var, weight, bias, eps, axis)
    return forward_eval_cpu(input, running_mean, running_var, weight, bias, eps, axis)


def train_torch(input, weight, bias, eps, running) -> Tensor:
    """torch's kernel, called without running buffers, then this project's update."""
    y, mean, invstd = torch.native_batch_norm(input, weight, bias, None, None, True, 0.0, eps)
    if running is not None:
        update_from_batch(running, mean, invstd, True, float(eps))
    return y


def evaluate_torch(input, running_mean, running_var, weight, bias, eps) -> Tensor:
    return torch.batch_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps, False)


def train_reference(input, weight, bias, eps, axis, running) -> Tensor:
    """kernels/reference.py's differentiable ops (inside torch.func transforms)."""
    y, mean, _invstd, var = reference.forward_train(input, weight, bias, eps, axis)
    if running is not None:
        reference.update_running_stats(*running[:3], mean.detach(), var.detach(), *running[3:])
    return y


def evaluate_reference(input, running_mean, running_var, weight, bias, eps, axis) -> Tensor:
    running_mean, running_var = _without_tangents(input, running_mean, running_var)
    return reference.forward_eval(input, running_mean, running_var, weight, bias, eps, axis)


def train_op(input, weight, bias, eps, axis, running) -> Tensor:
    """The custom ops: forward_train, then update_running_stats."""
    y, mean, _invstd, var = forward_train(input, weight, bias, eps, axis)
    if running is not None:
        update_running_stats(*running[:3], mean, var, *running[3:])
    return y


def evaluate_op(input, running_mean, running_var, weight, bias, eps, axis) -> Tensor:
    return forward_eval(input, running_mean, running_var, weight, bias, eps, axis)


def _without_tangents(input: Tensor, running_mean: Tensor, running_var: Tensor) -> tuple[Tensor, Tensor]:
    """The running statistics as constants under forward-mode AD, as torch treats them:
    refused with torch's words when they carry a tangent and the input does too."""
    if forward_ad._current_level < 0:
        return running_mean, running_var
    mean, mean_tangent = forward_ad.unpack_dual(running_mean)
    var, var_tangent = forward_ad.unpack_dual(running_var)
    if (mean_tangent is not None or var_tangent is not None) and forward_ad.unpack_dual(input).tangent is not None:
        raise RuntimeError(
            "batch_norm is not differentiable wrt running_mean and running_var, they cannot have forward grad defined"
        )
    return mean, var
