"""Ghost (virtual) batch norm (Hoffer, Hubara and Soudry 2017; Keras' ``virtual_batch_size``).

In training, the batch of N is split along N into N / v chunks of ``virtual_batch_size`` v,
in order, and each chunk is normalized with its own statistics, per channel c:

    mu_g = mean of x over chunk g        var_g = mean of (x - mu_g)^2 over chunk g   (biased)
    y    = weight * (x - mu_g) / sqrt(var_g + eps) + bias

The running statistics are updated once a batch, as Keras updates its moving statistics in
virtual-batch mode: from the mean of the chunks' means and the mean of the chunks'
variances, each over m = v * (values per channel of one example) values, with torch's
conventions (momentum weighs the new batch; running_var takes the unbiased var_g * m/(m-1)):

    running_mean = (1 - momentum) * running_mean + momentum * mean_g(mu_g)
    running_var  = (1 - momentum) * running_var  + momentum * mean_g(var_g) * m/(m - 1)

With v equal to the batch the layer is BatchNorm. A batch that v does not divide is refused,
as Keras refuses it. Evaluation uses the running statistics, as BatchNorm. The chunks are
normalized as the channels of one batch norm call (G * C channels, the weight and bias
repeated), so the statistics and the kernels are the plain layer's.
"""

from __future__ import annotations

import math

import torch

from . import functional as F
from .layers import BatchNorm1d, BatchNorm2d, BatchNorm3d

Tensor = torch.Tensor

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


class _Ghost:
    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(
                f"virtual_batch_size must be a positive integer, got virtual_batch_size={virtual_batch_size!r}"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        if (
            not self.training
            or type(input) is not Tensor
            or input.dim() < 2
            or input.shape[0] == self.virtual_batch_size
        ):
            return super().forward(input)  # eval, tracing, or one chunk: the plain layer
        self._check_input_dim(input)
        N, C, rest = input.shape[0], input.shape[1], tuple(input.shape[2:])
        v = self.virtual_batch_size
        if N % v:
            raise ValueError(
                f"{type(self).__name__}(virtual_batch_size={v}) needs a batch that it divides, got a batch of {N}"
            )
        if C != self.num_features:
            return super().forward(input)  # the plain layer's error
        G = N // v
        # chunk g's channel c is channel g * C + c of a batch of v examples
        chunks = input.reshape(G, v, C, *rest).transpose(0, 1).reshape(v, G * C, *rest)
        weight = None if self.weight is None else self.weight.repeat(G)
        bias = None if self.bias is None else self.bias.repeat(G)
        tracking = self.track_running_stats and self.running_mean is not None
        if tracking:  # the chunks' statistics, from the plain update with momentum 1 (count v * rest)
            stats = self.running_mean.dtype
            chunk_mean = torch.zeros(G * C, dtype=stats, device=input.device)
            chunk_var = torch.ones(G * C, dtype=stats, device=input.device)
            counted = torch.zeros((), dtype=torch.long, device=input.device)
            y = F.batch_norm(
                chunks, chunk_mean, chunk_var, weight, bias, True, 1.0, self.eps, 1, num_batches_tracked=counted
            )
            m = v * math.prod(rest)
            mean = chunk_mean.view(G, C).mean(0)
            var = (chunk_var.view(G, C) * ((m - 1) / m)).mean(0)  # back to biased, as the update takes it
            mean = torch.where(counted > 0, mean, torch.nan)  # a non-finite chunk: no update
            F.update_running_stats(
                self.running_mean, self.running_var, self.num_batches_tracked, mean, var, m, self.momentum,
                self.running_var_correction,
            )  # fmt: skip
        else:
            y = F.batch_norm(chunks, None, None, weight, bias, True, 0.0, self.eps, 1)
        return y.reshape(v, G, C, *rest).transpose(0, 1).reshape(input.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"


_DOC = """Ghost batch norm over {what}: {torch_name} whose training statistics are those of each
chunk of ``virtual_batch_size`` examples (see batchnorm.ghost). Arguments: ``num_features,
virtual_batch_size``, then those of ``batchnorm.{torch_name}``."""


class GhostBatchNorm1d(_Ghost, BatchNorm1d):
    __doc__ = _DOC.format(what="(N, C) or (N, C, L) input", torch_name="BatchNorm1d")


class GhostBatchNorm2d(_Ghost, BatchNorm2d):
    __doc__ = _DOC.format(what="(N, C, H, W) input", torch_name="BatchNorm2d")


class GhostBatchNorm3d(_Ghost, BatchNorm3d):
    __doc__ = _DOC.format(what="(N, C, D, H, W) input", torch_name="BatchNorm3d")
