"""Drop-in batch-norm modules: torch's constructors, parameters, buffers and state_dict keys.

The modules hold state and choose the mode; functional.normalize checks the arguments and
the route (route.py) does the arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from . import functional as F

Tensor = torch.Tensor

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]

_DOC = """Batch normalization over {what} (Ioffe & Szegedy 2015), a drop-in for ``torch.nn.{torch_name}``.

Training, per channel c over the m values of the batch::

    mu  = (1/m) sum x_i          var = (1/m) sum (x_i - mu)^2          (biased)
    y_i = weight * (x_i - mu) / sqrt(var + eps) + bias
    running_mean = (1 - momentum) * running_mean + momentum * mu
    running_var  = (1 - momentum) * running_var  + momentum * var * m/(m - c)

with c = running_var_correction: 1, the unbiased var (torch's), or 0, the biased var
(Keras' and Flax'). ``momentum`` weighs the new batch (0.1; Keras' 0.99 is ``1 - momentum``);
``momentum=None`` is the cumulative average, factor 1/num_batches_tracked.
Evaluation: ``y = weight * (x - running_mean) / sqrt(running_var + eps) + bias``.
With ``track_running_stats=False`` the batch statistics are used in both modes.
``weight`` starts at 1, ``bias`` at 0.

Unlike torch, a training batch with NaN or infinite values, or an empty batch,
leaves running_mean, running_var and num_batches_tracked unchanged (with a
RuntimeWarning for the non-finite batch on the CPU).

Args:
    num_features: C, the size of the channel axis ({shape}).
    eps: added to the variance for numerical stability (> 0). Default: 1e-5
    momentum: weight of the new batch in the running averages, in [0, 1], or None. Default: 0.1
    affine: learn ``weight`` and ``bias``. Default: True
    track_running_stats: keep running averages for evaluation. Default: True
    bias: (keyword-only, as in torch 2.13) learn ``bias`` when affine. Default: True
    single_value: (keyword-only) a training batch with one value per channel (batch 1 of
        (N, C) input): "raise" as torch does, or "use_running": normalize it with the running
        statistics and leave them unchanged. Default: "raise"
    running_var_correction: (keyword-only) Bessel's correction of the batch variance that
        the running variance takes: 1 (unbiased, torch's) or 0 (biased, Keras' and Flax'). Default: 1
"""


def _check_constructor(num_features: int, eps: float, momentum: float | None) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(f"num_features must be a positive integer, got num_features={num_features!r}")
    F.check_momentum(momentum)
    F.check_eps(eps)


class _BatchNorm(nn.Module):
    """State and mode; the math lives in functional.batch_norm."""

    _version = 2  # as torch: version 2 added num_batches_tracked
    axis: int = 1
    single_value: str = "raise"  # a training batch of one value per channel: "raise" or "use_running"
    running_var_correction: int = 1  # the running variance's Bessel correction: 1 unbiased, 0 biased
    p: float = 2  # the training spread: 2 the variance; 1 and inf for lp batch norm (lp.py)
    _sync_group = False  # SyncBatchNorm's process group (None: the default group); False: no synchronization

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        single_value: str = "raise",
        running_var_correction: int = 1,
    ) -> None:
        if not isinstance(self, LazyModuleMixin):
            _check_constructor(num_features, eps, momentum)
        if single_value not in ("raise", "use_running"):
            raise ValueError(f"single_value must be 'raise' or 'use_running', got single_value={single_value!r}")
        F.check_correction(running_var_correction)
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if single_value != "raise":
            self.single_value = single_value
        if running_var_correction != 1:
            self.running_var_correction = running_var_correction
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        """The rank check of torch's layer of the same name (any rank of 2 or more here, as torch's functional form)."""

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` (Keras 3's and Flax's): a boolean tensor of the input's shape without its
        channel axis, True where a position counts in the training statistics (batchnorm.masked:
        every position is normalized with them; evaluation ignores the mask)."""
        return self._normalize(input, None, (input,) if mask is None else (input, mask), mask)

    def _normalize(self, input: Tensor, epilogue, arguments: tuple, mask: Tensor | None = None) -> Tensor:
        """The layer's call of functional.normalize (a fused layer passes its ``epilogue``);
        ``arguments`` are forward's, for a torch.fx trace."""
        if type(input) is not Tensor and isinstance(input, torch.fx.Proxy):
            # torch.fx symbolic tracing: the layer is one call_module node, as torch's layers are
            # (a leaf), so that the traced graph keeps its modes and its state
            tracer = input.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), arguments, {})
        self._check_input_dim(input)
        # from the dicts nn.Module keeps them in: six self.<name> lookups through
        # nn.Module.__getattr__ cost about 7 us, a sixth of a small call
        parameters, buffers = self._parameters, self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        training = self.training
        # torch's rules: batch statistics in training or without running buffers;
        # the buffers go in unless training without tracking
        use_batch_stats = training or (running_mean is None and running_var is None)
        if training and self.single_value == "use_running" and running_mean is not None:
            if input.numel() == input.shape[self.axis] and self.track_running_stats:
                training = use_batch_stats = False  # one value per channel: the running statistics, no update
        if training and not self.track_running_stats:
            running_mean = running_var = None
        accumulator = self.__dict__.get("_accumulator")  # batchnorm.accumulate's, while its block runs
        if accumulator is not None and training and running_mean is not None:
            y = F.normalize(
                input, None, None, parameters["weight"], parameters["bias"], True, self.momentum, self.eps,
                self.axis, None, self, epilogue, mask=mask, p=self.p,
            )  # fmt: skip
            accumulator.observe(self, input, mask)
            return y
        num_batches_tracked = buffers["num_batches_tracked"] if running_mean is not None and training else None
        return F.normalize(
            input, running_mean, running_var, parameters["weight"], parameters["bias"], use_batch_stats,
            self.momentum, self.eps, self.axis, num_batches_tracked, self, epilogue, self.running_var_correction,
            mask, self.p, self._sync_group,
        )  # fmt: skip

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module it scripts, before it compiles anything
        raise RuntimeError(
            f"torch.jit.script does not take batchnorm's {type(self).__name__} (its forward dispatches between "
            "Numba kernels and torch's in Python; TorchScript is deprecated as of torch 2.13): use torch.compile "
            "or torch.export, which see each layer as one op, or torch.jit.trace; to script the model, load its "
            "state_dict into torch.nn's layers (the same keys)"
        )

    def extra_repr(self) -> str:
        axis = f", axis={self.axis}" if type(self).__name__ == "BatchNorm" else ""
        if self.single_value != "raise":
            axis += f", single_value={self.single_value!r}"
        if self.running_var_correction != 1:
            axis += f", running_var_correction={self.running_var_correction}"
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}{axis}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            # checkpoints from before num_batches_tracked existed (torch's migration)
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = (
                    self.num_batches_tracked
                    if self.num_batches_tracked is not None and self.num_batches_tracked.device != torch.device("meta")
                    else torch.tensor(0, dtype=torch.long)
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class BatchNorm1d(_BatchNorm):
    __doc__ = _DOC.format(what="(N, C) or (N, C, L) input", torch_name="BatchNorm1d", shape="dim 1")

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(_BatchNorm):
    __doc__ = _DOC.format(what="(N, C, H, W) input", torch_name="BatchNorm2d", shape="dim 1")

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm3d(_BatchNorm):
    __doc__ = _DOC.format(what="(N, C, D, H, W) input", torch_name="BatchNorm3d", shape="dim 1")

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


class BatchNorm(_BatchNorm):
    __doc__ = _DOC.format(
        what="input of rank 2 or more with its channels on any axis", torch_name="BatchNorm*", shape="``axis``"
    ) + (
        "    axis: (keyword-only) the channel axis, negative allowed: 1 as torch lays out data, -1 for (N, ..., C)\n"
        "        as Keras does. Default: 1\n"
    )

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        axis: int = 1,
        single_value: str = "raise",
        running_var_correction: int = 1,
    ) -> None:
        if isinstance(axis, bool) or not isinstance(axis, int) or not -5 <= axis <= 4:
            raise ValueError(f"axis must be an integer in [-5, 4], got axis={axis!r}")
        self.axis = axis
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            single_value=single_value,
            running_var_correction=running_var_correction,
        )


class _LazyBatchNorm(LazyModuleMixin, _BatchNorm):
    """num_features is inferred from the first input, as torch's LazyBatchNorm does, or from
    the tensors of a loaded state_dict (torch 2.13 leaves it 0 after loading)."""

    cls_to_become = None

    def __init__(
        self, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None, dtype=None, *, bias=True
    ) -> None:
        F.check_momentum(momentum)
        F.check_eps(eps)
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__(0, eps, momentum, False, False, **factory_kwargs)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = UninitializedParameter(**factory_kwargs)
            if bias:
                self.bias = UninitializedParameter(**factory_kwargs)
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory_kwargs)
            self.running_var = UninitializedBuffer(**factory_kwargs)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def initialize_parameters(self, input: Tensor) -> None:
        self._check_input_dim(input)
        if self.has_uninitialized_params():
            self.num_features = input.shape[self.axis]
            for tensor in (self.weight, self.bias, self.running_mean, self.running_var):
                if is_lazy(tensor):
                    tensor.materialize((self.num_features,))
            self.reset_parameters()
        elif self.num_features == 0:  # no tensor to infer it from (affine=False, track_running_stats=False)
            self.num_features = input.shape[self.axis]

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)  # materializes what it loads
        if self.num_features == 0:
            for tensor in (self.weight, self.running_mean):
                if tensor is not None and not is_lazy(tensor):
                    self.num_features = tensor.shape[0]
                    break


class LazyBatchNorm1d(_LazyBatchNorm, BatchNorm1d):
    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyBatchNorm, BatchNorm2d):
    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyBatchNorm, BatchNorm3d):
    cls_to_become = BatchNorm3d
