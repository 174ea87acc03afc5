"""How batch norm helps optimization: the measures of Santurkar, Tsipras, Ilyas and Madry,
"How Does Batch Normalization Help Optimization?" (NeurIPS 2018, arXiv 1805.11604), for any model.

Each measure takes the model as it is at one point of training, one batch (x, y) and the
learning rate; it evaluates the loss and gradients in the model's current mode (training
mode: batch statistics, as a training step sees them) and leaves the model exactly as it
found it: parameters, buffers (running statistics), ``.grad`` and torch's random state.
Write L for the loss on the batch and g = ∇L(w) for its gradient at the parameters w.

- ``internal_covariate_shift`` (their Definition 2.1): for a layer i with weight W_i,
  G = ∂L/∂W_i at w, and G' = ∂L/∂W_i after every earlier parameter (those registered before
  W_i, the layers below it in a sequential model) took its step w_j - lr · g_j while W_i and
  the later ones stayed; the shift is ||G - G'||, also given relative to ||G||, and cos(G, G').
- ``landscape`` (their section 3.1, Figure 4), along the gradient direction at the step
  sizes eta = m · lr for the multipliers m (1/2 to 4 by default):
    loss range: max_eta L(w - eta g) - min_eta L(w - eta g);
    gradient predictiveness: the l2 change of the gradient ||g - ∇L(w - eta g)||, largest over eta;
    effective beta-smoothness: max_eta ||g - ∇L(w - eta g)|| / ||eta g||.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MULTIPLIERS", "Landscape", "Shift", "internal_covariate_shift", "landscape", "measure", "unchanged"]

MULTIPLIERS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Shift:
    layer: str
    distance: float  # ||G - G'||
    relative: float  # ||G - G'|| / ||G||
    cosine: float  # cos(G, G')


@dataclass(frozen=True)
class Landscape:
    steps: tuple[float, ...]  # eta, the distances along -g in units of the gradient
    losses: tuple[float, ...]  # L(w - eta g)
    gradient_changes: tuple[float, ...]  # ||g - ∇L(w - eta g)||
    gradient_norm: float  # ||g||

    @property
    def loss_range(self) -> float:
        return max(self.losses) - min(self.losses)

    @property
    def gradient_change(self) -> float:
        return max(self.gradient_changes)

    @property
    def beta_smoothness(self) -> float:
        if self.gradient_norm == 0:
            return float("nan")
        return max(c / (eta * self.gradient_norm) for eta, c in zip(self.steps, self.gradient_changes, strict=True))


@contextlib.contextmanager
def unchanged(model: nn.Module) -> Iterator[None]:
    """Restores the model's parameters and buffers and torch's random state on the way out."""
    state = {name: value.detach().clone() for name, value in model.state_dict(keep_vars=True).items()}
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            current = model.state_dict(keep_vars=True)
            for name, value in state.items():
                current[name].copy_(value)
        torch.set_rng_state(rng)


def _check(model: nn.Module, lr: float) -> list[nn.Parameter]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got lr={lr!r}")
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("model has no parameters that require gradients: there is nothing to measure")
    return parameters


def _gradient(model, parameters, x, y, loss_fn) -> tuple[float, list[torch.Tensor]]:
    with torch.enable_grad():
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(parameters, grads, strict=True)]
    return float(loss.detach()), grads


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    scale = float(a.norm() * b.norm())
    return float(a @ b) / scale if scale > 0 else float("nan")


def _layers(model: nn.Module, parameters: list[nn.Parameter], layers: Sequence[str] | None) -> list[tuple[str, int]]:
    """(name, position among ``parameters`` of its weight) of each layer to measure the shift of."""
    modules = dict(model.named_modules())
    if layers is None:
        names = [name for name, m in modules.items() if isinstance(m, WEIGHT_LAYERS)]
        layers = names[1:] if names and modules[names[0]].weight is parameters[0] else names
    position = {id(p): i for i, p in enumerate(parameters)}
    found = []
    for name in layers:
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) not in position:
            raise ValueError(f"layers: {name!r} is not a module of the model with a trainable weight")
        found.append((name, position[id(weight)]))
    return found


def _gradient_at(model, parameters, original, grads, eta: float, upto: int, x, y, loss_fn):
    """The loss and gradient with the first ``upto`` parameters at w - eta g, the others at w."""
    with torch.no_grad():
        for i, (p, w, g) in enumerate(zip(parameters, original, grads, strict=True)):
            p.copy_(w - eta * g if i < upto else w)
    return _gradient(model, parameters, x, y, loss_fn)


def _shifts(model, parameters, original, grads, lr, layers, x, y, loss_fn) -> list[Shift]:
    shifts = []
    for name, i in layers:
        _, moved = _gradient_at(model, parameters, original, grads, lr, i, x, y, loss_fn)
        before, after = grads[i], moved[i]
        distance, size = _norm([before - after]), _norm([before])
        relative = distance / size if size > 0 else float("nan")
        shifts.append(Shift(name, distance, relative, _cosine(before, after)))
    return shifts


def _path(model, parameters, original, grads, steps, x, y, loss_fn) -> Landscape:
    losses, changes = [], []
    for eta in steps:
        loss, moved = _gradient_at(model, parameters, original, grads, eta, len(parameters), x, y, loss_fn)
        losses.append(loss)
        changes.append(_norm([a - b for a, b in zip(grads, moved, strict=True)]))
    return Landscape(tuple(steps), tuple(losses), tuple(changes), _norm(grads))


def _steps(lr: float, multipliers: Sequence[float]) -> tuple[float, ...]:
    if not multipliers or any(not (math.isfinite(m) and m > 0) for m in multipliers):
        raise ValueError(f"multipliers must be positive finite numbers, got multipliers={tuple(multipliers)!r}")
    return tuple(m * lr for m in multipliers)


@contextlib.contextmanager
def _at_w(model: nn.Module, parameters: list[nn.Parameter], x, y, loss_fn):
    """(w, g) at the model's parameters on the batch; everything restored on the way out."""
    with unchanged(model):
        _, grads = _gradient(model, parameters, x, y, loss_fn)
        yield [p.detach().clone() for p in parameters], grads


def internal_covariate_shift(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    loss_fn: LossFn = nn.functional.cross_entropy,
    layers: Sequence[str] | None = None,
) -> list[Shift]:
    """The shift of each layer's weight gradient when the layers below it take their step.

    ``layers``: names of modules with a ``weight`` (default: every Linear and Conv but the
    first weight of the model, which has nothing below it)."""
    parameters = _check(model, lr)
    found = _layers(model, parameters, layers)
    with _at_w(model, parameters, x, y, loss_fn) as (original, grads):
        return _shifts(model, parameters, original, grads, lr, found, x, y, loss_fn)


def landscape(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    loss_fn: LossFn = nn.functional.cross_entropy,
    multipliers: Sequence[float] = MULTIPLIERS,
) -> Landscape:
    """The loss and the gradient along -g at the step sizes ``m * lr`` for ``m`` in ``multipliers``."""
    parameters = _check(model, lr)
    steps = _steps(lr, multipliers)
    with _at_w(model, parameters, x, y, loss_fn) as (original, grads):
        return _path(model, parameters, original, grads, steps, x, y, loss_fn)


def measure(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, loss_fn: LossFn = nn.functional.cross_entropy
) -> dict[str, float]:
    """Every measure at once, as flat numbers (ICS averaged over the layers) for a metrics record;
    the gradient at w is computed once for both."""
    parameters = _check(model, lr)
    found = _layers(model, parameters, None)
    with _at_w(model, parameters, x, y, loss_fn) as (original, grads):
        shape = _path(model, parameters, original, grads, _steps(lr, MULTIPLIERS), x, y, loss_fn)
        shifts = _shifts(model, parameters, original, grads, lr, found, x, y, loss_fn)
    mean = (lambda values: sum(values) / len(values)) if shifts else (lambda values: float("nan"))
    return {
        "loss_range": shape.loss_range,
        "gradient_change": shape.gradient_change,
        "beta_smoothness": shape.beta_smoothness,
        "ics_distance": mean([s.distance for s in shifts]),
        "ics_relative": mean([s.relative for s in shifts]),
        "ics_cosine": mean([s.cosine for s in shifts]),
    }
