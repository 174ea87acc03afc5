"""Batch normalization as four ``torch.library`` custom ops.

    batchnorm::forward_train         Algorithm 1: output and batch statistics
    batchnorm::update_running_stats  the running averages, updated in place
    batchnorm::forward_eval          the affine map of Algorithm 2 with fixed statistics
    batchnorm::backward              (dx, dgamma, dbeta) for either mode

Each op has a default implementation in plain torch ops (kernels/reference.py,
used on CUDA, MPS and any other device), a CPU implementation with the Numba
kernels (kernels/cpu.py), a fake implementation for tracing, and autograd.
torch.compile, torch.export and FX therefore see one op per call.

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
from .kernels import cpu, reference

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


def _empty_like_view(x: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty_like(x, dtype=dtype, memory_format=torch.preserve_format)


# ------------------------------------------------------------- forward, train


@torch.library.custom_op("batchnorm::forward_train", mutates_args=())
def forward_train(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, var) with the batch statistics (var biased)."""
    return reference.forward_train(input, weight, bias, eps, axis)


@forward_train.register_kernel("cpu")
def _forward_train_cpu(input, weight, bias, eps, axis):
    if _forked_child:
        return reference.forward_train(input, weight, bias, eps, axis)
    channels = input.shape[axis]
    stat = reference.compute_dtype(input.dtype)
    if input.numel() == 0:
        empty = torch.full((channels,), float("nan"), dtype=stat)
        return _empty_like_view(input, input.dtype), empty, empty.clone(), empty.clone()
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
) -> None:
    """The running averages from one batch's mean and biased var over ``count`` values.

    momentum < 0 means the cumulative average (factor 1/num_batches_tracked).
    Non-finite batch statistics change nothing (on the CPU, with a RuntimeWarning).
    """
    reference.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)


@update_running_stats.register_kernel("cpu")
def _update_running_stats_cpu(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    running = (running_mean, running_var, num_batches_tracked, count, momentum)
    alike = var.dtype is mean.dtype and var.numel() == mean.numel()
    if alike and mean.is_contiguous() and var.is_contiguous():  # what _update_at trusts
        _update_at(running, mean, var, False, 0.0)
    else:  # statistics from a caller of the op, not from this project's forward
        _update_with_torch(running, mean, var, False, 0.0)


@update_running_stats.register_fake
def _update_running_stats_fake(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    return None


def _update_at(running, mean: Tensor, spread: Tensor, spread_is_invstd: bool, eps: float) -> None:
    """The update from one CPU batch's mean and var (or torch's 1/sqrt(var + eps)); every
    CPU caller's way in, ``running`` as (running_mean, running_var, num_batches_tracked, count, momentum).

    ``mean`` and ``spread`` are dense, one value per channel, of one dtype: the callers'
    own statistics, or checked by the op. Buffers of that dtype (float32/float64, dense,
    one value per channel) go to the kernel by address, checked by running_addresses
    since the kernel cannot check; anything else (half-precision buffers, mixed dtypes)
    takes the torch-ops update.
    """
    dtype = mean.dtype
    channels = mean.numel()
    update = _UPDATES.get(dtype) or _compile_update(dtype)
    buffers = None if update is None else launch.running_addresses(running, dtype, channels)
    if buffers is None:
        _update_with_torch(running, mean, spread, spread_is_invstd, eps)
        return
    if not update(
        *buffers, mean.data_ptr(), spread.data_ptr(), spread_is_invstd, channels, eps, running[3], running[4], 0.0
    ):
        _warn_nonfinite()


# dtype: cpu.update_running_stats_at compiled for it (from Numba's cache when it has it) on
# first use, then called as that function, without the dispatcher's typing of each
# argument: in a training step of the paper's MLP the step took 0.8% to 1.6% less
_UPDATES: dict = {}


def _compile_update(dtype: torch.dtype):
    zero = launch.ZERO.get(dtype)
    if zero is None:
        return None
    update = _UPDATES[dtype] = cpu.update_running_stats_at.compile(cpu.update_at_signature(zero))
    return update


def _update_with_torch(running, mean: Tensor, spread: Tensor, spread_is_invstd: bool, eps: float) -> None:
    """_update_at in torch ops, for statistics or buffers the kernel does not take."""
    running_mean, running_var, num_batches_tracked, count, momentum = running
    dtype = mean.dtype
    var = (spread.double().pow(-2) - eps).clamp_min(0).to(dtype) if spread_is_invstd else spread
    updated = bool(torch.isfinite(mean).all() and torch.isfinite(var).all())
    reference.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
    if not updated:
        _warn_nonfinite()


# frames the non-finite warning looks past: this package's and torch's (nn.Module's call,
# autograd.Function, the custom ops' dispatch)
_INTERNAL_DIRS = tuple(os.path.join(os.path.dirname(os.path.abspath(path)), "") for path in (__file__, torch.__file__))


def _warn_nonfinite() -> None:
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
def _forward_eval_cpu(input, running_mean, running_var, weight, bias, eps, axis):
    if _forked_child:
        return reference.forward_eval(input, running_mean, running_var, weight, bias, eps, axis)
    if input.numel() == 0:
        return _empty_like_view(input, input.dtype)
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
def _backward_cpu(grad_output, input, mean, invstd, weight, training, axis, input_grad):
    if _forked_child:
        return _backward_reference(grad_output, input, mean, invstd, weight, training, axis, input_grad)
    if input.numel() == 0:
        channels = input.shape[axis]
        stat = reference.compute_dtype(input.dtype)
        dweight, dbias = torch.zeros(channels, dtype=stat), torch.zeros(channels, dtype=stat)
        return (_empty_like_view(input, input.dtype) if input_grad else input.new_empty(0)), dweight, dbias
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


def _gradients(ctx, needs, grad_output, input, mean, invstd, weight, training, kernel=None):
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
    dx, dweight, dbias = _gradients(ctx, ctx.needs_input_grad[:3], grad_output, input, mean, invstd, weight, True)
    return dx, dweight, dbias, None, None


def _setup_forward_eval(ctx, inputs, output):
    input, running_mean, running_var, weight, _bias, eps, axis = inputs
    ctx.save_for_backward(input, running_mean, running_var, weight)
    ctx.eps, ctx.axis = eps, axis


def _backward_forward_eval(ctx, grad_output):
    input, running_mean, running_var, weight = ctx.saved_tensors
    invstd = torch.rsqrt(running_var.to(reference.compute_dtype(input.dtype)) + ctx.eps)
    needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:5])  # input, weight, bias
    dx, dweight, dbias = _gradients(ctx, needs, grad_output, input, running_mean, invstd, weight, False)
    return dx, None, None, dweight, dbias, None, None


torch.library.register_autograd("batchnorm::forward_train", _backward_forward_train, setup_context=_setup_forward_train)
torch.library.register_autograd("batchnorm::forward_eval", _backward_forward_eval, setup_context=_setup_forward_eval)


# ------------------------------------------------------------- eager fast path
#
# The dispatcher round trip of a Python custom op costs tens of microseconds. In
# plain eager mode on the CPU (no compile, no tracing, no mode, no tensor
# subclass) the same CPU implementations and the same backward are called through
# an autograd.Function instead; everything else goes through the ops above.


def eager(input: Tensor, *tensors: Tensor | None) -> bool:
    """True when the CPU implementations may be called directly: no compile, no tracing,
    no mode, no torch.func transform or forward-mode AD (see _transformed), no
    torch.jit.trace, and plain CPU tensors (not subclasses). An input that is a functorch
    wrapper left over from a finished transform has no storage; the custom ops unwrap it."""
    # on every call of every layer, so the names are bound once (torch.compiler.is_compiling
    # is still the function dynamo recognizes)
    if _is_compiling() or _dispatch_modes() > 0 or _function_modes() or _transforms_active():
        return False
    if forward_ad._current_level >= 0 or _tracing_state() is not None:
        return False  # tangents to carry (forward_ad.dual_level()), or torch.jit.trace to record the ops
    if _functorch_wrapped(input) or type(input) not in _PLAIN or not input.is_cpu:
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or not t.is_cpu):
            return False
    return True


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_transforms_active = torch._C._are_functorch_transforms_active
_tracing_state = torch._C._get_tracing_state
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor

# autograd.Function.apply is a Python wrapper (functorch checks, argument binding) around
# the C implementation; on the development machine the wrapper cost 7 us a call with
# warm caches and 40 us with cold ones (a 4x256x2x2 eval: 36 against 29 us, 86 against
# 46 us). eager() has excluded what the wrapper is for (torch.func transforms, functorch
# wrappers), so the eager path calls the C implementation directly.
_c_apply = torch._C._FunctionBase.__dict__["apply"]


def _transformed() -> bool:
    """Inside a torch.func transform (grad, vmap, jvp, ...) or forward_ad.dual_level(): the
    custom ops' autograd supports neither, so the differentiable torch ops of
    kernels/reference.py run instead (asked only once eager() has said no)."""
    return _transforms_active() or forward_ad._current_level >= 0


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


def _recorded(*tensors: Tensor | None) -> bool:
    """Whether autograd records a call on these tensors."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _train_cpu(input, weight, bias, eps, axis, running) -> tuple[Tensor, Tensor]:
    """forward_train and the running update in one call: (y, the (3, C) statistics:
    mean, invstd and the biased var)."""
    updated = None
    if _forked_child or input.numel() == 0:
        y, *stats = _forward_train_cpu(input, weight, bias, eps, axis)
        stats = torch.stack(stats)
    else:
        stats = torch.empty(3, input.shape[axis], dtype=reference.compute_dtype(input.dtype))
        mean = stats.data_ptr()
        step = stats.stride(0) * stats.element_size()
        # the kernel call makes the running update too, when launch can pass the buffers
        y, updated = launch.train(input, weight, bias, eps, axis, mean, mean + step, mean + 2 * step, running)
    if updated is False:
        _warn_nonfinite()
    elif updated is None and running is not None:
        _update_at(running, stats[0], stats[2], False, float(eps))
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
            mean, invstd, kernel = stats[0], stats[1], _backward_cpu
        else:  # straight to the kernels, the statistics by address
            mean = stats.data_ptr()
            invstd, kernel = mean + stats.stride(0) * stats.element_size(), launch.backward
        needs = ctx.needs_input_grad[:3]
        dx, dweight, dbias = _gradients(ctx, needs, grad_output, input, mean, invstd, weight, True, kernel)
        return dx, dweight, dbias, None, None, None


class _EagerEval(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, running_mean, running_var, weight, bias, eps, axis):
        y = _forward_eval_cpu(input, running_mean, running_var, weight, bias, eps, axis)
        _setup_forward_eval(ctx, (input, running_mean, running_var, weight, bias, eps, axis), y)
        ctx.backward_kernel = _backward_cpu
        return y

    @staticmethod
    def backward(ctx, grad_output):
        return _backward_forward_eval(ctx, grad_output)


_apply_train = _c_apply.__get__(None, _EagerTrain)
_apply_eval = _c_apply.__get__(None, _EagerEval)


# Below this many values, torch's own CPU kernel (called without running buffers,
# so that the running statistics stay ours) is faster than a Numba launch plus the
# Python around it: see docs/benchmarks.md.
SMALL_INPUT = 1 << 18

# Except, in a training forward, for contiguous data with rows of more than one value
# (B > 1 in the (A, C, B) view: NCHW-like): with more than RECORDED_KERNELS values it goes
# to the kernels, and so it does with at least UNRECORDED_KERNELS[0] values in rows of at
# least UNRECORDED_KERNELS[1] when autograd does not record the call (under no_grad, as in
# stats.population_statistics, or with nothing requiring a gradient), where no
# autograd.Function runs around them. Measured on the development machine: there the
# kernels are faster than torch's (docs/benchmarks.md, "Between runs 38, 39 and runs 40, 41").
# Rows shorter than UNRECORDED_KERNELS[1] that launch.folds takes (1x2, 2x2, 2x3 maps) go to
# the kernels from FOLDED_KERNELS values, recorded or not: there torch's kernel is slowest,
# its backward most of all (with rows of 8 and more it is as fast as the kernels there).
RECORDED_KERNELS = 1 << 17
UNRECORDED_KERNELS = (1 << 15, 8)
FOLDED_KERNELS = 1 << 15


# what small inputs go to torch's kernel in (half precision goes to the kernels at any size)
_TORCH_KERNEL_DTYPES = frozenset((torch.float32, torch.float64))


def _small(input: Tensor, axis: int) -> bool:
    return axis == 1 and 0 < input.numel() <= SMALL_INPUT and input.dtype in _TORCH_KERNEL_DTYPES


def _kernels_after_all(input: Tensor, weight: Tensor | None, bias: Tensor | None, numel: int) -> bool:
    """Whether a small training input (_small) goes to the kernels after all: see
    RECORDED_KERNELS, UNRECORDED_KERNELS and FOLDED_KERNELS."""
    if input.dim() < 3 or not input.is_contiguous():
        return False
    shape = input.shape
    rows = numel // (shape[0] * shape[1])
    if rows == 1:
        return False
    if numel > RECORDED_KERNELS:
        return True
    least, row = UNRECORDED_KERNELS
    if rows < row:
        return numel >= FOLDED_KERNELS and launch.folds(shape[0], shape[1], rows, input.element_size())
    return numel >= least and not _recorded(input, weight, bias)


_NO_BUFFERS = (None, None, None)
_NUMBERS = (float, int)  # what train_tracked_small takes as momentum and eps (not bool; the others are checked)
_TRAIN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_EVAL_TENSORS = ("running_mean", "running_var", "weight", "bias")


def _check_devices(input: Tensor, names: tuple[str, ...], tensors: tuple[Tensor | None, ...]) -> None:
    """Each tensor given on the input's device, as torch's layer requires: the ops dispatch on
    the devices of all their tensors, and would not say that they differ (a weight on the meta
    device made a CPU call return a CPU output)."""
    for name, t in zip(names, tensors, strict=True):
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{name} is on device {t.device}, not on the input's device {input.device}")


def train(input, weight, bias, eps, axis, running=None):
    """forward_train, then the running update when ``running`` is given, as
    (running_mean, running_var, num_batches_tracked, count, momentum); returns the output.

    Through the ops, or in plain eager CPU mode directly. No update for an empty batch.
    """
    if running is None or running[3] < 2:
        running, buffers = None, _NO_BUFFERS
    else:
        buffers = running[:3]
    if eager(input, weight, bias, *buffers):
        # the small inputs first, with no call that a larger one does not need: at the
        # paper's MLP's size (60x100) every Python step shows in a training step
        numel = input.numel()
        if numel <= SMALL_INPUT and _small(input, axis) and not _kernels_after_all(input, weight, bias, numel):
            y, mean, invstd = torch.native_batch_norm(input, weight, bias, None, None, True, 0.0, eps)
            if running is not None:
                _update_at(running, mean, invstd, True, float(eps))
            return y
        if _recorded(input, weight, bias):
            return _apply_train(input, weight, bias, eps, axis, running)
        # nothing to record: without autograd.Function's machinery (tens of microseconds
        # when the caches are cold)
        return _train_cpu(input, weight, bias, eps, axis, running)[0]
    _check_devices(input, _TRAIN_TENSORS, (weight, bias, *buffers))
    if _transformed():
        y, mean, _invstd, var = reference.forward_train(input, weight, bias, eps, axis)
        if running is not None:
            reference.update_running_stats(*running[:3], mean.detach(), var.detach(), *running[3:])
        return y
    y, mean, _invstd, var = forward_train(input, weight, bias, eps, axis)
    if running is not None:
        update_running_stats(*running[:3], mean, var, *running[3:])
    return y


def train_tracked_small(input, channels, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    """A module's training forward with running statistics when ``input`` (channels on axis 1)
    goes to torch's kernel, as ``train`` would send it there; None when it does not, or when
    anything that ``functional.normalize`` and ``train`` check would fail (they then decide,
    and raise).

    The same work as that path, in one call: at the paper's MLP's size (60x100) its ten
    Python calls and repeated checks took 25 us a layer inside a training step, about as
    much as torch's kernel (docs/benchmarks.md, "Between runs 40, 41 and runs 42, 43: the MLP
    step in one call").
    """
    if type(input) is not Tensor or input.dtype not in _TORCH_KERNEL_DTYPES or not input.is_cpu:
        return None
    shape = input.shape
    numel = input.numel()
    if not (2 <= len(shape) <= 5 and shape[1] == channels and 2 * channels <= numel <= SMALL_INPUT):
        return None  # count = numel // channels >= 2: the update runs
    if not ((momentum is None or type(momentum) in _NUMBERS and 0.0 <= momentum <= 1.0) and type(eps) in _NUMBERS):
        return None
    if not eps > 0:
        return None
    if _is_compiling() or _dispatch_modes() > 0 or _function_modes() or _transforms_active():
        return None
    if _tracing_state() is not None:  # torch.jit.trace: the update by address would not be recorded
        return None
    # (a functorch wrapper left over from a finished transform: torch's kernel takes it, as in torch's layer)
    if len(shape) > 2 and _kernels_after_all(input, weight, bias, numel):
        return None
    dtype = input.dtype
    for t in (weight, bias):
        if t is not None and (type(t) not in _PLAIN or not t.is_cpu or t.dtype is not dtype or t.numel() != channels):
            return None
    # what the update kernel takes by address: launch.running_addresses written out, the update
    # called here (through running_addresses and _update_at the MLP step read 1.019x to 1.021x
    # torch's, against 1.024x to 1.027x, a layer's forward 1.7 us longer)
    for t in (running_mean, running_var):
        if type(t) not in _PLAIN or not t.is_cpu or t.dtype is not dtype or t.numel() != channels:
            return None
        if not t.is_contiguous() or t.requires_grad:
            return None
    counter = num_batches_tracked
    if type(counter) not in _PLAIN or not counter.is_cpu or counter.dtype is not torch.int64 or counter.numel() != 1:
        return None
    y, mean, invstd = torch.native_batch_norm(input, weight, bias, None, None, True, 0.0, eps)
    update = _UPDATES.get(dtype) or _compile_update(dtype)
    factor = -1.0 if momentum is None else float(momentum)
    addresses = (running_mean.data_ptr(), running_var.data_ptr(), counter.data_ptr())
    if not update(
        *addresses, mean.data_ptr(), invstd.data_ptr(), True, channels, float(eps), numel // channels, factor, 0.0
    ):
        _warn_nonfinite()
    return y


def evaluate(input, running_mean, running_var, weight, bias, eps, axis):
    """forward_eval, through the op or, in plain eager CPU mode, directly."""
    if eager(input, running_mean, running_var, weight, bias):
        if _small(input, axis):
            return torch.batch_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps, False)
        if _recorded(input, weight, bias):
            return _apply_eval(input, running_mean, running_var, weight, bias, eps, axis)
        return _forward_eval_cpu(input, running_mean, running_var, weight, bias, eps, axis)
    _check_devices(input, _EVAL_TENSORS, (running_mean, running_var, weight, bias))
    if _transformed():
        running_mean, running_var = _without_tangents(input, running_mean, running_var)
        return reference.forward_eval(input, running_mean, running_var, weight, bias, eps, axis)
    return forward_eval(input, running_mean, running_var, weight, bias, eps, axis)
