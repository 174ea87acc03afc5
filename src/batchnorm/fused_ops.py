"""The fused layers' calls, ``out = act(BN(x) + residual)``: three custom ops and the eager calls.

    batchnorm::forward_train_act  (out, mean, invstd, biased var) with the batch statistics
    batchnorm::forward_eval_act   out with the running statistics
    batchnorm::backward_act       (dx, dgamma, dbeta, dresidual) from grad_output

The activation travels as the op's arguments (activation, negative_slope, alpha), with
``save``: what the autograd formula keeps, "input" (x, gamma, beta, the residual) or
"output" (in-place activated batch norm: out and the residual; x-hat is recovered from
out). As ops.py's plain ops, each has a default implementation in torch ops (the reference
normalization, then epilogue.apply; torch's activation backward functions), a CPU one on the
Numba kernels (launch.py, the epilogue a compile-time parameter of the kernels' passes), a
fake one, and autograd: torch.compile, export and FX see one op per fused layer.

Below them, what route.normalize calls for a fused layer on each destination: the ops
(``train_op``, ``evaluate_op``), or in plain eager mode the kernels directly, in an
autograd.Function called by its C entry point when autograd records (``train_fused``,
``evaluate_fused``). Double backward differentiates the reference ops with autograd.
"""

from __future__ import annotations

import torch

from . import epilogue as epilogues
from . import launch, ops
from .epilogue import Epilogue
from .kernels import reference
from .kernels.cpu import INVERT_FLOOR

Tensor = torch.Tensor


def _no_tensor(like: Tensor) -> Tensor:
    """What an op returns for a gradient it does not compute (a custom op returns tensors)."""
    return like.new_empty(0)


# ------------------------------------------------------------- forward, train


@torch.library.custom_op("batchnorm::forward_train_act", mutates_args=())
def forward_train_act(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    axis: int,
    activation: str,
    negative_slope: float,
    alpha: float,
    save: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(act(y + residual), mean, invstd, var) with the batch statistics (var biased)."""
    epilogue = Epilogue(activation, negative_slope, alpha, residual, save)
    return _train_reference(input, weight, bias, eps, axis, epilogue)


def _train_reference(input, weight, bias, eps, axis, epilogue):
    y, mean, invstd, var = reference.forward_train(input, weight, bias, eps, axis)
    return epilogues.apply(y, epilogue), mean, invstd, var


@forward_train_act.register_kernel("cpu")
def _forward_train_act_cpu(input, weight, bias, residual, eps, axis, activation, negative_slope, alpha, save):
    epilogue = Epilogue(activation, negative_slope, alpha, residual, save)
    if ops._forked_child or input.numel() == 0:
        return _train_reference(input, weight, bias, eps, axis, epilogue)
    stat = reference.compute_dtype(input.dtype)
    mean, invstd, var = (torch.empty(input.shape[axis], dtype=stat) for _ in range(3))
    out, _ = launch.train(
        input, weight, bias, eps, axis, mean.data_ptr(), invstd.data_ptr(), var.data_ptr(), epilogue=epilogue
    )
    return out, mean, invstd, var


@forward_train_act.register_fake
def _forward_train_act_fake(input, weight, bias, residual, eps, axis, activation, negative_slope, alpha, save):
    stat = reference.compute_dtype(input.dtype)
    channels = input.shape[axis]
    return (
        torch.empty_like(input, memory_format=torch.preserve_format),
        *(input.new_empty(channels, dtype=stat) for _ in range(3)),
    )


# -------------------------------------------------------------- forward, eval


@torch.library.custom_op("batchnorm::forward_eval_act", mutates_args=())
def forward_eval_act(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    axis: int,
    activation: str,
    negative_slope: float,
    alpha: float,
    save: str,
) -> Tensor:
    """act(gamma * (x - running_mean) / sqrt(running_var + eps) + beta + residual)."""
    epilogue = Epilogue(activation, negative_slope, alpha, residual, save)
    return _eval_reference(input, running_mean, running_var, weight, bias, eps, axis, epilogue)


def _eval_reference(input, running_mean, running_var, weight, bias, eps, axis, epilogue):
    y = reference.forward_eval(input, running_mean, running_var, weight, bias, eps, axis)
    return epilogues.apply(y, epilogue)


@forward_eval_act.register_kernel("cpu")
def _forward_eval_act_cpu(
    input, running_mean, running_var, weight, bias, residual, eps, axis, activation, negative_slope, alpha, save
):
    epilogue = Epilogue(activation, negative_slope, alpha, residual, save)
    if ops._forked_child or input.numel() == 0:
        return _eval_reference(input, running_mean, running_var, weight, bias, eps, axis, epilogue)
    return launch.evaluate(input, running_mean, running_var, weight, bias, eps, axis, epilogue)


@forward_eval_act.register_fake
def _forward_eval_act_fake(
    input, running_mean, running_var, weight, bias, residual, eps, axis, activation, negative_slope, alpha, save
):
    return torch.empty_like(input, memory_format=torch.preserve_format)


# ------------------------------------------------------------------ backward


@torch.library.custom_op("batchnorm::backward_act", mutates_args=())
def backward_act(
    grad_output: Tensor,
    saved: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    training: bool,
    axis: int,
    activation: str,
    negative_slope: float,
    alpha: float,
    save: str,
    input_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dgamma, dbeta, dresidual) of out = act(y + residual); ``saved`` is x, or out when
    ``save`` is "output" (then x-hat = (act^-1(out) - residual - beta) / gamma, |gamma| taken
    as at least 1e-5). dx is empty when ``input_grad`` is False, dresidual without a residual."""
    epilogue = Epilogue(activation, negative_slope, alpha, residual, save)
    return _backward_reference(grad_output, saved, mean, invstd, weight, bias, training, axis, epilogue, input_grad)


def _backward_reference(grad_output, saved, mean, invstd, weight, bias, training, axis, epilogue, input_grad):
    save, residual = epilogue.save, epilogue.residual
    compute = reference.compute_dtype(saved.dtype)
    shape = reference.channel_shape(saved, axis)
    if save == "output":
        z = epilogues.inverse(saved, epilogue)
        y = (z if residual is None else z - residual).to(compute)
        gamma = torch.ones_like(invstd) if weight is None else weight.to(invstd.dtype)
        floor = torch.full_like(gamma, INVERT_FLOOR)
        floor = torch.where(gamma >= 0, floor, -floor)
        gamma = torch.where(gamma.abs() < INVERT_FLOOR, floor, gamma)
        beta = torch.zeros_like(invstd) if bias is None else bias.to(invstd.dtype)
        xhat = (y - beta.to(compute).view(shape)) / gamma.to(compute).view(shape)
        x = (xhat / invstd.to(compute).view(shape) + mean.to(compute).view(shape)).to(saved.dtype)
    else:
        x = saved
        y = reference.normalize(x, mean, invstd, weight, bias, axis)
        z = y if residual is None else y + residual
    g = epilogues.gradient(grad_output, z, epilogue)
    dx, dweight, dbias = reference.backward(g, x, mean, invstd, weight, training, axis)
    stat = reference.compute_dtype(saved.dtype)
    dresidual = _no_tensor(saved) if residual is None else g.clone()
    return (dx if input_grad else _no_tensor(saved)), dweight.to(stat), dbias.to(stat), dresidual


@backward_act.register_kernel("cpu")
def _backward_act_cpu(
    grad_output, saved, mean, invstd, weight, bias, residual, training, axis, activation, negative_slope, alpha, save,
    input_grad,
):  # fmt: skip
    epilogue = Epilogue(activation, negative_slope, alpha, residual, save)
    if ops._forked_child or saved.numel() == 0:
        return _backward_reference(grad_output, saved, mean, invstd, weight, bias, training, axis, epilogue, input_grad)
    stat = reference.compute_dtype(saved.dtype)
    channels = saved.shape[axis]
    mu, inv = launch.per_channel(mean, stat, 0.0, channels), launch.per_channel(invstd, stat, 1.0, channels)
    dx, dweight, dbias, dresidual = launch.backward(
        grad_output, saved, mu.data_ptr(), inv.data_ptr(), weight, training, axis, input_grad, bias, epilogue
    )
    if dresidual is None:
        dresidual = _no_tensor(saved)
    elif dresidual is grad_output:
        dresidual = grad_output.clone()  # an op's output must not alias its input
    return dx, dweight, dbias, dresidual


@backward_act.register_fake
def _backward_act_fake(
    grad_output, saved, mean, invstd, weight, bias, residual, training, axis, activation, negative_slope, alpha, save,
    input_grad,
):  # fmt: skip
    stat = reference.compute_dtype(saved.dtype)
    channels = saved.shape[axis]
    dx = torch.empty_like(saved, memory_format=torch.preserve_format) if input_grad else _no_tensor(saved)
    dresidual = _no_tensor(saved) if residual is None else torch.empty_like(saved, memory_format=torch.preserve_format)
    return dx, saved.new_empty(channels, dtype=stat), saved.new_empty(channels, dtype=stat), dresidual


# ------------------------------------------------------------------ autograd


def _by_autograd(ctx, grad_output, input, weight, bias, residual, training, running_mean=None, running_var=None):
    """The gradients (input, weight, bias, residual) from autograd on the reference ops: a
    differentiable graph under create_graph (double backward). ``ctx.needs`` says which."""
    if ctx.epilogue.save == "output":
        raise RuntimeError(
            "double backward (create_graph=True) through an in-place activated batch norm (inplace=True) is not "
            "supported: its input is not kept; use inplace=False"
        )
    epilogue = ctx.epilogue._replace(residual=residual)
    if training:
        y = reference.forward_train(input, weight, bias, ctx.eps, ctx.axis)[0]
    else:
        y = reference.forward_eval(input, running_mean, running_var, weight, bias, ctx.eps, ctx.axis)
    out = epilogues.apply(y, epilogue)
    wanted = [(i, t) for i, t in enumerate((input, weight, bias, residual)) if t is not None and ctx.needs[i]]
    grads = torch.autograd.grad(out, [t for _, t in wanted], grad_output, create_graph=True, allow_unused=True)
    result = [None] * 4
    for (i, _), g in zip(wanted, grads, strict=True):
        result[i] = g
    return result


def _wanted(ctx, grads) -> list:
    """The kernels' (dx, dgamma, dbeta, dresidual) as autograd takes them: None where not
    needed, the parameters' gradients in the parameters' dtype."""
    dx, dweight, dbias, dresidual = grads
    needs_input, needs_weight, needs_bias, needs_residual = ctx.needs
    dtype = ctx.parameter_dtype or dbias.dtype
    return [
        dx if needs_input else None,
        launch.in_dtype(dweight, dtype) if needs_weight else None,
        launch.in_dtype(dbias, dtype) if needs_bias else None,
        dresidual if needs_residual and dresidual is not None and dresidual.numel() else None,
    ]


def _keep(ctx, out, input, weight, bias, residual, eps, axis, epilogue) -> Tensor:
    """What backward keeps: out in place of x when the epilogue saves the output."""
    ctx.eps, ctx.axis, ctx.epilogue = eps, axis, epilogue._replace(residual=None)
    ctx.parameter_dtype = next((t.dtype for t in (weight, bias) if t is not None), None)
    return out if epilogue.save == "output" else input


def _setup_train(ctx, inputs, output):
    input, weight, bias, residual, eps, axis, activation, negative_slope, alpha, save = inputs
    out, mean, invstd, _var = output
    epilogue = Epilogue(activation, negative_slope, alpha, None, save)
    saved = _keep(ctx, out, input, weight, bias, residual, eps, axis, epilogue)
    ctx.save_for_backward(saved, weight, bias, residual, mean, invstd)


def _backward_train(ctx, grad_output, _grad_mean, _grad_invstd, _grad_var):
    saved, weight, bias, residual, mean, invstd = ctx.saved_tensors
    ctx.needs = ctx.needs_input_grad[:4]
    if torch.is_grad_enabled():
        grads = _by_autograd(ctx, grad_output, saved, weight, bias, residual, True)
    else:
        e = ctx.epilogue
        grads = _wanted(ctx, backward_act(
            grad_output, saved, mean, invstd, weight, bias, residual, True, ctx.axis, e.activation,
            e.negative_slope, e.alpha, e.save, ctx.needs[0],
        ))  # fmt: skip
    return (*grads, None, None, None, None, None, None)


def _setup_eval(ctx, inputs, output):
    input, running_mean, running_var, weight, bias, residual, eps, axis, activation, negative_slope, alpha, save = (
        inputs
    )
    epilogue = Epilogue(activation, negative_slope, alpha, None, save)
    saved = _keep(ctx, output, input, weight, bias, residual, eps, axis, epilogue)
    ctx.save_for_backward(saved, running_mean, running_var, weight, bias, residual)


def _backward_eval(ctx, grad_output):
    saved, running_mean, running_var, weight, bias, residual = ctx.saved_tensors
    ctx.needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:6])  # input, weight, bias, residual
    if torch.is_grad_enabled():
        grads = _by_autograd(ctx, grad_output, saved, weight, bias, residual, False, running_mean, running_var)
    else:
        e = ctx.epilogue
        invstd = torch.rsqrt(running_var.to(reference.compute_dtype(saved.dtype)) + ctx.eps)
        grads = _wanted(ctx, backward_act(
            grad_output, saved, running_mean, invstd, weight, bias, residual, False, ctx.axis, e.activation,
            e.negative_slope, e.alpha, e.save, ctx.needs[0],
        ))  # fmt: skip
    dx, dweight, dbias, dresidual = grads
    return dx, None, None, dweight, dbias, dresidual, None, None, None, None, None, None


torch.library.register_autograd("batchnorm::forward_train_act", _backward_train, setup_context=_setup_train)
torch.library.register_autograd("batchnorm::forward_eval_act", _backward_eval, setup_context=_setup_eval)


# ------------------------------------------------------------ what route.py calls


def train_op(input, weight, bias, eps, axis, running, epilogue: Epilogue) -> Tensor:
    """The custom ops: forward_train_act, then update_running_stats."""
    e = epilogue
    out, mean, _invstd, var = forward_train_act(
        input, weight, bias, e.residual, eps, axis, e.activation, e.negative_slope, e.alpha, e.save
    )
    if running is not None:
        ops.update_running_stats(*running[:3], mean, var, *running[3:])
    return out


def evaluate_op(input, running_mean, running_var, weight, bias, eps, axis, epilogue: Epilogue) -> Tensor:
    e = epilogue
    return forward_eval_act(
        input, running_mean, running_var, weight, bias, e.residual, eps, axis, e.activation, e.negative_slope,
        e.alpha, e.save,
    )  # fmt: skip


class _EagerTrain(torch.autograd.Function):
    """A fused layer in training under autograd, on the kernels: the statistics stay on ctx."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, eps, axis, running, epilogue):
        out, stats = ops._train_cpu(input, weight, bias, eps, axis, running, epilogue._replace(residual=residual))
        ctx.save_for_backward(
            _keep(ctx, out, input, weight, bias, residual, eps, axis, epilogue), weight, bias, residual
        )
        ctx.stats = stats
        return out

    @staticmethod
    def backward(ctx, grad_output):
        saved, weight, bias, residual = ctx.saved_tensors
        ctx.needs = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():
            grads = _by_autograd(ctx, grad_output, saved, weight, bias, residual, True)
        else:  # straight to the kernels, the statistics by address
            mean = ctx.stats.data_ptr()
            invstd = mean + ctx.stats.stride(0) * ctx.stats.element_size()
            epilogue = ctx.epilogue._replace(residual=residual)
            grads = _wanted(ctx, launch.backward(
                grad_output, saved, mean, invstd, weight, True, ctx.axis, ctx.needs[0], bias, epilogue
            ))  # fmt: skip
        return (*grads, None, None, None, None)


class _EagerEval(torch.autograd.Function):
    """A fused layer in evaluation under autograd, on the kernels."""

    @staticmethod
    def forward(ctx, input, running_mean, running_var, weight, bias, residual, eps, axis, epilogue):
        out = launch.evaluate(
            input, running_mean, running_var, weight, bias, eps, axis, epilogue._replace(residual=residual)
        )
        saved = _keep(ctx, out, input, weight, bias, residual, eps, axis, epilogue)
        ctx.save_for_backward(saved, running_mean, running_var, weight, bias, residual)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        saved, running_mean, running_var, weight, bias, residual = ctx.saved_tensors
        ctx.needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:6])  # input, weight, bias, residual
        if torch.is_grad_enabled():
            grads = _by_autograd(ctx, grad_output, saved, weight, bias, residual, False, running_mean, running_var)
        else:
            stat = reference.compute_dtype(saved.dtype)
            channels = saved.shape[ctx.axis]
            mean = launch.per_channel(running_mean, stat, 0.0, channels)
            invstd = torch.rsqrt(running_var.to(stat) + ctx.eps)
            epilogue = ctx.epilogue._replace(residual=residual)
            grads = _wanted(ctx, launch.backward(
                grad_output, saved, mean.data_ptr(), invstd.data_ptr(), weight, False, ctx.axis, ctx.needs[0], bias,
                epilogue,
            ))  # fmt: skip
        dx, dweight, dbias, dresidual = grads
        return dx, None, None, dweight, dbias, dresidual, None, None, None


_apply_train = ops._c_apply.__get__(None, _EagerTrain)
_apply_eval = ops._c_apply.__get__(None, _EagerEval)


def train_fused(input, weight, bias, eps, axis, running, epilogue: Epilogue, recorded: bool) -> Tensor:
    """A fused layer's training call on the kernels (act(BN(x) + residual) in one pass)."""
    if recorded:
        return _apply_train(input, weight, bias, epilogue.residual, eps, axis, running, epilogue)
    return ops._train_cpu(input, weight, bias, eps, axis, running, epilogue)[0]


def evaluate_fused(input, running_mean, running_var, weight, bias, eps, axis, epilogue, recorded: bool) -> Tensor:
    if recorded:
        residual = epilogue.residual
        return _apply_eval(input, running_mean, running_var, weight, bias, residual, eps, axis, epilogue)
    return launch.evaluate(input, running_mean, running_var, weight, bias, eps, axis, epilogue)
