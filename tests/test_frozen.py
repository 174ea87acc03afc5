"""FrozenBatchNorm1d/2d/3d, freeze and unfreeze (frozen.py): against torchvision's
FrozenBatchNorm2d formula written out here (torchvision does not install against the CPU
build of torch), torch's BatchNorm in eval, and the float64 formula; state_dicts both ways."""

import re

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import crossover


def _torchvision_frozen(x, weight, bias, running_mean, running_var, eps=1e-5):
    """torchvision.ops.misc.FrozenBatchNorm2d.forward, written out."""
    scale = weight * (running_var + eps).rsqrt()
    shift = bias - running_mean * scale
    return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def _values(C, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.rand(C, generator=g, dtype=dtype) + 0.5,
        "bias": torch.randn(C, generator=g, dtype=dtype),
        "running_mean": torch.randn(C, generator=g, dtype=dtype),
        "running_var": torch.rand(C, generator=g, dtype=dtype) + 0.5,
    }


@pytest.fixture(params=["torch", "kernels"])
def destination(request, monkeypatch):
    monkeypatch.setattr(crossover, "OVERRIDE", crossover.TOP + 1 if request.param == "torch" else 0)
    return request.param


@pytest.mark.parametrize("training", [True, False])
def test_frozen_is_the_eval_transform_in_both_modes(training, destination):
    values = _values(6)
    frozen = batchnorm.FrozenBatchNorm2d(6).double()
    frozen.load_state_dict(values)
    frozen.train(training)
    x = (torch.randn(8, 6, 5, 5, dtype=torch.float64) * 2 + 1).contiguous(memory_format=torch.channels_last)
    a = x.clone().requires_grad_(True)
    y = frozen(a)
    expected = _torchvision_frozen(x, **values)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    theirs = nn.BatchNorm2d(6).double().eval()
    theirs.load_state_dict({**values, "num_batches_tracked": torch.tensor(0)})
    b = x.clone().requires_grad_(True)
    z = theirs(b)
    g = torch.randn_like(y)
    y.backward(g)
    z.backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    assert [name for name, _ in frozen.named_parameters()] == []
    for name, value in values.items():  # nothing learned, nothing updated
        assert torch.equal(frozen._buffers[name], value), name


def test_state_dict_loads_from_and_into_torchs_and_torchvisions_layers():
    values = _values(4, torch.float32)
    torch_layer = nn.BatchNorm2d(4)
    torch_layer.load_state_dict({**values, "num_batches_tracked": torch.tensor(7)})
    frozen = batchnorm.FrozenBatchNorm2d(4)
    frozen.load_state_dict(torch_layer.state_dict())  # num_batches_tracked is dropped
    assert sorted(frozen.state_dict()) == sorted(values)  # torchvision's keys
    back = nn.BatchNorm2d(4)
    back.load_state_dict(frozen.state_dict())  # torch's layer fills num_batches_tracked with 0
    for name, value in values.items():
        torch.testing.assert_close(getattr(back, name), value)
    assert back.num_batches_tracked.item() == 0


def test_ranks_and_bad_arguments():
    with pytest.raises(ValueError, match=re.escape("expected 4D input (got 3D input)")):
        batchnorm.FrozenBatchNorm2d(3)(torch.randn(2, 3, 4))
    assert batchnorm.FrozenBatchNorm1d(3)(torch.randn(2, 3, 4)).shape == (2, 3, 4)
    assert batchnorm.FrozenBatchNorm3d(3)(torch.randn(2, 3, 2, 2, 2)).shape == (2, 3, 2, 2, 2)
    with pytest.raises(ValueError, match=re.escape("num_features must be a positive integer, got num_features=0")):
        batchnorm.FrozenBatchNorm2d(0)
    with pytest.raises(ValueError, match="activation must be one of"):
        batchnorm.FrozenBatchNorm2d(3, activation="tanh")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fused = batchnorm.BatchNormAct2d(4, "leaky_relu", negative_slope=0.2)
        self.head = batchnorm.BatchNorm1d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = self.fused(y, x[:, :1].expand(-1, 4, -1, -1).contiguous())
        return self.head(y.mean((2, 3)))


def test_freeze_keeps_the_values_and_the_fused_activation_and_unfreeze_gives_them_back(destination):
    torch.manual_seed(0)
    model = _Net().double()
    model.train()
    model(torch.randn(8, 3, 5, 5, dtype=torch.float64))  # running statistics away from their start
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    expected = model.eval()(x)
    frozen = batchnorm.freeze(model.train())
    assert [type(m) for m in (frozen.bn, frozen.fused, frozen.head)] == [
        batchnorm.FrozenBatchNorm2d,
        batchnorm.FrozenBatchNorm2d,
        batchnorm.FrozenBatchNorm1d,
    ]
    assert (frozen.fused.activation, frozen.fused.negative_slope) == ("leaky_relu", 0.2)
    torch.testing.assert_close(frozen(x), expected, rtol=1e-12, atol=1e-12)  # in training mode: eval's output
    assert type(model.bn) is nn.BatchNorm2d  # the input is left as it was
    only = batchnorm.freeze(model, names=["head"])
    assert type(only.head) is batchnorm.FrozenBatchNorm1d and type(only.bn) is nn.BatchNorm2d
    thawed = batchnorm.unfreeze(frozen)
    assert [type(m) for m in (thawed.bn, thawed.fused, thawed.head)] == [
        nn.BatchNorm2d,  # each as it was before freeze
        batchnorm.BatchNormAct2d,
        batchnorm.BatchNorm1d,
    ]
    assert thawed.training and thawed.bn.weight.requires_grad
    torch.testing.assert_close(thawed.eval()(x), expected, rtol=1e-12, atol=1e-12)
    folded = batchnorm.fold(frozen.eval())  # frozen layers fold like eval-mode ones, their epilogue kept
    torch.testing.assert_close(folded(x), expected, rtol=1e-10, atol=1e-10)
    kept = [name for name, m in folded.named_modules() if isinstance(m, batchnorm.frozen._FrozenBatchNorm)]
    assert kept == ["fused", "head"]  # the one after the convolution is in its weights now
    with pytest.raises(ValueError, match=re.escape("names must name batch-norm layers of the model; not one: conv")):
        batchnorm.freeze(model, names=["conv"])


def test_freeze_refuses_what_it_cannot_freeze():
    with pytest.raises(ValueError, match=re.escape("freeze needs running statistics: BatchNorm2d was built with")):
        batchnorm.freeze(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)))
    with pytest.raises(ValueError, match=re.escape("freeze cannot keep an in-place activated batch norm")):
        batchnorm.freeze(nn.Sequential(batchnorm.BatchNormAct2d(3, "leaky_relu", inplace=True)))
    with pytest.raises(TypeError, match=re.escape("model must be a torch.nn.Module, got int")):
        batchnorm.freeze(3)


def test_compile_fullgraph_sees_the_eval_op():
    frozen = batchnorm.FrozenBatchNorm2d(3)
    frozen.load_state_dict(_values(3, torch.float32))
    x = torch.randn(2, 3, 4, 4)
    compiled = torch.compile(frozen, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), frozen(x))


def test_variants_freeze_to_their_evaluation_and_thaw_back():
    """A renorm layer's evaluation uses its running standard deviation, a ghost layer's is
    BatchNorm's: frozen, both give their eval output; unfreeze gives each back as itself, and a
    frozen layer built directly becomes this project's trainable layer."""
    torch.manual_seed(0)
    model = nn.Sequential(
        batchnorm.BatchRenorm2d(3, warmup_steps=0, rmax_steps=0, dmax_steps=0, momentum=0.5),
        batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2),
        batchnorm.FrozenBatchNorm2d(3, activation="relu"),
    ).double()
    model(torch.randn(4, 3, 3, 3, dtype=torch.float64) * 3 + 1)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    expected = model.eval()(x)
    frozen = batchnorm.freeze(model.train())
    assert [type(m) for m in frozen] == [batchnorm.FrozenBatchNorm2d] * 3
    torch.testing.assert_close(frozen(x), expected, rtol=1e-12, atol=1e-12)
    thawed = batchnorm.unfreeze(frozen)
    assert [type(m) for m in thawed] == [batchnorm.BatchRenorm2d, batchnorm.GhostBatchNorm2d, batchnorm.BatchNormAct2d]
    assert thawed[0].rmax == 3.0 and thawed[1].virtual_batch_size == 2 and thawed[2].activation == "relu"
    torch.testing.assert_close(thawed.eval()(x), expected, rtol=1e-12, atol=1e-12)
