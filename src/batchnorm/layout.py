"""Seeing a tensor of any memory format as (A, C, B) around its channel axis."""

from __future__ import annotations

import math

import torch


def channel_view(tensor: torch.Tensor, axis: int) -> torch.Tensor | None:
    """A C-contiguous (A, C, B) view of ``tensor``'s memory, or None if there is none.

    The dimensions are taken in memory order (largest stride first); ``A`` is the
    product of those before the channel axis, ``B`` of those after it. A contiguous
    (N, C, H, W) tensor gives (N, C, H*W), a channels_last one (N*H*W, C, 1), a
    contiguous (N, L, C) tensor with axis=-1 gives (N*L, C, 1). Tensors whose
    memory is not dense (slices with gaps, expanded dimensions) return None.
    """
    sizes = tensor.shape
    channels = sizes[axis]
    if tensor.is_contiguous():
        outer = math.prod(sizes[:axis])
        return tensor.view(outer, channels, tensor.numel() // max(outer * channels, 1))
    strides = tensor.stride()
    ndim = tensor.dim()
    # memory order, outermost first; size-1 dimensions carry no layout, the channel
    # axis keeps its place among equals
    order = sorted(range(ndim), key=lambda d: (-strides[d] if sizes[d] != 1 else 0, d != axis))
    order = [d for d in order if sizes[d] != 1 or d == axis]
    expected = 1
    for d in reversed(order):
        if strides[d] != expected and sizes[d] != 1:
            return None
        expected *= sizes[d]
    position = order.index(axis)
    outer = math.prod(sizes[d] for d in order[:position])
    inner = math.prod(sizes[d] for d in order[position + 1 :])
    return tensor.as_strided((outer, channels, inner), (channels * inner, inner, 1))
