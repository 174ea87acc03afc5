"""Where a batch-norm call goes: one decision (``route``), then the call (``normalize``).

functional.py calls ``normalize`` once its checks have passed; ``route`` picks one of

    TORCH             plain eager CPU float32/float64 input, channels on axis 1, fewer values
                      than crossover.threshold gives its kind of call (at most crossover.TOP);
                      or such input with gaps in its memory, or in a forked child (DataLoader
                      worker). Why: a Numba launch costs a fixed time torch's kernel does not
                      pay; where the two cross is measured on this machine (crossover.py). The
                      running update stays this project's (a NaN batch cannot poison it).
    KERNELS           other plain eager CPU input, autograd not recording. Why: the kernels
                      without an autograd.Function (tens of microseconds when caches are cold).
    KERNELS_RECORDED  the same, autograd recording: the kernels in an autograd.Function called
                      by its C entry point, not through the custom ops' dispatch. Why: in a
                      CIFAR ResNet-20 at batch 128 (2-core VM) the custom ops read 0.92x-0.95x
                      torch's eval speed, this route 0.98x-1.01x in the same runs.
    REFERENCE         inside a torch.func transform or forward-mode AD. Why: the custom ops'
                      autograd supports neither; kernels/reference.py's ops are differentiable.
    OP                torch.compile, export, jit.trace, dispatch or function modes, tensor
                      subclasses, other devices. Why: one op per call in a graph; on other
                      devices the ops' default implementation is kernels/reference.py.

Every destination computes the same thing with the same semantics (running statistics
untouched by a non-finite or empty batch); the kernels' own choices (layout family,
stores past the caches) are launch.py's.

``running`` is (running_mean, running_var, num_batches_tracked, count, momentum,
correction): the buffers to update in training (None: no update), the statistics to
normalize with in evaluation (the last four unused there); running_var takes the batch's
var * count/(count - correction).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad

from . import crossover, fused_ops, launch, ops
from . import epilogue as epilogues

Tensor = torch.Tensor

TORCH = "torch's kernel"
KERNELS = "the kernels"
KERNELS_RECORDED = "the kernels, recorded"
REFERENCE = "the reference ops"
OP = "the custom ops"


# ------------------------------------------------------------------ the decision


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
_threads = torch.get_num_threads


def _transformed() -> bool:
    """Inside a torch.func transform (grad, vmap, jvp, ...) or forward_ad.dual_level()."""
    return _transforms_active() or forward_ad._current_level >= 0


def _recorded(*tensors: Tensor | None) -> bool:
    """Whether autograd records a call on these tensors."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


_TRAIN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_EVAL_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _check_devices(input: Tensor, weight, bias, running, training: bool) -> None:
    """Each tensor given on the input's device, as torch's layer requires: the ops dispatch on
    the devices of all their tensors, and would not say that they differ (a weight on the meta
    device made a CPU call return a CPU output). Asked where the custom ops or the reference
    ops take the call; in plain eager mode every tensor is a CPU tensor."""
    tensors = (weight, bias) if running is None else (weight, bias, *running[: 3 if training else 2])
    for name, t in zip(_TRAIN_TENSORS if training else _EVAL_TENSORS, tensors, strict=False):
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{name} is on device {t.device}, not on the input's device {input.device}")


# what torch's kernel is asked to take (half precision goes to the kernels at any size)
_TORCH_KERNEL_DTYPES = frozenset((torch.float32, torch.float64))


def route(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, running, training: bool, axis: int, residual=None
) -> str:
    """The destination of one call (see the module docstring); ``residual`` a fused layer's."""
    if running is None:
        plain = eager(input, weight, bias, residual)
    else:
        plain = eager(input, weight, bias, running[0], running[1], running[2], residual)
    if not plain:
        _check_devices(input, weight, bias, running, training)
        return REFERENCE if _transformed() else OP
    recorded = _recorded(input, weight, bias, residual)
    numel = input.numel()
    if numel <= crossover.TOP and axis == 1 and input.dtype in _TORCH_KERNEL_DTYPES and numel:
        shape = launch.dense_shape(input, axis)
        if shape is None or ops._forked_child:
            return TORCH  # the kernels would copy the input first; no calibration in a worker
        A, C, B = shape
        family = "rows" if B == 1 else ("folded" if launch.folds(A, C, B, input.element_size()) else "maps")
        mode = ("train, recorded" if recorded else "train") if training else "eval"
        if numel < crossover.threshold((mode, family, input.dtype, _threads()), _sides):
            return TORCH
    return KERNELS_RECORDED if recorded else KERNELS


# the inputs the crossover of a family is measured on, for a number of values
_CALIBRATION_SHAPES = {
    "rows": lambda n: (n // 64, 64),  # (N, C) or channels_last: rows of one value
    "maps": lambda n: (n // 1024, 16, 64),  # 8x8 maps
    "folded": lambda n: (n // 64, 16, 4),  # 2x2 maps
}


def _sides(key: tuple):
    """(ours, theirs) for crossover.measure: each a function of a value count that returns
    the call to time, the kernels' route and torch's on an input of ``key``'s kind."""
    mode, family, dtype, _threads = key
    recorded = mode == "train, recorded"

    def side(destination: str):
        def prepare(values: int):
            x = torch.randn(_CALIBRATION_SHAPES[family](values), dtype=dtype)
            C = x.shape[1]
            weight = torch.ones(C, dtype=dtype, requires_grad=recorded)
            bias = torch.zeros(C, dtype=dtype, requires_grad=recorded)
            if mode == "eval":
                running = (torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype), None, 0, 0.0, 1)
            else:
                running = (torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype), torch.zeros((), dtype=torch.long))
                running += (values // C, 0.1, 1)
            if recorded:
                x.requires_grad_(True)
                where = KERNELS_RECORDED if destination == KERNELS else TORCH
                grad = torch.randn_like(x)
                return lambda: _call(where, x, weight, bias, 1e-5, 1, True, running).backward(grad)

            def unrecorded():
                with torch.no_grad():
                    _call(destination, x, weight, bias, 1e-5, 1, mode != "eval", running)

            return unrecorded

        return prepare

    return side(KERNELS), side(TORCH)


# ------------------------------------------------------------------ the call


def normalize(input: Tensor, weight, bias, eps: float, axis: int, training: bool, running, epilogue=None) -> Tensor:
    """Batch normalization of checked arguments (functional.py), wherever ``route`` sends it;
    with the ``epilogue`` of a fused layer (epilogue.py), when one is given: in the kernels'
    passes on their destinations, else in torch ops after the normalization."""
    if training and running is not None and running[3] < 2:
        running = None  # an empty batch (count 0): no update
    residual = None if epilogue is None else epilogue.residual
    where = route(input, weight, bias, running, training, axis, residual)
    if epilogue is not None:
        fused = _call_fused(where, input, weight, bias, eps, axis, training, running, epilogue)
        if fused is not None:
            return fused
    y = _call(where, input, weight, bias, eps, axis, training, running)
    return y if epilogue is None else epilogues.apply(y, epilogue)


def _call_fused(where: str, input: Tensor, weight, bias, eps, axis, training, running, epilogue) -> Tensor | None:
    """A fused layer's call where the epilogue is part of the op: the kernels' passes (not on
    an empty input or in a forked child), or the fused custom ops; None elsewhere (torch's
    kernel, the reference ops), where normalize applies the epilogue after the plain call."""
    if where is OP:
        if training:
            return fused_ops.train_op(input, weight, bias, eps, axis, running, epilogue)
        return fused_ops.evaluate_op(input, running[0], running[1], weight, bias, eps, axis, epilogue)
    if (where is not KERNELS and where is not KERNELS_RECORDED) or not input.numel() or ops._forked_child:
        return None
    recorded = where is KERNELS_RECORDED
    if training:
        return fused_ops.train_fused(input, weight, bias, eps, axis, running, epilogue, recorded)
    return fused_ops.evaluate_fused(input, running[0], running[1], weight, bias, eps, axis, epilogue, recorded)


def _call(where: str, input: Tensor, weight, bias, eps, axis, training, running) -> Tensor:
    if where is KERNELS or where is KERNELS_RECORDED:
        if training:
            return ops.train_kernels(input, weight, bias, eps, axis, running, where is KERNELS_RECORDED)
        return ops.evaluate_kernels(input, running[0], running[1], weight, bias, eps, axis, where is KERNELS_RECORDED)
    if where is TORCH:
        if training:
            return ops.train_torch(input, weight, bias, eps, running)
        return ops.evaluate_torch(input, running[0], running[1], weight, bias, eps)
    if training:
        if where is REFERENCE:
            return ops.train_reference(input, weight, bias, eps, axis, running)
        return ops.train_op(input, weight, bias, eps, axis, running)
    if where is REFERENCE:
        return ops.evaluate_reference(input, running[0], running[1], weight, bias, eps, axis)
    return ops.evaluate_op(input, running[0], running[1], weight, bias, eps, axis)
