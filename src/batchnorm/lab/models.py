"""The lab's networks: the paper's MLP and a small CNN, with or without batch norm.

``norm`` picks the normalization: "bn" (this project's layers), "torch" (torch.nn's,
for comparison), "renorm" (batch renormalization, Ioffe 2017: rmax 3 and dmax 5 reached
over the run, on the paper's schedule scaled to ``steps``: plain BN for the first tenth,
dmax at half the run, rmax at four fifths), "bn-l1" and "bn-linf" (lp batch norm, Santurkar
et al. 2018), "ln" (LayerNorm over each example's features; in the CNN over its channels and
positions, GroupNorm with one group as Wu & He compare it), "gn" (GroupNorm with
gcd(channels, 8) groups), "in" (InstanceNorm, the CNN only: it needs positions), "bn-noisy"
(batch norm followed by ``Noise``, Santurkar et al.'s "noisy" batch norm) or "none".
In the MLP, "before" puts batch norm between the linear
map and the activation, as the paper does (x -> BN(Wx) -> f); "after" puts it after
the activation (x -> f(Wx + b) -> BN).

Every hidden block ends in a ``Probe``, an identity placed on the input of the
activation, so that experiments can read the distribution a sigmoid sees (the paper's
Figure 1 b, c) with a forward hook.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import layers
from ..lp import LpBatchNorm1d, LpBatchNorm2d
from ..normalizations import GroupNorm, InstanceNorm1d, InstanceNorm2d, LayerNorm
from ..renorm import BatchRenorm1d, BatchRenorm2d

__all__ = ["ACTIVATIONS", "NORMS", "Noise", "Probe", "cnn", "mlp", "paper_init"]

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
NORMS = ("bn", "torch", "renorm", "bn-l1", "bn-linf", "ln", "gn", "in", "bn-noisy", "none")
INIT_STD = 0.1  # the paper: "small random Gaussian values"; it gives no number


class Probe(nn.Identity):
    """Marks the input of an activation; register a forward hook on it to record it."""


class Noise(nn.Module):
    """Time-varying noise of non-zero mean and non-unit variance (Santurkar et al. 2018, section 2.1).

    In training mode every forward (one training step) draws, per channel j, a shift
    mu_j ~ U(-shift, shift) and a scale sigma_j ~ U(1, scale), and for each example i and
    position a multiplier s and an offset m around them:

        y = x * s + m,   s = sigma_j + per_example * N(0, 1),   m = mu_j + per_example * N(0, 1)

    from torch's global generator (so checkpoints keep it). In eval mode it is the identity."""

    def __init__(self, shift: float = 0.5, scale: float = 1.25, per_example: float = 0.1):
        super().__init__()
        if not (shift >= 0 and scale >= 1 and per_example >= 0):
            raise ValueError(
                f"Noise needs shift >= 0, scale >= 1 and per_example >= 0, got shift={shift}, scale={scale}, "
                f"per_example={per_example}"
            )
        self.shift, self.scale, self.per_example = shift, scale, per_example

    def forward(self, x):
        if not self.training:
            return x
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        mu = torch.empty(shape, dtype=x.dtype, device=x.device).uniform_(-self.shift, self.shift)
        sigma = torch.empty(shape, dtype=x.dtype, device=x.device).uniform_(1.0, self.scale)
        s = sigma + self.per_example * torch.randn_like(x)
        return x * s + mu + self.per_example * torch.randn_like(x)

    def extra_repr(self) -> str:
        return f"shift={self.shift}, scale={self.scale}, per_example={self.per_example}"


def _norm(
    kind: str, features: int, rank: int, momentum: float | None, steps: int = 50_000, spatial: bool = True
) -> nn.Module:
    """The normalization layer of ``kind`` for ``features`` channels of rank-``rank`` data (1:
    (N, C) or (N, C, L); 2: (N, C, H, W)); ``spatial`` False for the MLP's (N, C)."""
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got norm={kind!r}")
    if kind == "ln":
        return LayerNorm(features) if not spatial else GroupNorm(1, features)
    if kind == "gn":
        return GroupNorm(math.gcd(features, 8), features)
    if kind == "in":
        if not spatial:
            raise ValueError("norm='in' (instance norm) needs positions to normalize over: use model='cnn'")
        return (InstanceNorm1d if rank == 1 else InstanceNorm2d)(features, affine=True)
    if kind in ("bn-l1", "bn-linf"):
        return (LpBatchNorm1d if rank == 1 else LpBatchNorm2d)(features, norm=kind[3:], momentum=momentum)
    if kind == "renorm":
        if momentum is None:
            raise ValueError("norm='renorm' needs a bn_momentum in [0, 1] (its running standard deviation), got None")
        schedule = dict(warmup_steps=steps // 10, dmax_steps=steps // 2, rmax_steps=steps * 4 // 5)
        return (BatchRenorm1d if rank == 1 else BatchRenorm2d)(features, momentum=momentum, **schedule)
    if kind == "bn-noisy":
        return nn.Sequential(_norm("bn", features, rank, momentum, steps, spatial), Noise())
    if kind == "bn":
        return (layers.BatchNorm1d if rank == 1 else layers.BatchNorm2d)(features, momentum=momentum)
    return (nn.BatchNorm1d if rank == 1 else nn.BatchNorm2d)(features, momentum=momentum)


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got activation={name!r}")
    return ACTIVATIONS[name]()


def mlp(
    in_features: int,
    num_classes: int = 10,
    *,
    depth: int = 3,
    width: int = 100,
    activation: str = "sigmoid",
    norm: str = "bn",
    placement: str = "before",
    dropout: float = 0.0,
    bn_momentum: float | None = 0.1,
    steps: int = 50_000,
) -> nn.Sequential:
    """Flatten, ``depth`` hidden layers of ``width`` units, a linear output (the paper: 3 x 100, sigmoid)."""
    if placement not in ("before", "after"):
        raise ValueError(f"placement must be 'before' or 'after', got placement={placement!r}")
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width must be positive, got depth={depth}, width={width}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got dropout={dropout}")
    blocks: list[nn.Module] = [nn.Flatten()]
    features = in_features
    for _ in range(depth):
        with_norm = norm != "none"
        # before the activation, BN's beta replaces the linear bias
        blocks.append(nn.Linear(features, width, bias=not (with_norm and placement == "before")))
        if with_norm and placement == "before":
            blocks.append(_norm(norm, width, 1, bn_momentum, steps, spatial=False))
        blocks += [Probe(), _activation(activation)]
        if with_norm and placement == "after":
            blocks.append(_norm(norm, width, 1, bn_momentum, steps, spatial=False))
        if dropout:
            blocks.append(nn.Dropout(dropout))
        features = width
    blocks.append(nn.Linear(features, num_classes))
    model = nn.Sequential(*blocks)
    paper_init(model)
    return model


def cnn(
    example_shape: tuple[int, ...],
    num_classes: int = 10,
    *,
    channels: tuple[int, ...] = (32, 64),
    activation: str = "relu",
    norm: str = "bn",
    bn_momentum: float | None = 0.1,
    steps: int = 50_000,
) -> nn.Sequential:
    """Convolutions with batch norm after each: Conv1d for (L,) or (C, L) signals, Conv2d for (C, H, W) images.

    Each block is conv (3 wide, no bias when normalized) -> BN -> activation -> max-pool by 2;
    then global average pooling and a linear output.
    """
    signal = len(example_shape) == 1  # (L,): seen as one channel
    if signal:
        example_shape = (1, *example_shape)
    if len(example_shape) not in (2, 3):
        raise ValueError(f"cnn needs (L,), (C, L) or (C, H, W) examples, got shape {example_shape}")
    rank = len(example_shape) - 1
    least = 2 ** len(channels)  # each block pools by 2
    if min(example_shape[1:]) < least:
        raise ValueError(
            f"cnn pools by 2 in each of its {len(channels)} blocks: it needs examples of at least {least} values "
            f"along each axis after the channels, got examples of shape {tuple(example_shape)}"
        )
    conv = nn.Conv1d if rank == 1 else nn.Conv2d
    pool = nn.MaxPool1d if rank == 1 else nn.MaxPool2d
    global_pool = nn.AdaptiveAvgPool1d(1) if rank == 1 else nn.AdaptiveAvgPool2d(1)
    blocks: list[nn.Module] = [nn.Unflatten(1, example_shape)] if signal else []
    features = example_shape[0]
    for out in channels:
        blocks.append(conv(features, out, 3, padding=1, bias=norm == "none"))
        if norm != "none":
            blocks.append(_norm(norm, out, 2 if rank == 2 else 1, bn_momentum, steps))
        blocks += [Probe(), _activation(activation), pool(2)]
        features = out
    blocks += [global_pool, nn.Flatten(), nn.Linear(features, num_classes)]
    return nn.Sequential(*blocks)


def paper_init(model: nn.Module, std: float = INIT_STD) -> None:
    """Linear weights from N(0, std^2), biases 0 (the paper's "small random Gaussian values")."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())
